"""telephony.*: lines, register/show/hide/finish/attachRecord with the documented errors and
violation counters.
"""

from __future__ import annotations

import base64

from .conftest import call

REG = {
    "USER_ID": 1,
    "PHONE_NUMBER": "+4930123456",
    "TYPE": 2,
    "LINE_NUMBER": "7",
    "CALL_START_DATE": "2026-03-07T10:20:30+03:00",
}


def test_lines(portal, http):
    assert call(http, portal, "telephony.externalLine.add", NUMBER="7", NAME="Main").json()[
        "result"
    ] == {"ID": 1}
    dup = call(http, portal, "telephony.externalLine.add", NUMBER="7")
    assert dup.json() == {"error": "ERROR_CORE", "error_description": "Line already exists"}
    assert call(http, portal, "telephony.externalLine.get").json()["result"] == [
        {"NUMBER": "7", "NAME": "Main", "CRM_AUTO_CREATE": "Y"}
    ]
    assert call(http, portal, "telephony.externalLine.update", NUMBER="7", NAME="X").json()[
        "result"
    ] == {"ID": "1"}
    assert call(http, portal, "telephony.externalLine.delete", NUMBER="7").json()["result"] == []


def test_call_lifecycle_in_a_batch(sandbox, portal, http):
    sandbox.add_crm(
        portal["member_id"], "contact", {"NAME": "Ann", "PHONE": [{"VALUE": "+4930123456"}]}
    )
    res = call(
        http,
        portal,
        "batch",
        halt=1,
        cmd={
            "reg": "telephony.externalcall.register?USER_ID=1&PHONE_NUMBER=%2B4930123456"
            "&TYPE=2&LINE_NUMBER=7"
            "&EXTERNAL_CALL_ID=pbx-1&SHOW=0",
            "show": "telephony.externalcall.show?CALL_ID=$result[reg][CALL_ID]"
            "&USER_ID[]=1&USER_ID[]=2",
            "hide": "telephony.externalcall.hide?CALL_ID=$result[reg][CALL_ID]&USER_ID=2",
            "fin": "telephony.externalcall.finish?CALL_ID=$result[reg][CALL_ID]"
            "&USER_ID=1&DURATION=42",
        },
    ).json()["result"]
    assert res["result_error"] == []
    reg = res["result"]["reg"]
    assert reg["CALL_ID"].startswith("externalCall.") and reg["CRM_ENTITY_TYPE"] == "CONTACT"
    assert res["result"]["show"] is True and res["result"]["hide"] is True
    fin = res["result"]["fin"]
    assert (
        fin["CALL_ID"] == reg["CALL_ID"]
        and fin["CALL_DURATION"] == "42"
        and fin["CALL_FAILED_CODE"] == "200"
    )
    wav = base64.b64encode(b"RIFF").decode()
    att = call(
        http,
        portal,
        "telephony.externalCall.attachRecord",
        CALL_ID=reg["CALL_ID"],
        FILENAME="r.wav",
        FILE_CONTENT=wav,
    )
    assert "FILE_ID" in att.json()["result"]
    assert (
        call(http, portal, "telephony.externalCall.show", CALL_ID=reg["CALL_ID"]).json()["result"]
        is False
    )
    assert sandbox.counters(portal["member_id"])["violations"]["finish_before_register"] == 0


def test_register_validation_and_dedup(portal, http):
    def reg(**kw):
        return call(http, portal, "telephony.externalCall.register", **{**REG, **kw}).json()

    assert reg(USER_ID=None)["error_description"] == "USER_ID or USER_PHONE_INNER should be set"
    assert reg(TYPE=9)["error_description"] == "Unknown TYPE"
    assert (
        reg(CALL_START_DATE="not a date")["error_description"]
        == "CALL_START_DATE should be in the ISO-8601 format"
    )
    assert reg(PHONE_NUMBER="abc")["error_description"] == "Unsupported phone number format"
    assert reg(USER_ID=3)["error_description"] == "User is not found or is not active"
    # Dedup matches a call whose start date is under 30 minutes old (REG's is long past).
    a, b = reg(EXTERNAL_CALL_ID="e1", CALL_START_DATE=None), reg(EXTERNAL_CALL_ID="e1")
    assert a["result"]["CALL_ID"] == b["result"]["CALL_ID"]
    assert reg(EXTERNAL_CALL_ID="e2")["result"]["CALL_ID"] != a["result"]["CALL_ID"]
    by_ext = call(
        http,
        portal,
        "telephony.externalCall.register",
        **{**REG, "USER_ID": None, "USER_PHONE_INNER": "102"},
    ).json()
    assert by_ext["result"]["CALL_ID"]


def test_order_violations(sandbox, portal, http):
    fin = call(
        http, portal, "telephony.externalCall.finish", CALL_ID="externalCall.nope.1", USER_ID=1
    )
    assert fin.json() == {
        "error": "ERROR_CORE",
        # the source's text: no closing parenthesis (§8.5), so apps must match the prefix
        "error_description": "Call is not found (call should be registered prior to finishing",
    }
    call_id = call(http, portal, "telephony.externalCall.register", **REG).json()["result"][
        "CALL_ID"
    ]
    early = call(
        http,
        portal,
        "telephony.externalCall.attachRecord",
        CALL_ID=call_id,
        RECORD_URL="http://127.0.0.1:9/r.mp3",
    )
    assert early.json()["error_description"].startswith("Call is not found in the statistic table")
    call(http, portal, "telephony.externalCall.finish", CALL_ID=call_id, USER_ID=1)
    bad_ext = call(
        http,
        portal,
        "telephony.externalCall.attachRecord",
        CALL_ID=call_id,
        FILENAME="r.ogg",
        FILE_CONTENT="AA==",
    )
    assert bad_ext.json()["error_description"].startswith("Wrong file extension")
    assert (
        call(http, portal, "telephony.externalCall.finish", CALL_ID=call_id, USER_ID=1).json()[
            "error"
        ]
        == "ERROR_CORE"
    )
    v = sandbox.counters(portal["member_id"])["violations"]
    assert (
        v["finish_before_register"] == 1
        and v["attach_before_finish"] == 1
        and v["double_finish"] == 1
    )


def test_record_url_download_and_upload(sandbox, portal, http, fake_app):
    call_id = call(http, portal, "telephony.externalCall.register", **REG).json()["result"][
        "CALL_ID"
    ]
    call(http, portal, "telephony.externalCall.finish", CALL_ID=call_id, USER_ID=1, DURATION=3)
    ok = call(
        http,
        portal,
        "telephony.externalCall.attachRecord",
        CALL_ID=call_id,
        RECORD_URL=fake_app.url + "/rec.mp3",
    )
    assert "FILE_ID" in ok.json()["result"] and fake_app.paths("/rec.mp3")
    up = call(
        http, portal, "telephony.externalCall.attachRecord", CALL_ID=call_id, FILENAME="r2.mp3"
    ).json()["result"]
    assert up["fieldName"] == "file"
    resp = http.post(up["uploadUrl"], files={"file": ("r2.mp3", b"ID3data")})
    assert "FILE_ID" in resp.json()["result"]


def test_click_to_call_register_is_a_violation(sandbox, portal, http):
    out = sandbox.trigger_event(
        portal["member_id"], "ONEXTERNALCALLSTART", {"PHONE_NUMBER": "+4930999", "USER_ID": "2"}
    )
    call_id = out["data"]["CALL_ID"]
    call(
        http,
        portal,
        "telephony.externalCall.register",
        **{**REG, "USER_ID": 2, "PHONE_NUMBER": "+4930999", "TYPE": 1},
    )
    assert sandbox.counters(portal["member_id"])["violations"]["register_for_click_to_call"] == 1
    fin = call(
        http, portal, "telephony.externalCall.finish", CALL_ID=call_id, USER_ID=2, DURATION=5
    )
    assert fin.json()["result"]["CALL_ID"] == call_id


def test_search_crm_entities(sandbox, portal, http):
    sandbox.add_crm(
        portal["member_id"],
        "contact",
        {"NAME": "Ann", "PHONE": [{"VALUE": "+4930123456"}], "ASSIGNED_BY_ID": "2"},
    )
    res = call(
        http, portal, "telephony.externalCall.searchCrmEntities", PHONE_NUMBER="+4930123456"
    ).json()["result"]
    assert (
        res[0]["CRM_ENTITY_TYPE"] == "CONTACT"
        and res[0]["ASSIGNED_BY"]["USER_PHONE_INNER"] == "102"
    )
