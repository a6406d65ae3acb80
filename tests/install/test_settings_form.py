"""The admin's settings form token: one save per token, for one portal, by a still-valid admin.

The token sits in the iframe's HTML, so anything that reads the page can replay
it; it must authorise exactly one save of exactly its own portal. Real HTTP to
the live app, the sandbox portal, the test Redis and database.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import httpx
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from sqlalchemy import select

from app.extensions import db
from app.tenants import status as portal_status
from app.tenants.models import Portal, PortalSettings, PortalStatus
from app.tenants.users import PortalUser
from placements.settings import form_token
from tests.install.conftest import LiveApp, portal_row

USED = "This form was already used; reopen the app"


def _token(body: str) -> str:
    match = re.search(r'name="form_token" value="([^"]+)"', body)
    assert match, body
    return match.group(1)


def _open(sandbox: Any, member_id: str) -> str:
    """Open the settings page as the portal's admin; the form token it carries."""
    opened = sandbox.open_placement(member_id)
    assert opened["status"] == 200, opened["body"]
    return _token(opened["body"])


def _save(live_app: LiveApp, token: str, lines: str, mode: str = "online") -> httpx.Response:
    with live_app.http() as http:
        return http.post("/placements/settings", data={
            "form_token": token, "event_mode": mode, "lines": lines, "crm_create": "1"})


def _lines(member_id: str) -> list[str]:
    return [line["number"] for line in portal_row(member_id).settings.lines or []]


def _install_another(sandbox: Any, make_portal: Any, live_app: LiveApp) -> dict[str, Any]:
    other = make_portal()
    assert sandbox.install_app(other["member_id"], live_app.url)["status"] == 200
    sandbox.finish_install(other["member_id"])  # what the installer page's script does
    return other


def test_a_replayed_form_is_refused_and_changes_nothing(sandbox, installed, live_app):
    member_id = installed["member_id"]
    token = _open(sandbox, member_id)
    first = _save(live_app, token, "74950001 Sales")
    assert first.status_code == 200 and "Settings saved." in first.text

    replay = _save(live_app, token, "74959999 Replayed", mode="offline")
    assert replay.status_code == 403
    assert USED in replay.text
    # Refused inside the portal's own frame: the token's signature named that portal.
    assert replay.headers["Content-Security-Policy"] == \
        f"frame-ancestors http://{installed['domain']}"
    assert _lines(member_id) == ["74950001"]
    assert portal_row(member_id).settings.event_mode == "online"


def test_two_saves_in_a_row_from_the_fresh_page_both_work(sandbox, installed, live_app):
    member_id = installed["member_id"]
    token = _open(sandbox, member_id)
    first = _save(live_app, token, "74950001 Sales")
    assert first.status_code == 200
    fresh = _token(first.text)
    assert fresh != token
    second = _save(live_app, fresh, "74950001 Sales\n74950002 Support")
    assert second.status_code == 200 and "Settings saved." in second.text
    assert _lines(member_id) == ["74950001", "74950002"]


def test_a_form_posted_twice_at_once_saves_once(sandbox, installed, live_app):
    member_id = installed["member_id"]
    token = _open(sandbox, member_id)
    start, statuses = threading.Barrier(4), []

    def post(i: int) -> None:
        start.wait()
        statuses.append(_save(live_app, token, f"7495000{i}").status_code)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(statuses) == [200, 403, 403, 403]
    assert len(_lines(member_id)) == 1


def test_a_token_for_portal_a_cannot_write_portal_b(sandbox, installed, make_portal, live_app):
    a = installed
    b = _install_another(sandbox, make_portal, live_app)
    token_a = _open(sandbox, a["member_id"])
    b_before = portal_row(b["member_id"]).settings.lines

    # A's token with B's iframe query and member_id around it: it writes A, never B.
    with live_app.http() as http:
        resp = http.post(f"/placements/settings?DOMAIN={b['domain']}&PROTOCOL=0", data={
            "form_token": token_a, "member_id": b["member_id"], "lines": "74950001"})
    assert resp.status_code == 200
    assert _lines(a["member_id"]) == ["74950001"]
    assert portal_row(b["member_id"]).settings.lines == b_before

    # A's token with its payload rewritten to name B: the signature no longer matches.
    payload, stamp, signature = _token(resp.text).rsplit(".", 2)
    codec = URLSafeTimedSerializer("not-the-key")  # payload encoding only, no signing
    claims = codec.load_payload(payload.encode())
    claims.update(p=portal_row(b["member_id"]).id, m=b["member_id"])
    forged = f"{codec.dump_payload(claims).decode()}.{stamp}.{signature}"
    resp = _save(live_app, forged, "74958888")
    assert resp.status_code == 403 and "tampered" in resp.text
    assert resp.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
    assert portal_row(b["member_id"]).settings.lines == b_before


def test_a_form_of_a_portal_that_uninstalled_the_app_is_refused(sandbox, installed, live_app):
    member_id = installed["member_id"]
    token = _open(sandbox, member_id)
    portal_status.record(portal_row(member_id), PortalStatus.UNINSTALLED,
                         portal_status.reason_for(PortalStatus.UNINSTALLED))
    db.session.commit()
    resp = _save(live_app, token, "74950001")
    assert resp.status_code == 403 and "not installed on this portal any more" in resp.text
    assert _lines(member_id) == []


def test_a_form_of_a_deactivated_admin_is_refused(sandbox, installed, live_app):
    member_id = installed["member_id"]
    token = _open(sandbox, member_id)
    row = portal_row(member_id)
    admin = db.session.scalars(select(PortalUser).where(
        PortalUser.portal_id == row.id, PortalUser.user_id == 1)).one()
    admin.active = False  # what the next user sync records for a fired admin
    db.session.commit()
    resp = _save(live_app, token, "74950001")
    assert resp.status_code == 403 and "deactivated" in resp.text
    assert _lines(member_id) == []


class _Then(TimestampSigner):
    """A signer whose clock is ``TTL + 1 s`` behind: a token issued that long ago."""

    def get_timestamp(self) -> int:
        return int(time.time()) - form_token.TTL_SECONDS - 1


def test_an_expired_form_is_refused_inside_its_portal(sandbox, installed, live_app):
    member_id = installed["member_id"]
    row = portal_row(member_id)
    old = URLSafeTimedSerializer(live_app.app.config["SECRET_KEY"], salt=form_token.SALT,
                                 signer=_Then).dumps(
        {"p": row.id, "m": member_id, "u": 1, "n": "n" * 22})
    resp = _save(live_app, old, "74950001")
    assert resp.status_code == 403 and "expired" in resp.text
    assert resp.headers["Content-Security-Policy"] == \
        f"frame-ancestors http://{installed['domain']}"
    assert _lines(member_id) == []


def test_a_rejected_line_list_comes_back_with_a_fresh_token(sandbox, installed, live_app):
    member_id = installed["member_id"]
    resp = _save(live_app, _open(sandbox, member_id), "74950001 Sales\nnot/a/number")
    assert resp.status_code == 400 and "is not valid" in resp.text
    assert "74950001 Sales\nnot/a/number</textarea>" in resp.text  # nothing the admin typed is lost
    again = _save(live_app, _token(resp.text), "74950001 Sales")
    assert again.status_code == 200 and _lines(member_id) == ["74950001"]


def test_without_redis_a_form_is_refused_and_nothing_is_saved(app, make_app):
    # The nonce cannot be spent, so the save cannot be proven first: refuse, loudly, and keep all.
    cut_off = make_app(REDIS_URL="redis://127.0.0.1:1/0")
    with cut_off.app_context():
        portal = Portal(member_id="m-cut-off", domain="cut-off.example", status="active",
                        client_endpoint="https://cut-off.example/rest/")
        portal.settings = PortalSettings()
        db.session.add(portal)
        db.session.commit()
        token = form_token.issue(portal, 1)
    resp = cut_off.test_client().post("/placements/settings",
                                      data={"form_token": token, "lines": "74950001"})
    assert resp.status_code == 503 and "Try again in a minute" in resp.text
    assert resp.headers["Content-Security-Policy"] == "frame-ancestors https://cut-off.example"
    assert portal_row("m-cut-off").settings.lines == []
