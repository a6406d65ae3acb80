"""The reads the self-diagnosis asks for (issue 24 point 6) and the controls that seed its
faults: ``scope`` (docs: the app's granted scopes, ``full=true`` all of them),
``voximplant.line.outgoing.get`` (docs: the default outgoing line's id, digits for a rented
number, ``reg…``/``sip…`` for a SIP PBX; the voximplant source: ``REST_APP:<app id>`` for an
app, an app's line by its number, ``LINK_BASE_NUMBER`` when the stored choice names no line),
and a portal clock that is off (every REST ``time`` block shows it)."""

from __future__ import annotations

import time
from datetime import datetime

from .conftest import USERS, call

HANDLER = "https://app.example.com/b24/events"


def _result(response) -> object:
    body = response.json()
    assert response.status_code == 200, body
    return body["result"]


def _outgoing(http, portal, token=None) -> object:
    return _result(call(http, portal, "voximplant.line.outgoing.get", token))


def test_scope_lists_the_granted_scopes_and_follows_a_change(sandbox, portal, http):
    assert _result(call(http, portal, "scope")) == ["crm", "telephony", "placement", "user_basic"]
    full = _result(call(http, portal, "scope", full="true"))
    assert {"crm", "telephony", "placement", "user_basic", "user", "call"} <= set(full)
    sandbox.set_scope(portal["member_id"], "telephony, placement,user_basic")
    assert _result(call(http, portal, "scope")) == ["telephony", "placement", "user_basic"]
    refused = call(http, portal, "crm.lead.list")
    assert refused.status_code == 403 and refused.json()["error"] == "insufficient_scope"
    assert sandbox.portal(portal["member_id"])["scope"] == "telephony,placement,user_basic"


def test_the_default_line_is_the_app_only_while_it_takes_click_to_call(sandbox, portal, http):
    # Without an ONEXTERNALCALLSTART binding the app is no line at all.
    assert _outgoing(http, portal) == "LINK_BASE_NUMBER"
    call(http, portal, "event.bind", event="ONEXTERNALCALLSTART", handler=HANDLER)
    assert _outgoing(http, portal) == "REST_APP:1"
    call(http, portal, "telephony.externalLine.add", NUMBER="4930555", NAME="Main")
    assert _outgoing(http, portal) == "4930555"
    assert sandbox.portal(portal["member_id"])["outgoing_line"] == "4930555"


def test_an_administrator_may_choose_another_line(sandbox, portal, http):
    call(http, portal, "event.bind", event="ONEXTERNALCALLSTART", handler=HANDLER)
    call(http, portal, "telephony.externalLine.add", NUMBER="555")
    for chosen in ("sip12", "reg3", "74951234567", "REST_APP:9"):
        sandbox.set_outgoing_line(portal["member_id"], chosen)
        assert _outgoing(http, portal) == chosen
    sandbox.set_outgoing_line(portal["member_id"], None)
    assert _outgoing(http, portal) == "555"
    # An app line chosen, then deleted: the stored choice names nothing any more.
    call(http, portal, "telephony.externalLine.add", NUMBER="777")
    sandbox.set_outgoing_line(portal["member_id"], "777")
    assert _outgoing(http, portal) == "777"
    call(http, portal, "telephony.externalLine.delete", NUMBER="777")
    assert _outgoing(http, portal) == "LINK_BASE_NUMBER"


def test_the_default_line_needs_telephony_and_the_line_permission(sandbox, portal, http):
    employee = sandbox.issue_tokens(portal["member_id"], user_id=USERS[1]["id"])["access_token"]
    refused = call(http, portal, "voximplant.line.outgoing.get", employee)
    assert refused.status_code == 403 and refused.json()["error"] == "ACCESS_DENIED"
    sandbox.set_scope(portal["member_id"], "crm,placement,user_basic")
    refused = call(http, portal, "voximplant.line.outgoing.get")
    assert refused.status_code == 403 and refused.json()["error"] == "insufficient_scope"


def _portal_clock(block: dict) -> float:
    return datetime.fromisoformat(block["date_start"]).timestamp()


def test_a_skewed_clock_shows_in_every_time_block(sandbox, portal, http):
    sandbox.set_clock_skew(portal["member_id"], 600)
    before = time.time()
    single = call(http, portal, "app.info").json()["time"]
    batch = call(http, portal, "batch", cmd={"a": "app.info", "s": "scope"}).json()
    after = time.time()
    for block in (single, batch["time"], batch["result"]["result_time"]["a"]):
        assert before + 599 <= _portal_clock(block) <= after + 601, block
        assert before + 599 <= block["start"] <= after + 601
        assert 0 <= block["duration"] < 5
    assert single["operating_reset_at"] >= before + 600 + 599
    assert sandbox.portal(portal["member_id"])["clock_skew"] == 600
    sandbox.set_clock_skew(portal["member_id"], 0)
    assert abs(_portal_clock(call(http, portal, "app.info").json()["time"]) - time.time()) < 2
