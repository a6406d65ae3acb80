"""The sandbox's telephony follows protocol §8 (issue 22, "The sandbox follows §8"): each test
calls the sandbox over real HTTP and fails if it took the lax reading.
"""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from .conftest import call

USERS = [
    {"id": 1, "name": "Ada", "admin": True, "extension": "101"},
    {"id": 2, "name": "Bob", "extension": "102", "phones": ["+49 30 555"]},
    {"id": 3, "name": "Cy", "extension": "103", "active": False},
    {"id": 4, "name": "Di", "extension": "104"},
]
REG = {"USER_ID": 1, "PHONE_NUMBER": "+4930123456", "TYPE": 2, "LINE_NUMBER": "7"}
REGISTER = "telephony.externalCall.register"
FINISH = "telephony.externalCall.finish"
ATTACH = "telephony.externalCall.attachRecord"
NOT_FOUND = "Call is not found"


@pytest.fixture
def p8(sandbox) -> dict[str, Any]:
    """A portal with an admin, an employee with a profile phone, an inactive user and a fourth."""
    return sandbox.create_portal(users=USERS, time_zone="+01:00")


def form(http: httpx.Client, portal: dict[str, Any], method: str, **params: Any) -> Any:
    """A form-encoded REST call, as a query string carries it: "" is sent as "", not dropped."""
    body = {"auth": portal["access_token"], **{k: str(v) for k, v in params.items()}}
    return http.post(portal["client_endpoint"] + method, data=body).json()


def register(http, portal, **kw) -> Any:
    return form(http, portal, REGISTER, **{**REG, **kw})


def finish(http, portal, call_id, **kw) -> Any:
    return form(http, portal, FINISH, **{"CALL_ID": call_id, "USER_ID": 1, **kw})


def finished(sandbox, portal, call_id) -> dict[str, Any]:
    return next(c for c in sandbox.calls(portal["member_id"])["finished"]
                if c["CALL_ID"] == call_id)


def active(sandbox, portal, call_id) -> dict[str, Any]:
    return next(c for c in sandbox.calls(portal["member_id"])["active"]
                if c["CALL_ID"] == call_id)


# ---------------------------------------------------------------- §8.4 finish hides for one


def test_finish_hides_the_card_only_for_the_finisher(sandbox, p8, http):
    cid = register(http, p8, SHOW=0, EXTERNAL_CALL_ID="ring")["result"]["CALL_ID"]
    assert form(http, p8, "telephony.externalCall.show", CALL_ID=cid)["result"] is True
    shown = call(http, p8, "telephony.externalCall.show", CALL_ID=cid, USER_ID=[2, 4])
    assert shown.json()["result"] is True
    assert finish(http, p8, cid, USER_ID=1, DURATION=5)["result"]["CALL_ID"] == cid
    # Users 2 and 4 were shown the card and never hidden: finish by 1 leaves it open for them.
    assert finished(sandbox, p8, cid)["CARDS_LEFT_OPEN"] == [2, 4]
    assert sandbox.counters(p8["member_id"])["cards_left_open"] == 2
    ring = sandbox.call_history(p8["member_id"], "ring")["calls"]["ring"]
    assert ring["open_at_finish"] == [2, 4]


def test_hiding_the_others_before_finish_leaves_no_card_open(sandbox, p8, http):
    cid = register(http, p8, SHOW=0, EXTERNAL_CALL_ID="ok")["result"]["CALL_ID"]
    call(http, p8, "telephony.externalCall.show", CALL_ID=cid, USER_ID=[1, 2, 4])
    call(http, p8, "telephony.externalCall.hide", CALL_ID=cid, USER_ID=[2, 4])
    finish(http, p8, cid, USER_ID=1, DURATION=5)
    assert finished(sandbox, p8, cid)["CARDS_LEFT_OPEN"] == []
    assert sandbox.counters(p8["member_id"])["cards_left_open"] == 0


def test_show_without_user_id_goes_to_the_owner_and_an_empty_one_to_nobody(sandbox, p8, http):
    cid = register(http, p8, SHOW=0, USER_ID=4)["result"]["CALL_ID"]
    form(http, p8, "telephony.externalCall.show", CALL_ID=cid, USER_ID="")
    assert active(sandbox, p8, cid)["SHOWN"] == []
    form(http, p8, "telephony.externalCall.show", CALL_ID=cid)
    assert active(sandbox, p8, cid)["SHOWN"] == [4]


def test_show_and_hide_after_finish_answer_false_and_are_violations(sandbox, p8, http):
    cid = register(http, p8, SHOW=0, EXTERNAL_CALL_ID="late")["result"]["CALL_ID"]
    finish(http, p8, cid, DURATION=1)
    for name in ("show", "hide"):
        out = form(http, p8, f"telephony.externalCall.{name}", CALL_ID=cid, USER_ID=2)
        assert out["result"] is False
    v = sandbox.counters(p8["member_id"])["violations"]
    assert (v["show_after_finish"], v["hide_after_finish"]) == (1, 1)
    late = sandbox.call_history(p8["member_id"], "late")["calls"]["late"]["after_finish"]
    assert [(c["action"], c["accepted"]) for c in late] == [("show", False), ("hide", False)]


# ---------------------------------------------------------------- §8.1/§8.3 SHOW and flags


@pytest.mark.parametrize(("value", "shown"), [
    (None, [1]), ("1", [1]), ("0", []), ("", []), ("N", [1]), ("false", [1]), ("no", [1]),
    ("Y", [1]),
])
def test_register_show_is_php_truthy_and_defaults_to_showing(sandbox, p8, http, value, shown):
    kw = {} if value is None else {"SHOW": value}
    cid = register(http, p8, EXTERNAL_CALL_ID="s", **kw)["result"]["CALL_ID"]
    assert active(sandbox, p8, cid)["SHOWN"] == shown
    [entry] = sandbox.log(p8["member_id"], method="telephony.externalcall.register")
    assert entry["shown"] == shown


def test_a_dedup_hit_with_show_shows_the_card_again_and_fires_robots_again(sandbox, p8, http):
    first = register(http, p8, SHOW=0, EXTERNAL_CALL_ID="d")["result"]["CALL_ID"]
    again = register(http, p8, SHOW=1, EXTERNAL_CALL_ID="d")["result"]["CALL_ID"]
    assert again == first and active(sandbox, p8, first)["SHOWN"] == [1]
    assert sandbox.counters(p8["member_id"])["robot_triggers"] == 2


@pytest.mark.parametrize(("value", "lead"), [("1", True), ("N", True), ("0", False),
                                             ("", False), (None, False)])
def test_crm_create_is_php_truthy(p8, http, value, lead):
    kw = {} if value is None else {"CRM_CREATE": value}
    out = register(http, p8, EXTERNAL_CALL_ID="c", **kw)["result"]
    assert (out["CRM_CREATED_LEAD"] is not None) is lead
    assert bool(call(http, p8, "crm.lead.list").json()["result"]) is lead


@pytest.mark.parametrize(("value", "messages"), [(None, 1), ("1", 1), ("N", 1), ("0", 0),
                                                 ("", 0)])
def test_finish_add_to_chat_is_php_truthy_and_on_by_default(sandbox, p8, http, value, messages):
    """§8.5: one chat message per finished call unless ADD_TO_CHAT is off ("N" is on)."""
    cid = register(http, p8, SHOW=0)["result"]["CALL_ID"]
    finish(http, p8, cid, DURATION=3, **({} if value is None else {"ADD_TO_CHAT": value}))
    assert sandbox.counters(p8["member_id"])["chat_messages"] == messages


def test_empty_crm_entity_counts_as_set_and_skips_the_phone_match(sandbox, p8, http):
    sandbox.add_crm(p8["member_id"], "contact",
                    {"NAME": "Ann", "PHONE": [{"VALUE": REG["PHONE_NUMBER"]}]})
    matched = register(http, p8, EXTERNAL_CALL_ID="m")["result"]
    assert matched["CRM_ENTITY_TYPE"] == "CONTACT"
    empty = register(http, p8, EXTERNAL_CALL_ID="e", CRM_ENTITY_TYPE="", CRM_ENTITY_ID="",
                     CRM_CREATE=1)["result"]
    assert (empty["CRM_ENTITY_TYPE"], empty["CRM_ENTITY_ID"], empty["CRM_CREATED_LEAD"]) == \
        ("", None, None)
    assert sandbox.counters(p8["member_id"])["violations"]["empty_crm_entity"] == 1
    # No binding: finish makes no activity, the call lives in statistics only (§8.5).
    out = finish(http, p8, empty["CALL_ID"], DURATION=3)["result"]
    assert out["CRM_ACTIVITY_ID"] is None and "ACTIVITY_CREATION" in out["ERRORS"]


# ---------------------------------------------------------------- §8.5 status codes


@pytest.mark.parametrize(("call_type", "params", "code", "missed"), [
    (2, {"STATUS_CODE": "304"}, "304", True),
    (3, {"STATUS_CODE": "304"}, "304", True),
    (2, {}, "304", True),  # no code, no duration -> 304
    (2, {"STATUS_CODE": "0"}, "304", True),
    (2, {"STATUS_CODE": "486"}, "486", False),  # busy: stored, shown, not a missed call
    (2, {"STATUS_CODE": "603-S"}, "603-S", False),
    (2, {"STATUS_CODE": "480"}, "480", False),
    (2, {"STATUS_CODE": "200"}, "200", False),
    (2, {"STATUS_CODE": "no-such-code"}, "no-such-code", False),  # stored verbatim
    (1, {"STATUS_CODE": "304"}, "304", False),  # outgoing: no missed-call logic
    (4, {"STATUS_CODE": "304"}, "304", False),
    (2, {"DURATION": 7}, "200", False),
])
def test_only_304_on_an_incoming_call_makes_a_missed_call(sandbox, p8, http, call_type, params,
                                                         code, missed):
    sandbox.add_crm(p8["member_id"], "contact",
                    {"NAME": "Ann", "PHONE": [{"VALUE": REG["PHONE_NUMBER"]}]})
    cid = register(http, p8, TYPE=call_type, SHOW=0)["result"]["CALL_ID"]
    out = finish(http, p8, cid, **params)["result"]
    assert out["CALL_FAILED_CODE"] == code
    state = sandbox.calls(p8["member_id"])
    assert bool(state["missed"]) is missed and finished(sandbox, p8, cid)["MISSED"] is missed
    assert sandbox.counters(p8["member_id"])["missed_calls"] == int(missed)
    [activity] = call(http, p8, "crm.activity.list").json()["result"]
    assert activity["COMPLETED"] == ("N" if missed else "Y")  # a missed call stays a to-do


def test_an_answered_outgoing_call_marks_the_missed_call_called_back(sandbox, p8, http):
    missed = register(http, p8, SHOW=0, EXTERNAL_CALL_ID="in")["result"]["CALL_ID"]
    finish(http, p8, missed, STATUS_CODE=304)
    back = register(http, p8, SHOW=0, TYPE=1, EXTERNAL_CALL_ID="out")["result"]["CALL_ID"]
    finish(http, p8, back, STATUS_CODE=200, DURATION=20)
    [row] = sandbox.calls(p8["member_id"])["missed"]
    assert row["CALL_ID"] == missed and row["CALLED_BACK"] is True


# ---------------------------------------------------------------- §8.3 CALL_START_DATE


@pytest.mark.parametrize(("sent", "utc"), [
    ("2026-03-07T10:20:30+03:00", "2026-03-07T07:20:30"),
    ("2026-03-07T10:20:30.750+03:00", "2026-03-07T07:20:30"),
    ("2026-03-07T07:20:30Z", "2026-03-07T07:20:30"),
    ("2026-03-07T10:20:30+0300", "2026-03-07T07:20:30"),
    ("2026-03-07T03:20:30-04:00", "2026-03-07T07:20:30"),
])
def test_call_start_date_with_an_offset_is_read_at_that_offset(sandbox, p8, http, sent, utc):
    cid = register(http, p8, CALL_START_DATE=sent)["result"]["CALL_ID"]
    out = finish(http, p8, cid, DURATION=1)["result"]
    # Printed in the portal's zone (+01:00), the same instant.
    assert datetime.fromisoformat(out["CALL_START_DATE"]).astimezone(UTC).replace(
        tzinfo=None).isoformat() == utc
    assert out["CALL_START_DATE"].endswith("+01:00")
    assert sandbox.counters(p8["member_id"])["violations"]["start_date_without_offset"] == 0


def test_call_start_date_without_an_offset_is_read_in_the_servers_zone(sandbox, p8, http):
    cid = register(http, p8, CALL_START_DATE="2026-03-07T10:20:30")["result"]["CALL_ID"]
    out = finish(http, p8, cid, DURATION=1)["result"]
    # The server's zone (Europe/Moscow, +03:00), not the portal's (+01:00): times come out wrong.
    assert out["CALL_START_DATE"] == "2026-03-07T08:20:30+01:00"
    assert sandbox.counters(p8["member_id"])["violations"]["start_date_without_offset"] == 1


@pytest.mark.parametrize("sent", ["", "not a date", "2026-03-07T10:20:30 03:00", "07/03/2026"])
def test_an_unparsable_or_empty_call_start_date_is_refused(sandbox, p8, http, sent):
    # "2026-03-07T10:20:30 03:00" is what an unencoded "+" becomes in a query string.
    out = register(http, p8, CALL_START_DATE=sent)
    assert out["error"] == "ERROR_CORE"
    assert out["error_description"] == "CALL_START_DATE should be in the ISO-8601 format"
    assert sandbox.calls(p8["member_id"])["active"] == []


def test_no_call_start_date_means_now(sandbox, p8, http):
    cid = call(http, p8, REGISTER, **REG, CALL_START_DATE=None).json()["result"]["CALL_ID"]
    out = finish(http, p8, cid, DURATION=1)["result"]
    assert abs(datetime.fromisoformat(out["CALL_START_DATE"]).timestamp() - time.time()) < 5


# ---------------------------------------------------------------- §8.3 LEAD_CREATION_ERROR


@pytest.mark.parametrize("number", ["+4930555", "102"])
def test_an_employees_number_gets_lead_creation_error_and_the_call_is_registered(
        sandbox, p8, http, number):
    out = register(http, p8, PHONE_NUMBER=number, CRM_CREATE=1, EXTERNAL_CALL_ID="emp")
    assert "error" not in out
    res = out["result"]
    assert res["LEAD_CREATION_ERROR"] == "Lead creation is disabled for local users"
    assert res["CALL_ID"].startswith("externalCall.") and res["CRM_CREATED_LEAD"] is None
    assert call(http, p8, "crm.lead.list").json()["result"] == []
    assert finish(http, p8, res["CALL_ID"], DURATION=4)["result"]["CALL_ID"] == res["CALL_ID"]
    assert sandbox.counters(p8["member_id"])["lead_creation_errors"] == 1


def test_a_clients_number_with_crm_create_gets_a_lead_without_error(p8, http):
    res = register(http, p8, CRM_CREATE=1)["result"]
    assert "LEAD_CREATION_ERROR" not in res and res["CRM_CREATED_LEAD"]
    assert res["CRM_CREATED_ENTITIES"] == [{"ENTITY_TYPE": "LEAD",
                                            "ENTITY_ID": res["CRM_CREATED_LEAD"]}]
    finish(http, p8, res["CALL_ID"], USER_ID=4, DURATION=2)
    # The finish user becomes responsible of what this call auto-created (§8.5).
    lead = call(http, p8, "crm.lead.get", id=res["CRM_CREATED_LEAD"]).json()["result"]
    assert lead["ASSIGNED_BY_ID"] == "4"


# ---------------------------------------------------------------- §8.6 attachRecord


def _done(http, portal, ext="rec") -> str:
    cid = register(http, portal, SHOW=0, EXTERNAL_CALL_ID=ext)["result"]["CALL_ID"]
    finish(http, portal, cid, DURATION=9)
    return cid


def test_attach_record_only_after_finish(sandbox, p8, http):
    cid = register(http, p8, SHOW=0)["result"]["CALL_ID"]
    early = form(http, p8, ATTACH, CALL_ID=cid, FILENAME="r.mp3",
                 FILE_CONTENT=base64.b64encode(b"ID3").decode())
    assert early["error_description"].startswith("Call is not found in the statistic table")
    assert sandbox.counters(p8["member_id"])["violations"]["attach_before_finish"] == 1


@pytest.mark.parametrize(("params", "error"), [
    ({"FILENAME": "r.mp3", "FILE_CONTENT": ""}, "File content is empty."),
    ({"FILENAME": "r.mp3", "FILE_CONTENT": "!!not base64!!"},
     "File content is not properly encoded. Base64 encoding is expected."),
    ({"FILENAME": "r", "FILE_CONTENT": "SUQz"}, "Wrong file extension"),
    ({"FILENAME": "r.flac", "FILE_CONTENT": "SUQz"}, "Wrong file extension"),
    ({"FILENAME": "r.ogg"}, "Wrong file extension"),
    ({"FILE_CONTENT": "SUQz"}, "Required parameters are not set"),
    ({}, "Required parameters are not set"),
])
def test_attach_record_content_rules(p8, http, params, error):
    out = form(http, p8, ATTACH, CALL_ID=_done(http, p8), **params)
    assert out["error"] == "ERROR_CORE" and out["error_description"].startswith(error)


def test_attach_record_base64_and_again_replaces(sandbox, p8, http):
    cid = _done(http, p8)
    for name in ("a.mp3", "b.wav"):
        out = form(http, p8, ATTACH, CALL_ID=cid, FILENAME=name,
                   FILE_CONTENT=base64.b64encode(b"RIFFdata").decode())
        assert "FILE_ID" in out["result"]
    row = finished(sandbox, p8, cid)
    assert row["RECORD"]["FILENAME"] == "b.wav" and row["RECORDS_ATTACHED"] == 2
    assert sandbox.call_history(p8["member_id"], "rec")["calls"]["rec"]["records"] == 2


def test_record_url_needs_an_audio_file_name_and_type(p8, http, fake_app):
    cid = _done(http, p8)
    ok = form(http, p8, ATTACH, CALL_ID=cid, RECORD_URL=fake_app.url + "/r/5.mp3")
    assert "FILE_ID" in ok["result"]
    # /rec?id=5 has no extension and no audio type: fails without FILENAME, and with one too.
    for extra in ({}, {"FILENAME": "r.mp3"}):
        bad = form(http, p8, ATTACH, CALL_ID=cid, RECORD_URL=fake_app.url + "/rec?id=5", **extra)
        assert bad["error"] == "ERROR_CORE", extra


def test_record_url_on_finish_attaches_nothing(sandbox, p8, http, fake_app):
    """§8.5: finish's RECORD_URL is deprecated, left to a background agent; use attachRecord."""
    cid = register(http, p8, SHOW=0)["result"]["CALL_ID"]
    finish(http, p8, cid, DURATION=5, RECORD_URL=fake_app.url + "/r.mp3")
    assert finished(sandbox, p8, cid)["RECORD"] is None and fake_app.paths("/r.mp3") == []


def test_record_url_unreachable_or_not_200(sandbox, p8, http):
    cid = _done(http, p8)
    for url in ("http://192.168.10.5/rec.mp3", "http://127.0.0.1:9/rec.mp3"):
        out = form(http, p8, ATTACH, CALL_ID=cid, RECORD_URL=url)
        assert out["error"] == "SERVER_NOT_AVAILABLE", url
    out = form(http, p8, ATTACH, CALL_ID=cid, RECORD_URL=sandbox.base_url + "/nothing.mp3")
    assert out["error_description"] == "Server returns HTTP error code 404"


def test_upload_url_two_steps_wav_or_mp3_and_a_live_token(sandbox, p8, http):
    cid = _done(http, p8)
    up = form(http, p8, ATTACH, CALL_ID=cid, FILENAME="big.mp3")["result"]
    assert up["fieldName"] == "file" and p8["access_token"] in up["uploadUrl"]
    bad = http.post(up["uploadUrl"], files={"file": ("big.ogg", b"OggS")})
    assert bad.json()["error"] == "ERROR_CORE"
    ok = http.post(up["uploadUrl"], files={"file": ("big.mp3", b"ID3" * 1000)})
    assert "FILE_ID" in ok.json()["result"]
    late = form(http, p8, ATTACH, CALL_ID=cid, FILENAME="big.mp3")["result"]
    sandbox.expire_tokens(p8["member_id"])
    expired = http.post(late["uploadUrl"], files={"file": ("big.mp3", b"ID3")})
    assert expired.status_code == 401 and expired.json()["error"] == "expired_token"


def test_an_upload_is_the_calls_one_record_in_its_history(sandbox, p8, http):
    """The answer with the upload URL stores nothing; the POST to it does, and the command
    log and call history name the call by EXTERNAL_CALL_ID for it (what a test of the app's
    two-step upload checks)."""
    cid = _done(http, p8, ext="two-step")
    up = form(http, p8, ATTACH, CALL_ID=cid, FILENAME="long.wav")["result"]
    history = sandbox.call_history(p8["member_id"], "two-step")["calls"]["two-step"]
    assert history["records"] == 0 and finished(sandbox, p8, cid)["RECORD"] is None
    assert http.post(up["uploadUrl"], files={"file": ("long.wav", b"RIFF" + b"\0" * 64)}
                     ).json()["result"]["FILE_ID"]
    [upload] = sandbox.log(p8["member_id"], method="upload")
    assert (upload["external_call_id"], upload["params"]) == ("two-step", {"FILENAME": "long.wav"})
    history = sandbox.call_history(p8["member_id"], "two-step")["calls"]["two-step"]
    assert history["records"] == 1
    assert finished(sandbox, p8, cid)["RECORD"]["SIZE"] == 68


# ---------------------------------------------------------------- §8.3/§8.5 not found, dedup, users


def test_finish_of_an_unknown_or_finished_call_is_call_not_found(sandbox, p8, http):
    unknown = finish(http, p8, "externalCall.nope.1")
    assert unknown["error"] == "ERROR_CORE"
    assert unknown["error_description"].startswith(NOT_FOUND)
    assert not unknown["error_description"].endswith(")")  # the source's text: prefix-match
    cid = _done(http, p8, "twice")
    again = finish(http, p8, cid, DURATION=100)
    assert again["error_description"].startswith(NOT_FOUND)
    assert finished(sandbox, p8, cid)["CALL_DURATION"] == "9"  # the second finish changed nothing
    hist = sandbox.call_history(p8["member_id"], "twice")["calls"]["twice"]
    assert hist["finished"] == 1 and [f["ok"] for f in hist["finishes"]] == [True, False]


def test_finish_call_id_must_be_a_string(p8, http):
    out = call(http, p8, FINISH, CALL_ID=5, USER_ID=1).json()
    assert (out["error"], out["error_description"]) == ("INVALID_ARGUMENT",
                                                        "CALL_ID must be a string")


def test_register_dedup_on_external_call_id(sandbox, p8, http):
    empty = register(http, p8, EXTERNAL_CALL_ID="")["result"]["CALL_ID"]
    assert register(http, p8, EXTERNAL_CALL_ID="")["result"]["CALL_ID"] == empty  # "" = ""
    # Not passed: left out of the filter, so it matches the active call whatever its id.
    assert call(http, p8, REGISTER, **REG).json()["result"]["CALL_ID"] == empty
    other = register(http, p8, EXTERNAL_CALL_ID="x")["result"]["CALL_ID"]
    assert other != empty  # a passed id that differs: a new call
    finish(http, p8, other, DURATION=1)
    assert register(http, p8, EXTERNAL_CALL_ID="x")["result"]["CALL_ID"] != other  # finished
    hist = sandbox.call_history(p8["member_id"], "x")["calls"]["x"]
    assert hist["registered"] == 2 and len(hist["call_ids"]) == 2


def test_an_older_build_merges_overlapping_calls_into_one_call_id(sandbox, p8, http):
    """§8.16 row 1: dedup without EXTERNAL_CALL_ID; the collision shows in the history."""
    sandbox.settings(call_dedup_external_id=False)
    a = register(http, p8, SHOW=0, EXTERNAL_CALL_ID="pbx-a")["result"]["CALL_ID"]
    b = register(http, p8, SHOW=0, EXTERNAL_CALL_ID="pbx-b")["result"]["CALL_ID"]
    assert a == b
    finish(http, p8, a, DURATION=3)
    assert finish(http, p8, b, DURATION=3)["error_description"].startswith(NOT_FOUND)
    assert sandbox.call_history(p8["member_id"])["collisions"] == {a: ["pbx-a", "pbx-b"]}


def test_inactive_or_unknown_users_are_refused_on_register_and_finish(sandbox, p8, http):
    refused = register(http, p8, USER_ID=3, EXTERNAL_CALL_ID="inactive")
    assert refused["error_description"] == "User is not found or is not active"
    hist = sandbox.call_history(p8["member_id"], "inactive")["calls"]["inactive"]
    assert hist["registered"] == 0 and hist["registers"][0]["error"] == "ERROR_CORE"
    assert register(http, p8, USER_ID=99)["error_description"].startswith("User is not found")
    cid = register(http, p8, SHOW=0)["result"]["CALL_ID"]
    out = finish(http, p8, cid, USER_ID=3, DURATION=5)
    assert out["error_description"] == "User is not found or is not active"
    assert active(sandbox, p8, cid)  # still open: that finish did nothing
    [tried] = sandbox.call_history(p8["member_id"])["calls"][f"CALL_ID:{cid}"]["finishes"]
    assert tried["ok"] is False and tried["error"] == "ERROR_CORE"
    by_inner = call(http, p8, REGISTER, **{**REG, "USER_ID": 0, "USER_PHONE_INNER": "104",
                                           "EXTERNAL_CALL_ID": "inner"}).json()["result"]
    assert active(sandbox, p8, by_inner["CALL_ID"])["USER_ID"] == 4  # USER_ID 0 -> the inner
    five = call(http, p8, REGISTER, **{**REG, "USER_ID": None, "USER_PHONE_INNER": "10401"})
    assert five.json()["error_description"] == "USER_ID or USER_PHONE_INNER should be set"


@pytest.mark.parametrize("number", ["anonymous", "unknown", "", "Anonymous <sip:x@y>"])
def test_an_anonymous_caller_cannot_be_registered(sandbox, p8, http, number):
    out = register(http, p8, PHONE_NUMBER=number)
    assert out["error_description"] == "Unsupported phone number format"
    assert sandbox.calls(p8["member_id"])["active"] == []


def test_numbers_are_stripped_of_letters_but_not_normalised(sandbox, p8, http):
    """§8.3/§8.16 "Duplicate leads": a national format does not meet the CRM's E.164 number."""
    sandbox.add_crm(p8["member_id"], "contact",
                    {"NAME": "Ann", "PHONE": [{"VALUE": "+4930123456"}]})
    spaced = register(http, p8, PHONE_NUMBER="tel: +49 (30) 123-456", CRM_CREATE=1)["result"]
    assert active(sandbox, p8, spaced["CALL_ID"])["PHONE_NUMBER"] == "+4930123456"
    assert spaced["CRM_ENTITY_TYPE"] == "CONTACT"
    national = register(http, p8, PHONE_NUMBER="030123456", CRM_CREATE=1)["result"]
    assert national["CALL_ID"] != spaced["CALL_ID"]  # another number for dedup
    assert national["CRM_ENTITY_TYPE"] == "LEAD" and national["CRM_CREATED_LEAD"]  # a duplicate


def test_a_second_click_on_the_same_number_brings_the_same_call_id(sandbox, p8, http):
    """§8.8, §8.16 "Double click rings the agent twice": the portal dedups the click's call."""
    data = {"PHONE_NUMBER": "+4930888", "USER_ID": "2"}
    first = sandbox.trigger_event(p8["member_id"], "ONEXTERNALCALLSTART", data, user_id=2)
    second = sandbox.trigger_event(p8["member_id"], "ONEXTERNALCALLSTART", data, user_id=2)
    assert first["data"]["CALL_ID"] == second["data"]["CALL_ID"]
    assert len(sandbox.calls(p8["member_id"])["active"]) == 1


def test_search_crm_entities_is_filtered_by_the_callers_permissions(sandbox, p8, http):
    sandbox.add_crm(p8["member_id"], "contact",
                    {"NAME": "Ann", "PHONE": [{"VALUE": "+4930777"}], "ASSIGNED_BY_ID": "1"})
    admin = call(http, p8, "telephony.externalCall.searchCrmEntities", PHONE_NUMBER="+4930777")
    assert len(admin.json()["result"]) == 1
    token = sandbox.issue_tokens(p8["member_id"], user_id=2)["access_token"]
    mine = call(http, p8, "telephony.externalCall.searchCrmEntities", token=token,
                PHONE_NUMBER="+4930777")
    assert mine.json()["result"] == []


def test_search_crm_entities_reports_each_responsibles_day_in_type_order(sandbox, http):
    """§8.7: contacts, then leads, then companies; ASSIGNED_BY carries the responsible's
    extension and TIMEMAN_STATUS (routing skips people not at work); an empty number fails."""
    portal = sandbox.create_portal(users=[
        {"id": 1, "name": "Ada", "admin": True, "extension": "101", "timeman": "OPENED"},
        {"id": 2, "name": "Bob", "extension": "102", "timeman": "CLOSED"},
        {"id": 3, "name": "Cy", "extension": "103"}])
    member = portal["member_id"]
    for kind, user in (("company", "3"), ("lead", "2"), ("contact", "1")):
        sandbox.add_crm(member, kind, {"TITLE": kind, "PHONE": [{"VALUE": "+4930999"}],
                                       "ASSIGNED_BY_ID": user})
    found = call(http, portal, "telephony.externalCall.searchCrmEntities",
                 PHONE_NUMBER="+4930999").json()["result"]
    assert [(r["CRM_ENTITY_TYPE"], r["ASSIGNED_BY"]["TIMEMAN_STATUS"],
             r["ASSIGNED_BY"]["USER_PHONE_INNER"]) for r in found] == [
        ("CONTACT", "OPENED", "101"), ("LEAD", "CLOSED", "102"),
        ("COMPANY", "NOT_INSTALLED", "103")]
    empty = form(http, portal, "telephony.externalCall.searchCrmEntities", PHONE_NUMBER="")
    assert (empty["error"], empty["error_description"]) == ("ERROR_CORE", "PHONE_NUMBER is empty")


# ---------------------------------------------------------------- §8.16 faults on a method


def _batch(http, portal, ext):
    return http.post(portal["client_endpoint"] + "batch", json={
        "auth": portal["access_token"], "halt": 0, "cmd": {
            "reg": f"{REGISTER}?USER_ID=1&PHONE_NUMBER=%2B4930123456&TYPE=2&SHOW=0"
                   f"&EXTERNAL_CALL_ID={ext}",
            "show": "telephony.externalCall.show?CALL_ID=$result[reg][CALL_ID]&USER_ID=1"}})


def test_a_5xx_fault_bound_to_finish_spares_other_methods(sandbox, p8, http):
    sandbox.set_fault(p8["member_id"], "http_500", methods=["telephony.externalcall.finish"])
    cid = register(http, p8, SHOW=0, EXTERNAL_CALL_ID="f5")["result"]["CALL_ID"]
    assert _batch(http, p8, "other").status_code == 200
    resp = http.post(p8["client_endpoint"] + FINISH,
                     data={"auth": p8["access_token"], "CALL_ID": cid, "USER_ID": "1"})
    assert resp.status_code == 500
    assert active(sandbox, p8, cid)  # not executed


def test_a_504_after_execution_on_register_leaves_the_call_registered(sandbox, p8, http):
    sandbox.set_fault(p8["member_id"], "executed_504", count=1,
                      methods=["telephony.externalcall.register"])
    resp = _batch(http, p8, "lost")
    assert resp.status_code == 504 and "text/html" in resp.headers["content-type"]
    hist = sandbox.call_history(p8["member_id"], "lost")["calls"]["lost"]
    assert hist["registered"] == 1  # it ran: a resend must be SHOW=0 and dedup onto it
    assert _batch(http, p8, "lost").status_code == 200
    hist = sandbox.call_history(p8["member_id"], "lost")["calls"]["lost"]
    assert hist["registered"] == 1 and len(hist["registers"]) == 2


def test_a_reset_on_finish_cuts_the_connection_and_runs_nothing(sandbox, p8, http):
    cid = register(http, p8, SHOW=0)["result"]["CALL_ID"]
    sandbox.set_fault(p8["member_id"], "reset", methods=["telephony.externalcall.finish"])
    with pytest.raises(httpx.TransportError):
        finish(http, p8, cid, DURATION=3)
    assert active(sandbox, p8, cid)


def test_operation_time_limit_bound_to_a_method_hits_its_commands_in_a_batch(sandbox, p8, http):
    sandbox.set_fault(p8["member_id"], "operation_time_limit",
                      methods=["telephony.externalcall.show"])
    res = _batch(http, p8, "otl").json()["result"]
    assert res["result"]["reg"]["CALL_ID"]  # register is not limited
    assert res["result_error"]["show"]["error"] == "OPERATION_TIME_LIMIT"
    alone = call(http, p8, "telephony.externalCall.show", CALL_ID=res["result"]["reg"]["CALL_ID"])
    assert alone.status_code == 429 and alone.json()["error"] == "OPERATION_TIME_LIMIT"


def test_a_methods_own_operating_budget_and_cost(sandbox, p8, http):
    mid = p8["member_id"]
    sandbox.set_method_cost(mid, "telephony.externalCall.finish", 0.2)
    sandbox.set_operating_limit(0.1, mid, method="telephony.externalCall.finish")
    first = _done(http, p8, "a")  # crosses the budget and still completes
    assert finished(sandbox, p8, first)
    cid = register(http, p8, SHOW=0, EXTERNAL_CALL_ID="b")["result"]["CALL_ID"]
    blocked = http.post(p8["client_endpoint"] + FINISH,
                        data={"auth": p8["access_token"], "CALL_ID": cid, "USER_ID": "1"})
    assert blocked.status_code == 429 and blocked.json()["error"] == "OPERATION_TIME_LIMIT"
    assert "CALL_ID" in register(http, p8, SHOW=0, EXTERNAL_CALL_ID="c")["result"]


# ---------------------------------------------------------------- the history a day is checked by


def test_call_history_tells_who_saw_the_card_and_when(sandbox, p8, http):
    mid = p8["member_id"]
    cid = register(http, p8, SHOW=0, EXTERNAL_CALL_ID="day-1")["result"]["CALL_ID"]
    call(http, p8, "telephony.externalCall.show", CALL_ID=cid, USER_ID=[1, 2, 4])
    call(http, p8, "telephony.externalCall.hide", CALL_ID=cid, USER_ID=[2, 4])  # 1 answered
    finish(http, p8, cid, USER_ID=1, DURATION=30)
    sloppy = register(http, p8, SHOW=1, EXTERNAL_CALL_ID="day-2", PHONE_NUMBER="+4930999")
    call(http, p8, "telephony.externalCall.show", CALL_ID=sloppy["result"]["CALL_ID"], USER_ID=2)
    finish(http, p8, sloppy["result"]["CALL_ID"], USER_ID=2, STATUS_CODE=304)
    call(http, p8, "telephony.externalCall.hide", CALL_ID=sloppy["result"]["CALL_ID"], USER_ID=1)

    out = sandbox.call_history(mid)
    day1, day2 = out["calls"]["day-1"], out["calls"]["day-2"]
    assert (day1["registered"], day1["finished"], day1["finisher"], day1["status_code"]) == \
        (1, 1, 1, "200")
    assert day1["shown_users"] == [1, 2, 4] and day1["open_at_finish"] == []
    assert day1["after_finish"] == []
    assert [(c["action"], c["users"]) for c in day1["cards"]] == \
        [("show", [1, 2, 4]), ("hide", [2, 4]), ("finish-hide", [1])]
    times = [c["at"] for c in day1["cards"]]
    assert times == sorted(times)
    assert day1["call_start_date"].endswith("+01:00")
    # day-2: shown to 1 by register and to 2; finished by 2 without hiding 1, hidden too late.
    assert day2["open_at_finish"] == [1] and day2["status_code"] == "304"
    assert [(c["action"], c["accepted"]) for c in day2["after_finish"]] == [("hide", False)]
    assert out["totals"] == {"calls": 2, "registered_once": 2, "registered_more": 0,
                             "finished_once": 2, "finished_more": 0, "unfinished": 0,
                             "open_at_finish": 1, "after_finish": 1}
    assert out["collisions"] == {}
    problems = sandbox.call_history(mid, problems=True)
    assert list(problems["calls"]) == ["day-2"] and problems["totals"] == out["totals"]


def test_call_history_keeps_the_start_date_to_the_fraction(sandbox, p8, http):
    register(http, p8, EXTERNAL_CALL_ID="t", CALL_START_DATE="2026-03-07T10:20:30.750+03:00")
    row = sandbox.call_history(p8["member_id"], "t")["calls"]["t"]
    assert row["call_start_date"] == "2026-03-07T08:20:30+01:00"
    assert row["call_start"] == datetime(2026, 3, 7, 7, 20, 30, 750000, tzinfo=UTC).timestamp()
