"""The OAuth authorization-code flow for a portal that opens the app outside the iframe."""

from __future__ import annotations

import base64
import zlib
from urllib.parse import parse_qs, quote, urlsplit

import httpx

from app.tenants import status as portal_status
from app.tenants.models import PortalStatus
from tests.install.conftest import portal_row


def test_code_flow_stores_a_fresh_chain(sandbox, installed, live_app):
    member_id = installed["member_id"]
    before = portal_row(member_id)
    version, old_refresh = before.token_version, before.refresh_token
    with live_app.http() as http:
        start = http.get("/oauth/start", params={"member_id": member_id})
        assert start.status_code == 302
        target = urlsplit(start.headers["Location"])
        assert target.netloc == installed["domain"] and target.path == "/oauth/authorize/"
        assert parse_qs(target.query)["client_id"] == [live_app.app.config["B24_CLIENT_ID"]]
        done = http.get(start.headers["Location"], follow_redirects=True)
    assert done.status_code == 200, done.text
    assert "connected" in done.text
    row = portal_row(member_id)
    assert row.token_version > version
    assert row.refresh_token != old_refresh
    assert row.status == "active"


def test_code_flow_by_domain_recovers_an_auth_failed_portal(sandbox, installed, live_app):
    member_id = installed["member_id"]
    portal_status.record(portal_row(member_id), PortalStatus.AUTH_FAILED, "chain lost")
    with live_app.http(follow_redirects=True) as http:
        done = http.get("/oauth/start", params={"domain": installed["domain"]})
    assert done.status_code == 200, done.text
    assert portal_row(member_id).status == "active"


def test_callback_refuses_a_forged_state(sandbox, installed, live_app):
    with live_app.http() as http:
        resp = http.get("/oauth/callback", params={"code": "x", "state": "forged",
                                                   "member_id": installed["member_id"]})
    assert resp.status_code == 400
    assert "Invalid sign-in state" in resp.text


def test_callback_refuses_a_state_started_in_another_browser(sandbox, installed, live_app):
    with live_app.http() as http:
        start = http.get("/oauth/start", params={"member_id": installed["member_id"]})
        authorize = http.get(start.headers["Location"])
    callback = authorize.headers["Location"]
    with live_app.http() as stranger:
        resp = stranger.get(callback)
    assert resp.status_code == 400
    assert "did not start the sign-in" in resp.text


def test_a_code_is_good_once(sandbox, installed, live_app):
    with live_app.http() as http:
        start = http.get("/oauth/start", params={"member_id": installed["member_id"]})
        nonce = http.cookies["b24relay_oauth"]
        callback = http.get(start.headers["Location"]).headers["Location"]
        assert http.get(callback).status_code == 200
        http.cookies.set("b24relay_oauth", nonce)  # replay the whole browser state
        again = http.get(callback)
    assert again.status_code == 401
    assert "refused the code" in again.text


def test_unknown_portal_is_404(live_app):
    with live_app.http() as http:
        assert http.get("/oauth/start", params={"member_id": "nope"}).status_code == 404
        assert http.get("/oauth/start").status_code == 400


def test_a_non_admin_finishing_the_code_flow_changes_nothing(sandbox, installed, live_app):
    member_id = installed["member_id"]
    before = portal_row(member_id)
    version, old_refresh = before.token_version, before.refresh_token
    with live_app.http() as http:
        start = http.get("/oauth/start", params={"member_id": member_id})
        # Bob (user 2, not an administrator) signs in on the portal's authorize page.
        authorize = http.get(start.headers["Location"] + "&user_id=2")
        assert authorize.status_code == 302
        done = http.get(authorize.headers["Location"])
    assert done.status_code == 403, done.text
    assert "only a portal administrator can reconnect" in done.text
    row = portal_row(member_id)
    assert row.token_version == version
    assert row.refresh_token == old_refresh


def _payload(state: str) -> str:
    """What anyone can read in a state: its itsdangerous payload, decoded."""
    body = state.lstrip(".").split(".")[0]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    return (zlib.decompress(raw) if state.startswith(".") else raw).decode()


def _shape(resp: httpx.Response, domain: str) -> tuple[int, list[str], str, str, str]:
    """An answer with the asked domain and the random state/nonce blanked out."""
    location = urlsplit(resp.headers["Location"])
    query = parse_qs(location.query)
    state = query.pop("state")[0]
    blank = resp.text.replace(domain, "D").replace(quote(state), "S").replace(state, "S")
    return (resp.status_code, sorted(resp.headers.keys()),
            f"{location.scheme}://{location.netloc.replace(domain, 'D')}{location.path}?{query}",
            resp.headers["Set-Cookie"].split(";", 1)[1], blank)


def test_start_by_domain_tells_no_customer_from_a_stranger(sandbox, installed, live_app):
    """An attacker listing customers by domain gets the same answer for both, no member_id."""
    known = installed["domain"]
    stranger = "not-a-customer.example"
    with live_app.http() as http:
        for_known = http.get("/oauth/start", params={"domain": known})
        for_stranger = http.get("/oauth/start", params={"domain": stranger})
    assert for_known.status_code == 302
    assert _shape(for_known, known) == _shape(for_stranger, stranger)
    state = parse_qs(urlsplit(for_known.headers["Location"]).query)["state"][0]
    assert installed["member_id"] not in state
    assert installed["member_id"] not in _payload(state)
    assert installed["member_id"] not in for_known.text + str(for_known.headers)


def test_callback_for_another_portal_than_started_is_refused(sandbox, installed, make_portal,
                                                             live_app):
    """A state issued for one domain does not reconnect another portal."""
    other = make_portal()
    sandbox.install_app(other["member_id"], live_app.url)
    with live_app.http() as http:
        start = http.get("/oauth/start", params={"domain": installed["domain"]})
        callback = http.get(start.headers["Location"]).headers["Location"]
        forged = callback.replace(installed["member_id"], other["member_id"])
        resp = http.get(forged)
    assert resp.status_code == 400
    assert "Invalid sign-in state" in resp.text
