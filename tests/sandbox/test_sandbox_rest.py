"""REST wire formats: bodies, names, list paging, error shapes, app.info/profile/user methods."""

from __future__ import annotations

from .conftest import call


def test_form_body_with_php_keys_and_json_suffix(portal, http):
    resp = http.post(
        portal["client_endpoint"] + "USER.Get.json",
        data={
            "auth": portal["access_token"],
            "FILTER[UF_PHONE_INNER]": "102",
            "FILTER[ACTIVE]": "Y",
        },
    )
    body = resp.json()
    assert resp.status_code == 200 and [u["ID"] for u in body["result"]] == ["2"]
    assert body["total"] == 1 and "next" not in body
    assert set(body["time"]) == {
        "start",
        "finish",
        "duration",
        "processing",
        "date_start",
        "date_finish",
        "operating_reset_at",
        "operating",
    }


def test_query_string_auth_and_array_params(portal, http):
    resp = http.get(
        portal["client_endpoint"] + "user.get",
        params=[("auth", portal["access_token"]), ("FILTER[ID][]", "1"), ("FILTER[ID][]", "3")],
    )
    assert [u["ID"] for u in resp.json()["result"]] == ["1", "3"]


def test_list_paging(sandbox, portal, http):
    for i in range(120):
        sandbox.add_crm(portal["member_id"], "contact", {"NAME": f"c{i}"})
    first = call(http, portal, "crm.contact.list").json()
    assert len(first["result"]) == 50 and first["next"] == 50 and first["total"] == 120
    last = call(http, portal, "crm.contact.list", start=100).json()
    assert len(last["result"]) == 20 and "next" not in last
    fast = call(http, portal, "crm.contact.list", start=-1).json()
    assert "total" not in fast


def test_error_shapes(portal, http):
    resp = call(http, portal, "no.such.method")
    assert resp.status_code == 404 and resp.json() == {
        "error": "ERROR_METHOD_NOT_FOUND",
        "error_description": "Method not found!",
    }
    missing = call(http, portal, "crm.deal.get", id=999)
    assert missing.status_code == 400 and missing.json()["error"] == "NOT_FOUND"


def test_app_info_profile_admin(sandbox, portal, http):
    info = call(http, portal, "app.info").json()["result"]
    assert info["LICENSE_FAMILY"] == "project" and info["INSTALLED"] is False
    sandbox.set_plan(portal["member_id"], "enterprise")
    assert call(http, portal, "app.info").json()["result"]["LICENSE_FAMILY"] == "ent"
    assert call(http, portal, "profile").json()["result"]["ADMIN"] is True
    user2 = sandbox.issue_tokens(portal["member_id"], user_id=2)
    assert call(http, portal, "user.admin", user2["access_token"]).json()["result"] is False
    assert (
        call(http, portal, "user.current", user2["access_token"]).json()["result"]["UF_PHONE_INNER"]
        == "102"
    )
    denied = call(
        http,
        portal,
        "placement.bind",
        user2["access_token"],
        PLACEMENT="CALL_CARD",
        HANDLER="http://a.b/c",
    )
    assert denied.status_code == 403 and denied.json()["error"] == "ACCESS_DENIED"


def test_scope_is_enforced(sandbox, http):
    p = sandbox.create_portal(scope="crm")
    resp = call(http, p, "telephony.externalLine.get")
    assert resp.status_code == 403 and resp.json()["error"] == "insufficient_scope"


def test_command_log(sandbox, portal, http):
    call(http, portal, "profile")
    call(http, portal, "batch", cmd={"a": "user.admin"})
    log = sandbox.log(portal["member_id"])
    assert [e["method"] for e in log] == ["profile", "user.admin"]
    assert log[1]["in_batch"] and log[1]["batch_id"] and not log[0]["in_batch"]
    assert all(e["finish"] >= e["start"] for e in log)
    assert [e["method"] for e in sandbox.log(portal["member_id"], since=log[0]["seq"])] == [
        "user.admin"
    ]
