"""batch: ≤50 commands, overflow errors, halt, $result references, PHP shapes, encoding, outer
errors.
"""

from __future__ import annotations

from urllib.parse import quote

from .conftest import call


def test_documented_failing_command_shape(portal, http):
    resp = call(
        http, portal, "batch", halt=0, cmd={"adm": "user.admin", "deal": "crm.deal.get?id=759"}
    )
    assert resp.status_code == 200
    body = resp.json()
    assert list(body) == ["result", "time"]
    res = body["result"]
    assert list(res) == ["result", "result_error", "result_total", "result_next", "result_time"]
    assert res["result"] == {"adm": True}
    assert res["result_error"] == {"deal": {"error": "NOT_FOUND", "error_description": "Not found"}}
    assert res["result_total"] == [] and res["result_next"] == []  # empty PHP arrays
    assert set(res["result_time"]["adm"]) == {
        "start",
        "finish",
        "duration",
        "processing",
        "date_start",
        "date_finish",
    }
    assert "operating" not in body["time"]


def test_more_than_50_commands(sandbox, portal, http):
    cmd = {f"c{i}": "user.admin" for i in range(53)}
    res = call(http, portal, "batch", cmd=cmd).json()["result"]
    assert len(res["result"]) == 50
    assert res["result_error"] == {
        f"c{i}": {
            "error": "ERROR_BATCH_LENGTH_EXCEEDED",
            "error_description": "Max batch length exceeded",
        }
        for i in (50, 51, 52)
    }
    assert len(sandbox.log(portal["member_id"])) == 50


def test_halt_stops_at_first_error(portal, http):
    cmd = {"a": "user.admin", "b": "crm.deal.get?id=1", "c": "profile"}
    res = call(http, portal, "batch", halt=1, cmd=cmd).json()["result"]
    assert list(res["result"]) == ["a"] and list(res["result_error"]) == ["b"]
    res = call(http, portal, "batch", halt=0, cmd=cmd).json()["result"]
    assert set(res["result"]) == {"a", "c"}


def test_result_references(portal, http):
    cmd = {
        "c": "crm.contact.add?fields[NAME]=Ann&fields[PHONE][0][VALUE]=%2B4930123",
        "g": "crm.contact.get?id=$result[c]",
        "l": "crm.contact.list?filter[ID]=$result[c]",
        "n": "crm.contact.get?id=$result[l][0][ID]",
        "bad": "crm.contact.get?id=$result[nope][ID]",
    }
    res = call(http, portal, "batch", cmd=cmd).json()["result"]
    assert res["result"]["g"]["NAME"] == "Ann" and res["result"]["g"]["PHONE"] == [
        {"VALUE": "+4930123"}
    ]
    assert res["result"]["n"]["ID"] == res["result"]["g"]["ID"]
    assert res["result_total"] == {"l": 1}
    assert res["result_error"]["bad"]["error"] == "ERROR_ARGUMENT"


def test_list_cmd_gives_list_sections(portal, http):
    res = call(http, portal, "batch", cmd=["user.admin", "profile"]).json()["result"]
    assert isinstance(res["result"], list) and res["result"][0] is True
    assert isinstance(res["result_time"], list) and res["result_error"] == []
    res = call(http, portal, "batch", cmd=["user.admin", "crm.deal.get?id=9"]).json()["result"]
    assert res["result"] == [True] and res["result_error"] == {
        "1": {"error": "NOT_FOUND", "error_description": "Not found"}
    }


def test_form_encoded_batch_is_encoded_twice(portal, http):
    inner = "crm.contact.add?fields[NAME]=" + quote("A&B=C+D", safe="")
    resp = http.post(
        portal["client_endpoint"] + "batch",
        content=f"auth={portal['access_token']}&cmd[x]={quote(inner, safe='')}"
        f"&cmd[y]={quote('crm.contact.get?id=$result[x]', safe='')}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    res = resp.json()["result"]
    assert res["result"]["y"]["NAME"] == "A&B=C+D"


def test_nested_batch_forbidden(portal, http):
    res = call(http, portal, "batch", cmd={"n": "batch?cmd[a]=profile"}).json()["result"]
    assert res["result_error"]["n"]["error"] == "ERROR_BATCH_METHOD_NOT_ALLOWED"


def test_outer_auth_failure_is_top_level(sandbox, portal, http):
    sandbox.expire_tokens(portal["member_id"])
    resp = call(http, portal, "batch", cmd={"a": "profile"})
    assert resp.status_code == 401 and resp.json()["error"] == "expired_token"
