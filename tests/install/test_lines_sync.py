"""External lines (issue 22 point 6, protocol §8.2): the settings' company numbers are added,
renamed, given the portal's CRM_AUTO_CREATE as the literal Y/N, and deleted when an
administrator removes them; lines a register auto-created are kept and named.

Real HTTP to the live app and the sandbox portal; a real worker runs the settings page's
setup and the dispatcher (the outbox executor), /install runs the direct one.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from app.bitrix.errors import ApiError
from app.dispatcher import Outcome, OutcomeKind, direct
from app.dispatcher.outcomes import describe
from app.extensions import db
from app.installation import plan, setup, upkeep
from tests.conftest import wait_for
from tests.install.conftest import LiveApp, portal_row
from tests.install.test_events import engines_listening

pytestmark = pytest.mark.timeout(180)

REG = {"USER_ID": 1, "PHONE_NUMBER": "+4930123456", "TYPE": 2,
       "CALL_START_DATE": "2026-12-07T10:20:30+03:00"}


@pytest.fixture
def worker(start_worker: Any, live_app: LiveApp, redis_client: Any) -> Any:
    """A real worker, configured for the sandbox, its dispatcher engine listening."""
    started = start_worker(threads=2, DISPATCH_SWEEP_INTERVAL="1", DISPATCH_LINGER_MS="0",
                           **live_app.worker_env())
    wait_for(lambda: engines_listening(redis_client), timeout=30)
    return started


def _lines(sandbox: Any, member_id: str) -> set[tuple[str, str, str]]:
    return {(line["NUMBER"], line["NAME"], line["CRM_AUTO_CREATE"])
            for line in sandbox.calls(member_id)["lines"]}


def _rest(member_id: str, method: str, params: dict[str, Any]) -> Any:
    """One call as the app makes it (the portal's stored chain, the direct client)."""
    return direct.call_method(portal_row(member_id), method, params)


def _token(body: str) -> str:
    match = re.search(r'name="form_token" value="([^"]+)"', body)
    assert match, body
    return match.group(1)


def _save(live_app: LiveApp, token: str, lines: str, crm: bool) -> str:
    """Save the settings form; the fresh form token of the page it answers with."""
    form = {"form_token": token, "event_mode": "online", "lines": lines}
    if crm:
        form["crm_create"] = "1"
    with live_app.http() as http:
        response: httpx.Response = http.post("/placements/settings", data=form)
    assert response.status_code == 200 and "Settings saved." in response.text, response.text
    return _token(response.text)


def test_install_adds_renames_and_names_auto_created_lines(sandbox, installed, live_app):
    member = installed["member_id"]
    _rest(member, "telephony.externalLine.add",
          {"NUMBER": "74950001", "NAME": "Old", "CRM_AUTO_CREATE": "Y"})
    _rest(member, "telephony.externalCall.register", {**REG, "LINE_NUMBER": "555"})
    assert ("555", "", "Y") in _lines(sandbox, member)  # auto-created, nameless
    portal = portal_row(member)
    portal.settings.lines = [{"number": "74950001", "name": "Sales"},
                             {"number": "74950002", "name": "Support"}]
    portal.settings.crm_create = False
    db.session.commit()

    assert sandbox.install_app(member, live_app.url)["status"] == 200  # the direct setup
    assert _lines(sandbox, member) == {("74950001", "Sales", "N"), ("74950002", "Support", "N"),
                                       ("555", "555", "N")}
    seen = len(sandbox.log(member))
    assert sandbox.install_app(member, live_app.url)["status"] == 200
    again = [e["method"] for e in sandbox.log(member)[seen:]]
    assert not [m for m in again if m.startswith("telephony.externalline.")
                and m != "telephony.externalline.get"], "nothing left to change"


def test_an_add_answered_line_already_exists_becomes_an_update(sandbox, installed):
    member = installed["member_id"]
    _rest(member, "telephony.externalCall.register", {**REG, "LINE_NUMBER": "74950001"})
    report = plan.SetupReport()
    writes = {"ln0": (plan.LINE_ADD, {"NUMBER": "74950001", "NAME": "Sales",
                                      "CRM_AUTO_CREATE": "N"})}
    setup._apply_writes(portal_row(member), writes, {"ln0": ("line", "74950001")}, report)
    assert (report.lines_added, report.lines_updated) == ([], ["74950001"])
    assert _lines(sandbox, member) == {("74950001", "Sales", "N")}


def test_the_settings_page_adds_renames_and_deletes_lines(
        sandbox, installed, live_app, worker, form_kind):
    member = installed["member_id"]
    _rest(member, "telephony.externalCall.register", {**REG, "LINE_NUMBER": "555"})
    opened = sandbox.open_placement(member)
    assert opened["status"] == 200, opened["body"]
    token = _save(live_app, _token(opened["body"]), "74950001 Sales\n74950002 Support",
                  crm=False)
    wanted = {("74950001", "Sales", "N"), ("74950002", "Support", "N"), ("555", "555", "N")}
    wait_for(lambda: _lines(sandbox, member) == wanted, timeout=60)

    # One line removed, one renamed, the CRM setting turned on: every line follows.
    _save(live_app, token, "74950001 Main", crm=True)
    wanted = {("74950001", "Main", "Y"), ("555", "555", "Y")}
    wait_for(lambda: _lines(sandbox, member) == wanted, timeout=60)
    deletes = sandbox.log(member, method="telephony.externalLine.delete")
    assert [(e["params"]["NUMBER"], e["status"]) for e in deletes] == [("74950002", 200)]


def test_an_outbox_add_of_an_existing_line_is_followed_by_an_update(sandbox, installed, worker):
    member = installed["member_id"]
    _rest(member, "telephony.externalCall.register", {**REG, "LINE_NUMBER": "74950009"})
    upkeep.submit_line(portal_row(member), plan.LINE_ADD,
                       {"NUMBER": "74950009", "NAME": "Night", "CRM_AUTO_CREATE": "N"})
    db.session.commit()
    wait_for(lambda: _lines(sandbox, member) == {("74950009", "Night", "N")}, timeout=60)


def test_a_delete_answered_could_not_find_line_counts_as_done(sandbox, installed):
    member = installed["member_id"]
    with pytest.raises(ApiError) as raised:  # the portal's real answer
        _rest(member, plan.LINE_DELETE, {"NUMBER": "74950404"})
    assert raised.value.description == "Could not find line with number 74950404"
    gone = Outcome(command_id=1, portal_id=1, method=plan.LINE_DELETE,
                   params={"NUMBER": "74950404"}, kind=OutcomeKind.DEAD,
                   error=describe(raised.value), reason=raised.value.description)
    assert upkeep.line_deleted(gone) is True
    other = Outcome(command_id=2, portal_id=1, method=plan.LINE_DELETE,
                    params={"NUMBER": "74950404"}, kind=OutcomeKind.DEAD,
                    error={"error": "ACCESS_DENIED", "error_description": "no"}, reason="no")
    assert upkeep.line_deleted(other) is False

