"""Each fault kind, counts and rates, portal rename (302) and deletion."""

from __future__ import annotations

import httpx
import pytest

from .conftest import call, refresh

JSON_FAULTS = {
    "http_500": (500, "INTERNAL_SERVER_ERROR"),
    "query_limit": (503, "QUERY_LIMIT_EXCEEDED"),
    "overload_limit": (503, "OVERLOAD_LIMIT"),
    "portal_deleted": (500, "PORTAL_DELETED"),
    "payment_required": (401, "PAYMENT_REQUIRED"),
    "not_installed": (401, "NOT_INSTALLED"),
    "access_denied": (403, "ACCESS_DENIED"),
    "expired_token": (401, "expired_token"),
    "operation_time_limit": (429, "OPERATION_TIME_LIMIT"),
}


@pytest.mark.parametrize("kind", sorted(JSON_FAULTS))
def test_json_faults(sandbox, portal, http, kind):
    sandbox.set_fault(portal["member_id"], kind, count=1)
    resp = call(http, portal, "profile")
    status, code = JSON_FAULTS[kind]
    assert resp.status_code == status and resp.json()["error"] == code
    assert call(http, portal, "profile").status_code == 200  # count exhausted
    assert (
        sandbox.log(portal["member_id"])[0]["method"] == "profile"
    )  # faulted request never executed
    assert len(sandbox.log(portal["member_id"])) == 1


@pytest.mark.parametrize("status", [502, 503, 504])
def test_html_gateway_pages(sandbox, portal, http, status):
    sandbox.set_fault(portal["member_id"], f"html_{status}")
    resp = call(http, portal, "batch", cmd={"a": "profile"})
    assert resp.status_code == status and resp.headers["content-type"].startswith("text/html")
    assert resp.text.lstrip().startswith("<html>")


def test_connection_reset(sandbox, portal, http):
    sandbox.set_fault(portal["member_id"], "reset", count=1)
    with pytest.raises(httpx.TransportError):
        call(http, portal, "profile")
    assert call(http, portal, "profile").status_code == 200


def test_hang_until_client_timeout_or_cap(sandbox, portal):
    sandbox.set_fault(portal["member_id"], "hang")
    with httpx.Client(timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
        client.post(portal["client_endpoint"] + "profile", json={"auth": portal["access_token"]})
    sandbox.settings(hang_cap=0.2)
    with httpx.Client(timeout=5) as client:
        resp = client.post(
            portal["client_endpoint"] + "profile", json={"auth": portal["access_token"]}
        )
    assert resp.status_code == 504


def test_fault_rate_and_removal(sandbox, portal, http):
    sandbox.set_fault(portal["member_id"], "http_500", rate=0.5)
    codes = [call(http, portal, "profile").status_code for _ in range(60)]
    assert 10 < codes.count(500) < 50
    sandbox.set_fault(portal["member_id"], "http_500", rate=0)
    assert call(http, portal, "profile").status_code == 200
    counters = sandbox.counters(portal["member_id"])
    assert counters["faults_injected"] == codes.count(500)
    assert counters["faults_by_kind"] == {"http_500": codes.count(500)}


def test_faults_are_counted_per_kind(sandbox, portal, http):
    member = portal["member_id"]
    sandbox.set_fault(member, "reset", count=2)
    sandbox.set_fault(member, "executed_504", count=1)
    outcomes = []
    for _ in range(4):
        try:
            outcomes.append(call(http, portal, "profile").status_code)
        except httpx.TransportError:
            outcomes.append("reset")
    assert outcomes == ["reset", "reset", 504, 200]
    counters = sandbox.counters(member)
    assert counters["faults_by_kind"] == {"reset": 2, "executed_504": 1}
    assert counters["faults_injected"] == 3 and counters["executed_504"] == 1


def test_rename_answers_302_and_token_reports_new_endpoint(sandbox, portal, http):
    moved = sandbox.rename_portal(portal["member_id"])
    assert (
        moved["client_endpoint"] != portal["client_endpoint"]
        and moved["member_id"] == portal["member_id"]
    )
    resp = http.post(
        portal["client_endpoint"] + "profile?x=1", json={"auth": portal["access_token"]}
    )
    assert resp.status_code == 302
    assert resp.headers["location"] == moved["client_endpoint"] + "profile?x=1"
    assert call(http, moved, "profile", portal["access_token"]).status_code == 200
    assert (
        refresh(http, sandbox, portal["refresh_token"]).json()["client_endpoint"]
        == moved["client_endpoint"]
    )


def test_deleted_portal(sandbox, portal, http):
    sandbox.delete_portal(portal["member_id"])
    resp = call(http, portal, "profile")
    assert resp.status_code == 500 and resp.json()["error"] == "PORTAL_DELETED"
    assert refresh(http, sandbox, portal["refresh_token"]).json()["error"] == "invalid_grant"


def test_executed_then_504_runs_the_command_but_answers_a_gateway_page(sandbox, portal, http):
    member = portal["member_id"]
    sandbox.set_fault(member, "executed_504", count=1)
    resp = call(http, portal, "batch", cmd={"a": "crm.deal.add?fields[TITLE]=lost answer"})
    assert resp.status_code == 504 and resp.headers["content-type"].startswith("text/html")
    ran = sandbox.log(member, method="crm.deal.add")
    assert [e["params"]["fields"]["TITLE"] for e in ran] == ["lost answer"]
    assert sandbox.counters(member)["executed_504"] == 1
    assert call(http, portal, "profile").status_code == 200  # count exhausted
