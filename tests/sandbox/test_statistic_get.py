"""voximplant.statistic.get in the sandbox (protocol §8.13): the reconciliation tool for a
finish whose answer was lost. It lists finished calls only, filters on CALL_ID or
EXTERNAL_CALL_ID, and shows a user only what he may see."""

from __future__ import annotations

from typing import Any

import httpx

from .conftest import call

USERS = [
    {"id": 1, "name": "Ada", "admin": True, "extension": "101"},
    {"id": 2, "name": "Bob", "extension": "102"},
]
STATS = "voximplant.statistic.get"


def _register(http: httpx.Client, portal: dict[str, Any], external: str, user: int) -> str:
    answer = call(http, portal, "telephony.externalCall.register", USER_ID=user,
                  PHONE_NUMBER="+4930123456", TYPE=2, SHOW=0, EXTERNAL_CALL_ID=external)
    return str(answer.json()["result"]["CALL_ID"])


def _finish(http: httpx.Client, portal: dict[str, Any], call_id: str, user: int) -> None:
    answer = call(http, portal, "telephony.externalCall.finish", CALL_ID=call_id, USER_ID=user,
                  DURATION=7, STATUS_CODE="200")
    assert answer.status_code == 200, answer.text


def test_statistics_list_finished_calls_only_filtered_by_call_id(sandbox, http):
    portal = sandbox.create_portal(users=USERS)
    done = _register(http, portal, "pbx-done", 1)
    active = _register(http, portal, "pbx-active", 1)
    _finish(http, portal, done, 1)
    found = call(http, portal, STATS, FILTER={"CALL_ID": done}).json()
    assert found["total"] == 1
    [row] = found["result"]
    assert (row["CALL_ID"], row["EXTERNAL_CALL_ID"], row["PORTAL_USER_ID"],
            row["CALL_DURATION"], row["CALL_FAILED_CODE"]) == (done, "pbx-done", "1", "7", "200")
    assert "RECORD" not in row and "OWNER" not in row, "the sandbox's bookkeeping stays out"
    still_active = call(http, portal, STATS, FILTER={"CALL_ID": active}).json()
    assert still_active["result"] == [], "an active call has no statistics row"
    by_external = call(http, portal, STATS, FILTER={"EXTERNAL_CALL_ID": "pbx-done"}).json()
    assert [r["CALL_ID"] for r in by_external["result"]] == [done]


def test_statistics_show_an_employee_only_his_own_calls(sandbox, http):
    portal = sandbox.create_portal(users=USERS)
    mine, theirs = _register(http, portal, "bob", 2), _register(http, portal, "ada", 1)
    _finish(http, portal, mine, 2)
    _finish(http, portal, theirs, 1)
    bob = sandbox.issue_tokens(portal["member_id"], user_id=2)["access_token"]
    seen = call(http, portal, STATS, token=bob).json()["result"]
    assert [r["CALL_ID"] for r in seen] == [mine]
    admin = call(http, portal, STATS).json()["result"]
    assert {r["CALL_ID"] for r in admin} == {mine, theirs}


def test_statistics_refuse_a_filter_they_do_not_model(sandbox, http):
    portal = sandbox.create_portal(users=USERS)
    answer = call(http, portal, STATS, FILTER={">CALL_DURATION": 5})
    assert answer.status_code == 400 and answer.json()["error"] == "ERROR_ARGUMENT"
