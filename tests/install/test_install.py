"""POST /install against the sandbox: bindings, placements, tokens, idempotence, bad input."""

from __future__ import annotations

import threading
from urllib.parse import urlencode, urlsplit

import httpx
import pytest
from sqlalchemy import select, text

from app.dispatcher import direct
from app.extensions import db
from app.installation import plan, setup, verify
from app.tenants.models import Portal
from app.tenants.users import PortalUser, extension_map
from tests.conftest import wait_for
from tests.install.conftest import CLIENT_SECRET, USERS, portal_count, portal_row


def _events(bound: dict) -> set[tuple[str, str]]:
    return {(b["event"], b["handler"]) for b in bound["events"]}


def test_install_binds_events_and_placements_and_finishes(sandbox, installed, live_app):
    member_id = installed["member_id"]
    result = installed["install"]
    assert installed["finish"]["install_finished"] is True
    assert "BX24.installFinish()" in result["body"]
    assert f'src="{live_app.app.config["B24_JS_SDK_URL"]}"' in result["body"]

    bound = sandbox.bindings(member_id)
    handler = plan.event_handler_url(member_id)  # /b24/events?k=<its handler key>
    assert _events(bound) == {(e, handler) for e in plan.EVENTS}
    placements = {(p["placement"], p["handler"]) for p in bound["placements"]}
    assert placements == {("TELEPHONY_ANALYTICS_MENU", live_app.url + "/placements/dashboard"),
                          ("CALL_CARD", live_app.url + "/placements/call-card")}
    assert sandbox.install_state(member_id)["install_finished"] is True


def test_install_stores_the_portal_with_encrypted_tokens(sandbox, installed):
    portal = portal_row(installed["member_id"])
    assert portal is not None and portal.status == "active"
    assert portal.client_endpoint == installed["client_endpoint"]
    assert portal.server_endpoint == installed["server_endpoint"]
    assert portal.application_token == installed["install"]["application_token"]
    # The installer's chain, then the one ONAPPINSTALL brought (the installing admin's).
    [onappinstall] = installed["finish"]["onappinstall"]
    assert portal.access_token == onappinstall["tokens"]["access_token"]
    assert portal.refresh_token == onappinstall["tokens"]["refresh_token"]
    assert portal.plan == "standard" and portal.installed_at is not None
    raw = db.session.execute(text("SELECT access_token, refresh_token, application_token "
                                  "FROM portals WHERE id = :id"), {"id": portal.id}).one()
    secrets = (portal.access_token, portal.refresh_token, portal.application_token)
    for stored, plain in zip(raw, secrets, strict=True):
        assert plain not in stored


def test_install_reads_the_extension_map(installed):
    portal = portal_row(installed["member_id"])
    assert extension_map(portal) == {"101": 1, "102": 2}
    users = {u.user_id: u for u in db.session.scalars(
        select(PortalUser).where(PortalUser.portal_id == portal.id))}
    assert set(users) == {u["id"] for u in USERS}
    assert users[1].is_admin and users[1].name == "Ada Admin"
    assert not users[2].is_admin


def test_enterprise_portal_gets_the_enterprise_plan(sandbox, make_portal, live_app):
    portal = make_portal(plan="enterprise")
    assert sandbox.install_app(portal["member_id"], live_app.url)["status"] == 200
    row = portal_row(portal["member_id"])
    assert (row.plan, row.rate_per_second, row.rate_burst) == ("enterprise", 5.0, 250)


def test_second_install_changes_nothing(sandbox, installed, live_app):
    member_id = installed["member_id"]
    before = sandbox.bindings(member_id)
    binds_before = len(sandbox.log(member_id, method="event.bind"))
    again = sandbox.install_app(member_id, live_app.url)
    assert again["status"] == 200 and again["install_finished"] is True
    after = sandbox.bindings(member_id)
    assert len(after["events"]) == len(before["events"])
    assert len(after["placements"]) == len(before["placements"])
    # Only ONAPPINSTALL is bound again: every install drops its binding (protocol §2.4).
    new_binds = sandbox.log(member_id, method="event.bind")[binds_before:]
    assert [e["params"].get("event") for e in new_binds] == ["ONAPPINSTALL"]
    assert portal_count() == 1
    assert portal_row(member_id).access_token == again["access_token"]


def test_reinstall_after_partial_unbind_binds_only_what_is_missing(sandbox, installed, live_app):
    member_id = installed["member_id"]
    portal = portal_row(member_id)
    from app.dispatcher import direct

    direct.call_method(portal, "event.unbind", {"event": "ONAPPUPDATE",
                                                 "handler": plan.event_handler_url(member_id)})
    seen = len(sandbox.log(member_id, method="event.bind"))
    assert sandbox.install_app(member_id, live_app.url)["status"] == 200
    new = sandbox.log(member_id, method="event.bind")[seen:]
    assert sorted(e["params"].get("event") for e in new) == ["ONAPPINSTALL", "ONAPPUPDATE"]


def test_install_adds_configured_lines_once(sandbox, installed, live_app):
    portal = portal_row(installed["member_id"])
    portal.settings.lines = [{"number": "74950001", "name": "Main"}]
    db.session.commit()
    for _ in range(2):
        assert sandbox.install_app(installed["member_id"], live_app.url)["status"] == 200
    lines = sandbox.calls(installed["member_id"])["lines"]
    assert [line["NUMBER"] for line in lines] == ["74950001"]


def _form(portal: dict, **override: str) -> dict[str, str]:
    tokens = portal
    form = {"AUTH_ID": tokens["access_token"], "AUTH_EXPIRES": "3600",
            "REFRESH_ID": tokens["refresh_token"], "SERVER_ENDPOINT": portal["server_endpoint"],
            "APPLICATION_TOKEN": portal["application_token"], "APPLICATION_SCOPE": portal["scope"],
            "member_id": portal["member_id"], "status": "P", "PLACEMENT": "DEFAULT"}
    if portal["iframe_form"] == "short":  # what real portals send (protocol §2.3)
        for key in ("SERVER_ENDPOINT", "APPLICATION_TOKEN", "APPLICATION_SCOPE"):
            del form[key]
    form.update(override)
    return {k: v for k, v in form.items() if v is not None}


def _post_install(live_app, portal: dict, domain: str | None = None,
                  **override: str | None) -> httpx.Response:
    """POST Bitrix24's install form for ``portal``; ``domain`` replaces the query's DOMAIN."""
    query = urlencode({"DOMAIN": domain or portal["domain"], "PROTOCOL": "0", "LANG": "en",
                       "APP_SID": "x"})
    with live_app.http() as http:
        return http.post("/install?" + query, data=_form(portal, **override))


def test_missing_fields_are_named_and_nothing_is_created(make_portal, live_app):
    portal = make_portal()
    resp = _post_install(live_app, portal, AUTH_ID=None, member_id=None)
    assert resp.status_code == 400
    assert "missing fields: AUTH_ID, member_id" in resp.text
    assert portal_count() == 0


def test_forged_auth_id_is_refused_and_nothing_is_created(sandbox, make_portal, live_app):
    portal = make_portal()
    resp = _post_install(live_app, portal, AUTH_ID="forged0123")
    assert resp.status_code == 401
    assert "rejected the access token" in resp.text
    assert "installFinish" not in resp.text
    assert portal_count() == 0
    assert sandbox.bindings(portal["member_id"])["events"] == []


def test_token_of_another_portal_is_refused(make_portal, live_app):
    victim, attacker = make_portal(), make_portal()
    resp = _post_install(live_app, victim, AUTH_ID=attacker["access_token"])
    assert resp.status_code == 403
    assert "another portal" in resp.text
    assert portal_count() == 0


def test_token_of_another_app_is_refused(make_portal, live_app):
    other = make_portal(client_id="app.someone-else", client_secret=CLIENT_SECRET)
    resp = _post_install(live_app, other)
    assert resp.status_code == 403
    assert "another application" in resp.text
    assert portal_count() == 0


def test_untrusted_auth_server_is_refused(make_portal, live_app):
    portal = make_portal()
    resp = _post_install(live_app, portal, SERVER_ENDPOINT="http://attacker.example/rest/")
    assert resp.status_code == 403
    assert "not a Bitrix24 authorization server this app trusts" in resp.text
    assert portal_count() == 0


def test_plain_http_to_an_https_configured_auth_server_is_refused(make_portal, live_app):
    """A trusted host named without a scheme is asked over https only, whatever the POST says."""
    portal = make_portal()
    sandbox_host = urlsplit(live_app.app.config["B24_AUTH_SERVERS"]).netloc
    live_app.app.config["B24_AUTH_SERVERS"] = sandbox_host  # a bare host: https
    resp = _post_install(live_app, portal, SERVER_ENDPOINT=f"http://{sandbox_host}/rest/")
    assert resp.status_code == 403, resp.text
    assert "asked over https only" in resp.text
    assert portal_count() == 0


def test_a_trusted_auth_server_at_another_path_is_refused(make_portal, live_app):
    """Only the auth server's ``/rest/`` is asked: the host alone is not enough."""
    portal = make_portal()
    trusted = live_app.app.config["B24_AUTH_SERVERS"]  # the sandbox's explicit http://
    for endpoint in (f"{trusted}/anything/", f"{trusted}/rest/#/x", f"{trusted}/rest/x/"):
        resp = _post_install(live_app, portal, SERVER_ENDPOINT=endpoint)
        assert resp.status_code == 403, (endpoint, resp.text)
        assert "address must be" in resp.text
    assert portal_count() == 0
    # The explicit http:// entry at its /rest/ still installs (the sandbox, make run).
    assert _post_install(live_app, portal, SERVER_ENDPOINT=f"{trusted}/rest/").status_code == 200


def test_install_page_may_be_framed_by_the_portal_only(make_portal, live_app):
    portal = make_portal()
    resp = _post_install(live_app, portal)
    assert resp.status_code == 200
    assert resp.headers["Content-Security-Policy"] == f"frame-ancestors http://{portal['domain']}"
    assert "X-Frame-Options" not in resp.headers


def test_a_non_admin_cannot_install_or_replace_the_admin_chain(sandbox, installed, live_app):
    member_id = installed["member_id"]
    before = portal_row(member_id).refresh_token
    user = sandbox.issue_tokens(member_id, user_id=2)
    portal = {**installed, **user}
    resp = _post_install(live_app, portal)
    assert resp.status_code == 403
    assert "only a portal administrator" in resp.text
    assert portal_row(member_id).refresh_token == before


def test_a_portal_error_during_install_does_not_finish_and_a_retry_does(sandbox, make_portal,
                                                                        live_app):
    portal = make_portal()
    sandbox.set_fault(portal["member_id"], "http_500", count=1)
    failed = sandbox.install_app(portal["member_id"], live_app.url)
    assert failed["status"] == 502 and "installFinish" not in failed["body"]  # the page won't
    assert "try again" in failed["body"]
    retried = sandbox.install_app(portal["member_id"], live_app.url)
    assert retried["status"] == 200 and "BX24.installFinish()" in retried["body"]
    assert portal_row(portal["member_id"]).status == "active"
    assert portal_count() == 1


def test_a_failed_setup_says_why_and_does_not_finish(sandbox, make_portal, live_app):
    portal = make_portal(scope="crm,placement,user_basic")  # no telephony: no CALL_CARD
    failed = sandbox.install_app(portal["member_id"], live_app.url)
    assert failed["status"] == 502 and "installFinish" not in failed["body"]
    row = portal_row(portal["member_id"])
    assert row.status == "installing"
    assert "Setup did not finish" in row.status_reason
    assert "telephony.externalLine.get" in row.status_reason


def test_a_domain_other_than_app_info_names_is_refused(make_portal, live_app):
    portal = make_portal()
    resp = _post_install(live_app, portal, domain="127.0.0.1:9")  # a host the attacker controls
    assert resp.status_code == 403
    assert "domain differs" in resp.text
    assert portal_count() == 0


def test_the_portal_address_is_taken_from_app_info_only(live_app):
    info = {"client_id": live_app.app.config["B24_CLIENT_ID"],
            "install": {"member_id": "m1", "domain": "x.bitrix24.com"}}
    with live_app.app.app_context():
        # Only install.domain named: its https REST base, and the posted DOMAIN must match it.
        verify._check_app_info(info, "m1", "x.bitrix24.com")
        assert verify.portal_endpoint(info) == "https://x.bitrix24.com/rest/"
        with pytest.raises(verify.TokenRejected, match="domain differs"):
            verify._check_app_info(info, "m1", "attacker.example")
        # Neither client_endpoint nor domain: refused, whatever the request says.
        bare = {**info, "install": {"member_id": "m1"}}
        with pytest.raises(verify.TokenRejected, match="did not name the portal's address"):
            verify._check_app_info(bare, "m1", "x.bitrix24.com")


def _write_portal_row(portal_id: int, wait_ms: int) -> None:
    """Another connection writes the portal row, waiting at most ``wait_ms`` for locks."""
    with db.engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text(f"SET lock_timeout = '{wait_ms}ms'"))
        else:
            conn.exec_driver_sql(f"PRAGMA busy_timeout={wait_ms}")
        conn.execute(text("UPDATE portals SET language = 'de' WHERE id = :id"), {"id": portal_id})
        conn.commit()


def test_setup_holds_no_lock_while_it_waits_for_the_portal(sandbox, installed, live_app):
    member_id = installed["member_id"]
    portal_id = portal_row(member_id).id
    sandbox.set_plan(member_id, "enterprise")  # setup will change the portal row (plan)
    direct.call_method(portal_row(member_id), "event.unbind",
                        {"event": "ONUSERADD", "handler": plan.event_handler_url(member_id)})
    sandbox.set_latency(member_id, 1500)
    sent = sandbox.counters(member_id)["rest_requests"]
    outcome: dict = {}

    def run() -> None:
        with live_app.app.app_context():
            try:
                outcome["report"] = setup.setup_portal(db.session.get(Portal, portal_id))
                db.session.commit()  # the caller (here: standing in for the actor) commits
            except Exception as exc:  # reported below
                outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:
        # The read batch is answered, the plan applied; the write batch is on the wire now.
        wait_for(lambda: (c := sandbox.counters(member_id))["rest_requests"] >= sent + 2
                 and c["in_flight"] == 1, timeout=10)
        _write_portal_row(portal_id, 300)
    finally:
        thread.join(30)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["report"].events_bound == ["ONUSERADD"]
    row = portal_row(member_id)
    assert row.plan == "enterprise" and row.language == "de"
