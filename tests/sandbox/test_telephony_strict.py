"""Telephony as the platform does it (issue #11 point 5): register dedup only for active calls,
countable duplicates, CALL_STATUS from DURATION, click-to-call with the full field set.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl

from .conftest import call
from .test_sandbox_events import installed

REG = {"USER_ID": 1, "PHONE_NUMBER": "+4930123456", "TYPE": 2, "LINE_NUMBER": "7",
       "EXTERNAL_CALL_ID": "pbx-1"}
CLICK_FIELDS = ["PHONE_NUMBER", "PHONE_NUMBER_INTERNATIONAL", "EXTENSION", "USER_ID",
                "CALL_LIST_ID", "LINE_NUMBER", "IS_MOBILE", "CALL_ID", "CRM_ENTITY_TYPE",
                "CRM_ENTITY_ID"]


def _leads(http, portal):
    return call(http, portal, "crm.lead.list").json()["result"]


def _register(http, portal, **kw):
    return call(http, portal, "telephony.externalCall.register", **{**REG, **kw}).json()["result"]


def _finish(http, portal, call_id, **kw):
    params = {"CALL_ID": call_id, "USER_ID": 1, **kw}
    return call(http, portal, "telephony.externalCall.finish", **params).json()["result"]


def test_re_registering_a_finished_call_creates_a_second_call_and_activity(sandbox, portal,
                                                                            http):
    # a known client: only a call bound to a CRM entity gets an activity (§8.5)
    sandbox.add_crm(portal["member_id"], "contact",
                    {"NAME": "Ann", "PHONE": [{"VALUE": REG["PHONE_NUMBER"]}]})
    first = _register(http, portal)["CALL_ID"]
    assert _register(http, portal)["CALL_ID"] == first  # still active: the same call
    done = _finish(http, portal, first, DURATION=30)
    again = _register(http, portal)["CALL_ID"]  # the PBX resent it after the finish
    assert again != first
    assert _finish(http, portal, again, DURATION=30)["CRM_ACTIVITY_ID"] != done["CRM_ACTIVITY_ID"]
    assert len(sandbox.calls(portal["member_id"])["finished"]) == 2
    assert len(call(http, portal, "crm.activity.list").json()["result"]) == 2
    log = sandbox.log(portal["member_id"], method="telephony.externalcall.register")
    assert [(e["external_call_id"], e["created"]) for e in log] == \
        [("pbx-1", True), ("pbx-1", False), ("pbx-1", True)]
    assert sandbox.counters(portal["member_id"])["duplicate_calls"] == 1


def test_dedup_key_is_user_number_type_line_and_external_id(sandbox, portal, http):
    first = _register(http, portal)["CALL_ID"]
    by_extension = _register(http, portal, USER_ID=None, USER_PHONE_INNER="101")
    assert by_extension["CALL_ID"] == first  # the same resolved user
    for change in ({"USER_ID": 2}, {"PHONE_NUMBER": "+4930999"}, {"TYPE": 1},
                   {"LINE_NUMBER": "8"}, {"EXTERNAL_CALL_ID": "pbx-2"}):
        assert _register(http, portal, **change)["CALL_ID"] != first, change
    # Four of those new calls reused pbx-1: each counts as a duplicate of that PBX call.
    assert sandbox.counters(portal["member_id"])["duplicate_calls"] == 4


def test_dedup_window_runs_from_the_earlier_calls_start_date(portal, http):
    old = (datetime.now(UTC) - timedelta(minutes=31)).isoformat(timespec="seconds")
    first = _register(http, portal, CALL_START_DATE=old, EXTERNAL_CALL_ID="late")["CALL_ID"]
    assert _register(http, portal, EXTERNAL_CALL_ID="late")["CALL_ID"] != first


def test_call_status_follows_duration_not_status_code(portal, http):
    talked = _finish(http, portal, _register(http, portal, EXTERNAL_CALL_ID="a")["CALL_ID"],
                     DURATION=12, STATUS_CODE="486")
    assert (talked["CALL_STATUS"], talked["CALL_FAILED_CODE"]) == (1, "486")
    missed = _finish(http, portal, _register(http, portal, EXTERNAL_CALL_ID="b")["CALL_ID"],
                     STATUS_CODE="200")
    assert (missed["CALL_STATUS"], missed["CALL_FAILED_CODE"]) == (0, "200")


def _click(sandbox, fake_app, http, data, line_auto="Y"):
    p = installed(sandbox, fake_app)
    call(http, p, "telephony.externalLine.add", NUMBER="7", CRM_AUTO_CREATE=line_auto)
    call(http, p, "event.bind", event="ONEXTERNALCALLSTART", handler=fake_app.url + "/b24/events")
    sandbox.trigger_event(p["member_id"], "ONEXTERNALCALLSTART", data, user_id=15)
    body = fake_app.paths("/b24/events")[-1].body.decode()
    pairs = [(k[5:-1], v) for k, v in parse_qsl(body, keep_blank_values=True)
             if k.startswith("data[")]
    return p, pairs


def test_click_to_call_registers_first_and_sends_every_field_in_order(sandbox, fake_app, http):
    p, pairs = _click(sandbox, fake_app, http, {"PHONE_NUMBER": "+4930777", "USER_ID": "15"})
    assert [k for k, _ in pairs] == CLICK_FIELDS
    data = dict(pairs)
    [active] = sandbox.calls(p["member_id"])["active"]
    assert data["CALL_ID"] == active["CALL_ID"] and active["TYPE"] == "1"
    assert (data["PHONE_NUMBER_INTERNATIONAL"], data["LINE_NUMBER"], data["IS_MOBILE"],
            data["CALL_LIST_ID"], data["EXTENSION"]) == ("+4930777", "7", "0", "0", "")
    [lead] = _leads(http, p)  # no CRM match, the line auto-creates
    assert (data["CRM_ENTITY_TYPE"], data["CRM_ENTITY_ID"]) == ("LEAD", lead["ID"])
    assert lead["PHONE"] == [{"VALUE": "+4930777", "VALUE_TYPE": "WORK"}]


def test_click_to_call_creates_no_lead_for_a_known_number_or_a_line_that_says_no(
        sandbox, fake_app, http):
    p, pairs = _click(sandbox, fake_app, http, {"PHONE_NUMBER": "+4930555", "USER_ID": "15"},
                      line_auto="N")
    assert dict(pairs)["CRM_ENTITY_TYPE"] == "" and _leads(http, p) == []
    sandbox.add_crm(p["member_id"], "contact", {"NAME": "Ann", "PHONE": [{"VALUE": "+4930444"}]})
    call(http, p, "telephony.externalLine.update", NUMBER="7", CRM_AUTO_CREATE="Y")
    sandbox.trigger_event(p["member_id"], "ONEXTERNALCALLSTART",
                          {"PHONE_NUMBER": "+4930444", "USER_ID": "15"}, user_id=15)
    data = dict(parse_qsl(fake_app.paths("/b24/events")[-1].body.decode()))
    assert (data["data[CRM_ENTITY_TYPE]"], data["data[CRM_ENTITY_ID]"]) == ("CONTACT", "1")
    assert _leads(http, p) == []
