"""Lifecycle events an employee can forge (issue #10 points 2 and 3), through the real path.

Where a portal puts APPLICATION_TOKEN into every iframe form, any employee holds the
token that authenticates events, and their own iframe form hands them a token chain.
Each test sends what such an employee could send to /b24/events, lets a real worker
process it, and checks that Bitrix24 (the sandbox) was asked before anything changed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest
from sqlalchemy import func, select

from app.dispatcher import direct
from app.dispatcher.models import OutboxCommand
from app.extensions import db
from app.ingress.auth import issue_api_key
from app.ingress.models import InboxEvent, PortalApiKey
from app.installation import plan
from app.tenants.models import PortalSettings
from app.tenants.status import PortalUnavailable
from app.tenants.users import PortalUser
from tests.conftest import StubHandler, wait_for
from tests.install.conftest import iframe_form, portal_count, portal_row
from tests.install.test_events import engines_listening

PBX_START = {"call_id": "pbx-lifecycle-1", "event": "start", "at": "2026-11-22T16:40:00+03:00",
             "direction": "in", "phone": "+74951234567", "extensions": ["101"]}


@pytest.fixture
def worker(start_worker, live_app):
    """One real worker process, configured for the sandbox like the web app."""
    return start_worker(threads=2, **live_app.worker_env())


def _event(portal: dict[str, Any], name: str, data: dict[str, str], **auth: str) -> str:
    """An event body as Bitrix24 would POST it, with the portal's real application token."""
    fields = {"domain": portal["domain"], "server_endpoint": portal["server_endpoint"],
              "client_endpoint": portal["client_endpoint"], "member_id": portal["member_id"],
              "application_token": portal["application_token"], **auth}
    return urlencode({"event": name, **{f"data[{k}]": v for k, v in data.items()}, "ts": "1",
                      **{f"auth[{k}]": v for k, v in fields.items()}})


def _post(live_app, body: str) -> None:
    with live_app.http() as http:
        resp = http.post("/b24/events", content=body,
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 200, resp.text


def _processed(event_type: str) -> InboxEvent | None:
    """The newest inbox row of this event once a worker finished it (the install's own
    ONAPPINSTALL, processed by the ``installed`` fixture, is older)."""
    db.session.remove()
    row = db.session.scalars(select(InboxEvent).where(InboxEvent.event_type == event_type)
                             .order_by(InboxEvent.id.desc())).first()
    return row if row is not None and row.status in ("done", "dead") else None


def _pbx_settled(portal_id: int) -> None:
    """Wait until the fixture's PBX call is over on our side: its event handled and the
    call's commands (register, show) answered. A clean uninstall leaves a row a worker
    holds alone, and a command still queued would meet NOT_INSTALLED or PAYMENT_REQUIRED
    and move the portal's status before the test's own steps do."""
    def settled() -> bool:
        db.session.remove()
        events = db.session.scalar(select(func.count(InboxEvent.id)).where(
            InboxEvent.portal_id == portal_id, InboxEvent.source == "pbx",
            InboxEvent.status.in_(("received", "queued", "processing"))))
        commands = db.session.scalar(select(func.count(OutboxCommand.id)).where(
            OutboxCommand.portal_id == portal_id,
            OutboxCommand.status.in_(("queued", "inflight"))))
        return not events and not commands
    wait_for(settled, timeout=30)


def _pbx(live_app, key: str) -> int:
    """Status of a PBX call event sent with ``key``: 202 while the key is valid."""
    with live_app.http() as http:
        return http.post("/api/v1/calls/events", json=PBX_START,
                         headers={"Authorization": f"Bearer {key}"}).status_code


def _count(model: Any, portal_id: int) -> int:
    db.session.remove()
    return int(db.session.scalar(select(func.count(model.id))
                                 .where(model.portal_id == portal_id)) or 0)


def _tenant_data(portal_id: int) -> dict[str, int]:
    """How many rows of each kind of the portal's data exist."""
    return {model.__name__: _count(model, portal_id)
            for model in (PortalSettings, PortalUser, PortalApiKey, InboxEvent)}


def _plus_one_event(with_data: dict[str, Any]) -> dict[str, int]:
    """The portal's data as it was, plus the inbox row of the one event sent since."""
    return {**with_data["data"], "InboxEvent": with_data["data"]["InboxEvent"] + 1}


@pytest.fixture
def with_data(installed, live_app) -> dict[str, Any]:
    """An installed portal with settings, users, a PBX key and inbox rows."""
    row = portal_row(installed["member_id"])
    key = issue_api_key(row)
    assert _pbx(live_app, key) == 202  # one inbox row, and proof the key works
    data = _tenant_data(row.id)
    # Inbox rows: the PBX event, and the install's own ONAPPINSTALL.
    assert data == {"PortalSettings": 1, "PortalUser": 3, "PortalApiKey": 1, "InboxEvent": 2}
    return {**installed, "pbx_key": key, "portal_id": row.id, "data": data}


# ---------------------------------------------------------------- point 2: uninstall


def test_forged_onappuninstall_with_clean_changes_nothing(sandbox, with_data, live_app, worker):
    member_id = with_data["member_id"]
    _pbx_settled(with_data["portal_id"])
    before = portal_row(member_id)
    # Bitrix24 sends ONAPPUNINSTALL with no tokens: the application token is all it has.
    _post(live_app, _event(with_data, "ONAPPUNINSTALL", {"LANGUAGE_ID": "en", "CLEAN": "1"}))
    handled = wait_for(lambda: _processed("ONAPPUNINSTALL"), timeout=30)
    assert handled.status == "done", handled.last_error

    row = portal_row(member_id)
    assert row.status == "active"
    assert (row.refresh_token, row.token_version) == (before.refresh_token, before.token_version)
    assert _tenant_data(row.id) == _plus_one_event(with_data)  # + the forged event
    assert _pbx(live_app, with_data["pbx_key"]) == 202
    # The stored chain still works, and Bitrix24 still delivers to the app.
    bound = {b["event"] for b in direct.call_method(row, "event.get")}
    assert "ONAPPUNINSTALL" in bound
    assert sandbox.install_state(member_id)["installed"] is True
    assert "Bitrix24 did not confirm the uninstall" in worker.output()


def test_real_uninstall_with_clean_is_confirmed_and_deletes_the_data(sandbox, with_data, live_app,
                                                                      worker):
    member_id = with_data["member_id"]
    _pbx_settled(with_data["portal_id"])
    assert sandbox.uninstall_app(member_id, clean=True)["statuses"] == [200]
    # Not "status is uninstalled": a command meeting NOT_INSTALLED holds the portal so (its
    # chain kept) before the ONAPPUNINSTALL is handled, and the handler is what drops it all.
    handled = wait_for(lambda: _processed("ONAPPUNINSTALL"), timeout=30)
    assert handled.status == "done", handled.last_error
    row = portal_row(member_id)
    assert row.status == "uninstalled"
    assert row.access_token is None and row.refresh_token is None
    # Settings, users, the PBX key (intake's key cache forgets it within 5 s) and inbox rows;
    # the ONAPPUNINSTALL row itself stays, scrubbed, until retention prunes it.
    gone = {**dict.fromkeys(with_data["data"], 0), "InboxEvent": 1}
    wait_for(lambda: _tenant_data(row.id) == gone, timeout=10)
    db.session.remove()
    [left] = db.session.scalars(select(InboxEvent).where(InboxEvent.portal_id == row.id))
    assert (left.event_type, left.status) == ("ONAPPUNINSTALL", "done")
    assert "uninstall confirmed by Bitrix24" in worker.output()


@pytest.mark.parametrize("fault", ["html_502", "portal_deleted"])
def test_a_probe_that_gets_no_answer_is_retried_not_taken_as_proof(sandbox, with_data, live_app,
                                                                  worker, fault):
    """A transport failure or a 5xx while confirming is retried (the forgery stays harmless)."""
    member_id = with_data["member_id"]
    _pbx_settled(with_data["portal_id"])
    # The first probe gets a gateway page, or a JSON 500 whose code is no transient one.
    sandbox.set_fault(member_id, fault, count=1)
    _post(live_app, _event(with_data, "ONAPPUNINSTALL", {"LANGUAGE_ID": "en", "CLEAN": "1"}))
    handled = wait_for(lambda: _processed("ONAPPUNINSTALL"), timeout=30)
    assert (handled.status, handled.attempts) == ("done", 2)
    assert sandbox.counters(member_id)["faults_injected"] == 1
    row = portal_row(member_id)
    assert row.status == "active"
    assert _tenant_data(row.id) == _plus_one_event(with_data)


def test_uninstall_is_not_confirmed_by_a_lost_chain(sandbox, with_data, live_app, worker):
    """``invalid_grant`` on refresh looks the same for a lost chain: no proof, no deletion."""
    member_id = with_data["member_id"]
    _pbx_settled(with_data["portal_id"])
    row = portal_row(member_id)
    # The stored refresh token was spent elsewhere (a lost chain) and the access token has
    # expired, so asking Bitrix24 means a refresh, which answers invalid_grant.
    httpx.get(with_data["server_endpoint"].replace("/rest/", "/oauth/token/"), params={
        "grant_type": "refresh_token", "client_id": live_app.app.config["B24_CLIENT_ID"],
        "client_secret": live_app.app.config["B24_CLIENT_SECRET"],
        "refresh_token": row.refresh_token}).raise_for_status()
    row.expires_at = datetime.now(UTC) - timedelta(minutes=1)
    db.session.commit()
    _post(live_app, _event(with_data, "ONAPPUNINSTALL", {"LANGUAGE_ID": "en", "CLEAN": "1"}))
    wait_for(lambda: _processed("ONAPPUNINSTALL"), timeout=30)
    row = portal_row(member_id)
    assert row.status == "auth_failed"  # what the refresh truly found; not "uninstalled"
    assert _tenant_data(row.id) == _plus_one_event(with_data)


class _UninstallProbe(StubHandler):
    """An event handler that, on ONAPPUNINSTALL, tries the app's old chain at once."""

    chain: dict[str, str] = {}
    seen: dict[str, Any] = {}

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        form = dict(parse_qsl(self.rfile.read(length).decode()))
        if form.get("event") == "ONAPPUNINSTALL":
            chain = self.chain
            self.seen["rest"] = httpx.get(chain["client_endpoint"] + "app.info",
                                          params={"auth": chain["access_token"]}).json()
            self.seen["refresh"] = httpx.get(chain["token_url"], params={
                "grant_type": "refresh_token", "client_id": chain["client_id"],
                "client_secret": chain["client_secret"],
                "refresh_token": chain["refresh_token"]}).json()
        self.reply(200, b"ok")


@pytest.fixture
def uninstall_probe() -> Iterator[type[_UninstallProbe]]:
    """A loopback server recording what the old chain got while ONAPPUNINSTALL was in flight."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _UninstallProbe)
    _UninstallProbe.seen = {}
    _UninstallProbe.url = f"http://127.0.0.1:{server.server_port}/events"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield _UninstallProbe
    server.shutdown()
    server.server_close()


def test_sandbox_revokes_api_access_before_it_sends_onappuninstall(sandbox, installed, live_app,
                                                                   uninstall_probe):
    """Protocol §2.6: when ONAPPUNINSTALL arrives, API access is already revoked."""
    row = portal_row(installed["member_id"])
    cfg = live_app.app.config
    uninstall_probe.chain = {
        "client_endpoint": row.client_endpoint, "access_token": row.access_token,
        "refresh_token": row.refresh_token, "client_id": cfg["B24_CLIENT_ID"],
        "client_secret": cfg["B24_CLIENT_SECRET"],
        "token_url": installed["server_endpoint"].replace("/rest/", "/oauth/token/")}
    direct.call_method(row, "event.bind", {"event": "ONAPPUNINSTALL",
                                            "handler": uninstall_probe.url})
    assert sandbox.uninstall_app(installed["member_id"])["statuses"] == [200, 200]
    assert uninstall_probe.seen["rest"]["error"] == "NOT_INSTALLED"
    assert uninstall_probe.seen["refresh"]["error"] == "NOT_INSTALLED"


# ---------------------------------------------------------------- point 3: chain swap


def _non_admin_chain(sandbox, member_id: str) -> dict[str, str]:
    """The tokens a non-admin employee finds in their own iframe form (user 2 is no admin)."""
    opened = sandbox.open_placement(member_id, "DEFAULT", user_id=2)
    _, form = iframe_form(opened)
    return {"access_token": form["AUTH_ID"], "refresh_token": form["REFRESH_ID"],
            "expires_in": "3600", "user_id": "2"}


@pytest.mark.parametrize("event", ["ONAPPINSTALL", "ONAPPUPDATE"])
def test_a_non_admins_tokens_do_not_replace_the_chain(sandbox, installed, live_app, worker, event):
    member_id = installed["member_id"]
    before = portal_row(member_id)
    _post(live_app, _event(installed, event, {"VERSION": "2"},
                           **_non_admin_chain(sandbox, member_id)))
    wait_for(lambda: _processed(event), timeout=30)

    row = portal_row(member_id)
    assert (row.refresh_token, row.token_version, row.auth_user_id) == \
        (before.refresh_token, before.token_version, before.auth_user_id)
    # The app still acts as the admin: admin-only methods succeed with the stored chain.
    assert direct.call_method(row, "placement.get")
    assert direct.call_method(row, "event.get")
    assert "who is not an administrator" in worker.output()


def test_a_non_admin_cannot_be_the_first_contact(sandbox, make_portal, live_app, worker):
    """A first ONAPPINSTALL from a non-admin would fix the application token (a lock-out)."""
    portal = make_portal()
    tokens = sandbox.issue_tokens(portal["member_id"], user_id=2)
    _post(live_app, _event({**portal, "application_token": "chosen-by-the-employee"},
                           "ONAPPINSTALL", {"VERSION": "1"},
                           access_token=tokens["access_token"],
                           refresh_token=tokens["refresh_token"], user_id="2"))
    wait_for(lambda: _processed("ONAPPINSTALL"), timeout=30)
    assert portal_count() == 0


def test_an_admins_first_contact_survives_a_portal_that_does_not_answer(sandbox, make_portal,
                                                                        live_app, worker):
    """user.admin getting a gateway page is asked again later, not taken as a no."""
    portal = make_portal()
    tokens = sandbox.issue_tokens(portal["member_id"], user_id=1)
    sandbox.set_fault(portal["member_id"], "html_502", count=1)
    _post(live_app, _event(portal, "ONAPPINSTALL", {"VERSION": "1"},
                           access_token=tokens["access_token"],
                           refresh_token=tokens["refresh_token"], user_id="1"))
    row = wait_for(lambda: (r := portal_row(portal["member_id"])) and r.refresh_token and r,
                   timeout=30)
    assert row.application_token == portal["application_token"]
    assert sandbox.counters(portal["member_id"])["faults_injected"] == 1


# ---------------------------------------------------------------- a lapsed portal's uninstall


def _lapse(sandbox, member_id: str, renew: bool = True) -> None:
    """The app's subscription ends, and the app learns it from a call: payment_required.

    ``renew``: the admin then renews it on the portal (Bitrix24 sends no events while it
    is unpaid) but opens no app page, so the app still holds the portal as payment_required.
    """
    sandbox.set_subscription(member_id, False)
    with pytest.raises(PortalUnavailable):
        direct.call_method(portal_row(member_id), "app.info")
    assert portal_row(member_id).status == "payment_required"
    if renew:
        sandbox.set_subscription(member_id, True)


def test_a_lapsed_portals_real_uninstall_is_confirmed_and_deletes_the_data(sandbox, with_data,
                                                                         live_app, worker):
    member_id = with_data["member_id"]
    _pbx_settled(with_data["portal_id"])
    _lapse(sandbox, member_id)
    assert sandbox.uninstall_app(member_id, clean=True)["statuses"] == [200]
    handled = wait_for(lambda: _processed("ONAPPUNINSTALL"), timeout=30)
    assert handled.status == "done", handled.last_error
    row = portal_row(member_id)
    assert row.status == "uninstalled"
    assert row.access_token is None and row.refresh_token is None
    gone = {**dict.fromkeys(with_data["data"], 0), "InboxEvent": 1}
    wait_for(lambda: _tenant_data(row.id) == gone, timeout=10)
    assert "uninstall confirmed by Bitrix24" in worker.output()


@pytest.fixture
def rechecking_worker(start_worker, live_app):
    """A worker whose periodic uninstall recheck runs each second, its backoff 2 s, then 4 s."""
    return start_worker(threads=2, periodic=True, UNINSTALL_RECHECK_HOURS=str(2 / 3600),
                        UNINSTALL_RECHECK_INTERVAL="1", **live_app.worker_env())


def test_a_lapsed_uninstall_still_answered_payment_required_is_asked_again_later(
        sandbox, with_data, live_app, rechecking_worker):
    member_id = with_data["member_id"]
    _pbx_settled(with_data["portal_id"])
    _lapse(sandbox, member_id)
    # Bitrix24 still answers PAYMENT_REQUIRED to the first ask after the uninstall.
    sandbox.set_fault(member_id, "payment_required", count=1, methods=["app.info"])
    assert sandbox.uninstall_app(member_id, clean=True)["statuses"] == [200]
    handled = wait_for(lambda: _processed("ONAPPUNINSTALL"), timeout=30)
    assert handled.status == "done", handled.last_error
    assert portal_row(member_id).status == "payment_required"  # not yet: asked again later
    assert "asked again later" in rechecking_worker.output()
    # Within the backoff the next ask gets NOT_INSTALLED: uninstalled, CLEAN=1 honoured.
    # The ONAPPUNINSTALL row was finished before: it goes with the rest.
    row = wait_for(lambda: (r := portal_row(member_id)).status == "uninstalled" and r, timeout=30)
    wait_for(lambda: _tenant_data(row.id) == dict.fromkeys(with_data["data"], 0), timeout=10)
    assert "uninstall confirmed by Bitrix24 on a later ask" in rechecking_worker.output()


def test_a_forged_uninstall_of_a_lapsed_portal_changes_nothing(sandbox, with_data, live_app,
                                                              rechecking_worker):
    member_id = with_data["member_id"]
    _pbx_settled(with_data["portal_id"])
    _lapse(sandbox, member_id, renew=False)
    before = sandbox.counters(member_id)["rest_requests"]
    _post(live_app, _event(with_data, "ONAPPUNINSTALL", {"LANGUAGE_ID": "en", "CLEAN": "1"}))
    handled = wait_for(lambda: _processed("ONAPPUNINSTALL"), timeout=30)
    assert handled.status == "done", handled.last_error
    # Asked now, and again after each backoff (2 s, 4 s): PAYMENT_REQUIRED every time.
    wait_for(lambda: sandbox.counters(member_id)["rest_requests"] >= before + 3, timeout=30)
    row = portal_row(member_id)
    assert row.status == "payment_required"
    assert row.refresh_token is not None
    assert _tenant_data(row.id) == _plus_one_event(with_data)
    assert sandbox.install_state(member_id)["installed"] is True


def test_the_old_application_token_stores_nothing_after_a_confirmed_uninstall(
        sandbox, with_data, live_app, worker):
    """A wiped tenant takes no more events: the token an employee kept is dropped with it."""
    member_id = with_data["member_id"]
    _pbx_settled(with_data["portal_id"])
    assert sandbox.uninstall_app(member_id, clean=True)["statuses"] == [200]
    wait_for(lambda: _processed("ONAPPUNINSTALL"), timeout=30)
    row = portal_row(member_id)
    assert row.status == "uninstalled"
    left = _tenant_data(row.id)
    with live_app.http() as http:
        resp = http.post("/b24/events", content=_event(with_data, "ONCRMDEALUPDATE", {"ID": "7"}),
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 401, resp.text
    assert _tenant_data(row.id) == left
    row = portal_row(member_id)
    assert row.application_token is None and row.application_token_hash is None


# ---------------------------------------------------------------- ONAPPUPDATE at will


@pytest.fixture
def setup_worker(start_worker, live_app, redis_client):
    """A worker re-running a portal's setup at most once per 8 s, its engine listening."""
    started = start_worker(threads=2, SETUP_RERUN_INTERVAL="8", **live_app.worker_env())
    wait_for(lambda: engines_listening(redis_client), timeout=30)
    return started


def _bound(sandbox, member_id: str) -> set[str]:
    return {b["event"] for b in sandbox.bindings(member_id)["events"]}


def _updates_done(count: int) -> bool:
    db.session.remove()
    return int(db.session.scalar(select(func.count(InboxEvent.id)).where(
        InboxEvent.event_type == "ONAPPUPDATE", InboxEvent.status == "done")) or 0) >= count


def test_onappupdate_with_only_the_application_token_reruns_setup_once_per_interval(
        sandbox, installed, live_app, setup_worker):
    """An employee repeating ONAPPUPDATE gets the whole setup re-run once per interval only."""
    member_id = installed["member_id"]
    missing = {"event": "ONEXTERNALCALLSTART", "handler": plan.event_handler_url(member_id)}
    update = {"VERSION": "2", "PREVIOUS_VERSION": "1", "LANGUAGE_ID": "en"}
    direct.call_method(portal_row(member_id), "event.unbind", missing)
    _post(live_app, _event(installed, "ONAPPUPDATE", update))
    started = time.monotonic()
    wait_for(lambda: "ONEXTERNALCALLSTART" in _bound(sandbox, member_id), timeout=30)
    took = time.monotonic() - started

    # Within the interval: acknowledged, handled, and the setup is not run again.
    direct.call_method(portal_row(member_id), "event.unbind", missing)
    for n in range(2, 6):
        _post(live_app, _event(installed, "ONAPPUPDATE", {**update, "n": str(n)}))
    wait_for(lambda: _updates_done(5), timeout=30)
    time.sleep(max(2.0, 2 * took))  # what the first re-run took, twice over
    assert "ONEXTERNALCALLSTART" not in _bound(sandbox, member_id)
    assert setup_worker.output().count("setup already re-run") == 4

    # After the interval the next one runs it again.
    time.sleep(max(0.0, 8.5 - (time.monotonic() - started)))
    _post(live_app, _event(installed, "ONAPPUPDATE", {**update, "n": "6"}))
    wait_for(lambda: "ONEXTERNALCALLSTART" in _bound(sandbox, member_id), timeout=30)
