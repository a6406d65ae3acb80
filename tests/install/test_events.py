"""Lifecycle events through the real path: sandbox → /b24/events → inbox → worker → handler."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest
from sqlalchemy import delete, func, select

from app.dispatcher import nudge
from app.extensions import db
from app.ingress.models import InboxEvent
from app.installation import events, plan, upkeep, user_sync
from app.tenants.models import PortalSettings
from app.tenants.users import PortalUser
from tests.conftest import wait_for
from tests.install.conftest import portal_count, portal_row


def _handled(event_type: str, count: int = 1) -> bool:
    db.session.remove()
    rows = db.session.scalars(select(InboxEvent).where(InboxEvent.event_type == event_type))
    done = [r for r in rows if r.status in ("done", "dead", "skipped")]
    return len(done) >= count


@pytest.fixture
def worker(start_worker, live_app, redis_client):
    """One real worker process, configured for the sandbox like the web app, its dispatcher
    engine listening (a nudge sent before that waits for the periodic sweep)."""
    started = start_worker(threads=2, **live_app.worker_env())
    wait_for(lambda: engines_listening(redis_client), timeout=30)
    return started


def engines_listening(redis_client) -> int:
    """How many dispatcher engines are subscribed to the nudge channel."""
    [(_, count)] = redis_client.pubsub_numsub(nudge.channel(redis_client))
    return int(count)


def test_onappinstall_first_contact_stores_the_application_token(sandbox, make_portal,
                                                                  live_app, worker):
    portal = make_portal()
    # The installer URL answers 405, so ONAPPINSTALL is the first thing the app learns.
    out = sandbox.install_app(portal["member_id"], live_app.url, send_onappinstall=True,
                              install_url=live_app.url + "/healthz")
    assert out["onappinstall"][0]["status"] == 200
    row = wait_for(lambda: (r := portal_row(portal["member_id"])) and r.refresh_token and r,
                   timeout=30)
    assert row.application_token == portal["application_token"]
    assert row.access_token
    assert row.client_endpoint == portal["client_endpoint"]


def test_forged_onappinstall_is_not_trusted(sandbox, make_portal, live_app, worker):
    portal = make_portal()
    body = urlencode({
        "event": "ONAPPINSTALL", "data[VERSION]": "1", "ts": "1",
        "auth[access_token]": "forged-token", "auth[refresh_token]": "forged-refresh",
        "auth[expires_in]": "3600", "auth[domain]": portal["domain"],
        "auth[server_endpoint]": portal["server_endpoint"],
        "auth[client_endpoint]": portal["client_endpoint"], "auth[member_id]": portal["member_id"],
        "auth[application_token]": "attacker-chosen"})
    with live_app.http() as http:
        resp = http.post("/b24/events", content=body,
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 200  # accepted provisionally, verified by the worker
    wait_for(lambda: _handled("ONAPPINSTALL"), timeout=30)
    assert portal_count() == 0


def test_uninstall_marks_the_portal_and_reinstall_restores_it(sandbox, installed, live_app,
                                                              worker):
    member_id = installed["member_id"]
    out = sandbox.uninstall_app(member_id, clean=False)
    assert out["statuses"] == [200]
    wait_for(lambda: portal_row(member_id).status == "uninstalled", timeout=30)
    row = portal_row(member_id)
    assert row.access_token is None and row.refresh_token is None
    assert db.session.scalar(select(func.count(PortalUser.id))
                             .where(PortalUser.portal_id == row.id)) == 3

    # Installing again brings it back: same row, a fresh chain, bindings restored.
    again = sandbox.install_app(member_id, live_app.url)
    assert again["status"] == 200 and again["install_pending"]
    [onappinstall] = sandbox.finish_install(member_id)["onappinstall"]  # the page's installFinish
    wait_for(lambda: _handled("ONAPPINSTALL", 2), timeout=30)  # the reinstall's, by the worker
    row = portal_row(member_id)
    assert row.status == "active"
    assert row.refresh_token == onappinstall["tokens"]["refresh_token"]
    # A new installation, a new application token: the installer form's or ONAPPINSTALL's.
    assert again["application_token"] != installed["application_token"]
    assert row.application_token == again["application_token"]
    assert len(sandbox.bindings(member_id)["events"]) == len(plan.EVENTS)
    assert portal_count() == 1


def test_uninstall_with_clean_deletes_the_portal_data(sandbox, installed, worker):
    member_id = installed["member_id"]
    assert sandbox.uninstall_app(member_id, clean=True)["statuses"] == [200]
    wait_for(lambda: portal_row(member_id).status == "uninstalled", timeout=30)
    row = portal_row(member_id)
    wait_for(lambda: db.session.scalar(select(func.count(PortalUser.id))
                                       .where(PortalUser.portal_id == row.id)) == 0)
    assert db.session.scalar(select(func.count(PortalSettings.id))
                             .where(PortalSettings.portal_id == row.id)) == 0
    assert portal_count() == 1


def test_onuseradd_reads_the_new_users_extension(sandbox, installed, worker):
    member_id = installed["member_id"]
    # Forget user 2, as if they joined after the install; the event brings them back.
    db.session.execute(delete(PortalUser).where(PortalUser.user_id == 2))
    db.session.commit()
    out = sandbox.trigger_event(member_id, "ONUSERADD", {"ID": "2", "NAME": "Bob"})
    assert out["statuses"] == [200]
    wait_for(lambda: _handled("ONUSERADD"), timeout=30)
    # The handler submitted user.get; the dispatcher's answer fills the map just after.
    user = wait_for(lambda: _user(member_id, 2), timeout=30)
    assert user.extension == "102"


def _user(member_id: str, user_id: int) -> PortalUser | None:
    row = portal_row(member_id)
    return db.session.scalars(select(PortalUser).where(PortalUser.portal_id == row.id,
                                                       PortalUser.user_id == user_id)).first()


def test_handlers_are_idempotent(sandbox, installed, app):
    # Uninstalled on the portal (no worker runs here: the handler is called directly twice).
    sandbox.uninstall_app(installed["member_id"], clean=True)
    row = portal_row(installed["member_id"])
    event = {"event": "ONAPPUNINSTALL", "data": {"CLEAN": "1"}, "auth": {}}
    events.on_app_uninstall(row, event)
    db.session.commit()  # inbox processing commits a handler's writes
    events.on_app_uninstall(portal_row(installed["member_id"]), event)
    db.session.commit()
    assert portal_row(installed["member_id"]).status == "uninstalled"
    user_event = {"event": "ONUSERADD", "data": {"ID": "1"}, "auth": {}}
    events.on_user_add(None, user_event)  # unknown portal: nothing to do


def test_onappupdate_binds_what_went_missing_and_keeps_the_new_chain(sandbox, installed,
                                                                     live_app, worker):
    member_id = installed["member_id"]
    from app.dispatcher import direct

    direct.call_method(portal_row(member_id), "event.unbind",
                        {"event": "ONEXTERNALCALLSTART",
                         "handler": plan.event_handler_url(member_id)})
    version = portal_row(member_id).token_version
    out = sandbox.trigger_event(member_id, "ONAPPUPDATE",
                                {"VERSION": "2", "PREVIOUS_VERSION": "1", "LANGUAGE_ID": "en"})
    assert out["statuses"] == [200]
    wait_for(lambda: _handled("ONAPPUPDATE"), timeout=30)
    # Also ONAPPINSTALL: the update dropped its binding (protocol §2.4) and setup restored it
    # (through the dispatcher: the reads, then the bindings still missing).
    wait_for(lambda: {b["event"] for b in sandbox.bindings(member_id)["events"]}
             == set(plan.EVENTS), timeout=30)
    assert portal_row(member_id).token_version > version


def test_user_resync_reads_extensions_without_refreshing(installed, app, worker):
    from datetime import UTC, datetime, timedelta

    row = portal_row(installed["member_id"])
    assert user_sync.portals_with_live_tokens() == [row.id]
    version = row.token_version
    db.session.execute(delete(PortalUser))
    db.session.commit()
    upkeep.submit_user_sync(portal_row(installed["member_id"]))
    db.session.commit()
    wait_for(lambda: _user_count() == 3, timeout=30)
    assert portal_row(installed["member_id"]).token_version == version
    row = portal_row(installed["member_id"])
    row.expires_at = datetime.now(UTC) - timedelta(minutes=1)
    db.session.commit()
    assert user_sync.portals_with_live_tokens() == []


def _user_count() -> int:
    db.session.remove()  # a new transaction: see what the worker committed since
    return int(db.session.scalar(select(func.count(PortalUser.id))) or 0)


def _onappinstall(portal: dict, tokens: dict, **auth: str) -> str:
    fields = {"access_token": tokens["access_token"], "refresh_token": tokens["refresh_token"],
              "expires_in": "3600", "domain": portal["domain"],
              "server_endpoint": portal["server_endpoint"],
              "client_endpoint": portal["client_endpoint"], "member_id": portal["member_id"],
              "user_id": "1", "application_token": portal["application_token"], **auth}
    return urlencode({"event": "ONAPPINSTALL", "data[VERSION]": "1", "ts": "1",
                      **{f"auth[{k}]": v for k, v in fields.items()}})


def _post_event(live_app, body: str) -> None:
    with live_app.http() as http:
        resp = http.post("/b24/events", content=body,
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 200


def test_onappinstall_client_endpoint_is_taken_from_app_info(sandbox, make_portal, live_app,
                                                             worker):
    portal = make_portal()
    tokens = sandbox.issue_tokens(portal["member_id"], user_id=1)
    # A real token, but the event names another host as the REST base: it is not used.
    _post_event(live_app, _onappinstall(portal, tokens,
                                        client_endpoint="http://127.0.0.1:9/rest/"))
    row = wait_for(lambda: (r := portal_row(portal["member_id"])) and r.refresh_token and r,
                   timeout=30)
    assert row.client_endpoint == portal["client_endpoint"]
    assert row.domain == portal["domain"]


def test_onappinstall_naming_another_domain_is_refused(sandbox, make_portal, live_app, worker):
    portal = make_portal()
    tokens = sandbox.issue_tokens(portal["member_id"], user_id=1)
    _post_event(live_app, _onappinstall(portal, tokens, domain="127.0.0.1:9",
                                        client_endpoint="http://127.0.0.1:9/rest/"))
    wait_for(lambda: _handled("ONAPPINSTALL"), timeout=30)
    assert portal_count() == 0
