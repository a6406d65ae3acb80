"""Leaky bucket (rate and burst, batch = 1), operating time (429), the 60 s request kill."""

from __future__ import annotations

import time

import httpx
import pytest

from .conftest import call

OVERFLOW = {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}


def burst(http, portal, n):
    return [call(http, portal, "user.admin").status_code for _ in range(n)]


def test_burst_then_overflow_with_documented_body(sandbox, portal, http):
    sandbox.set_bucket(portal["member_id"], drain=0.5, burst=5)
    assert burst(http, portal, 5) == [200] * 5
    resp = call(http, portal, "user.admin")
    assert resp.status_code == 503 and resp.json() == OVERFLOW
    counters = sandbox.counters(portal["member_id"])
    assert counters["query_limit_exceeded"] == 1 and counters["status_503"] == 1


def test_drain_rate(sandbox, portal, http):
    sandbox.set_bucket(portal["member_id"], drain=10, burst=5)
    assert burst(http, portal, 5) == [200] * 5
    assert call(http, portal, "user.admin").status_code == 503
    time.sleep(0.55)  # ~5.5 drained
    codes = burst(http, portal, 7)
    assert codes[:5] == [200] * 5 and codes[-1] == 503


def test_a_batch_is_one_request(sandbox, portal, http):
    sandbox.set_bucket(portal["member_id"], drain=0.01, burst=2)
    cmd = {f"c{i}": "user.admin" for i in range(50)}
    assert call(http, portal, "batch", cmd=cmd).status_code == 200
    assert call(http, portal, "batch", cmd=cmd).status_code == 200
    resp = call(http, portal, "batch", cmd=cmd)
    assert resp.status_code == 503 and resp.json() == OVERFLOW


@pytest.mark.serial  # 52 requests must land within a quarter second of the bucket's drain
def test_default_plans(sandbox, portal, http):
    codes = burst(http, portal, 52)
    assert codes.count(200) in (50, 51) and codes[-1] == 503
    ent = sandbox.create_portal(plan="enterprise")
    assert all(c == 200 for c in burst(http, ent, 120))


def test_operating_time_blocks_the_method_only(sandbox, portal, http):
    sandbox.set_operating_limit(0.2, member_id=portal["member_id"])
    sandbox.set_latency(portal["member_id"], 120)
    first = call(http, portal, "user.admin").json()
    assert first["time"]["operating"] >= 0.12 and first["time"]["operating_reset_at"] >= int(
        time.time()
    )
    assert call(http, portal, "user.admin").status_code == 200  # crosses the limit, still completes
    blocked = call(http, portal, "user.admin")
    assert blocked.status_code == 429
    assert blocked.json() == {
        "error": "OPERATION_TIME_LIMIT",
        "error_description": "Method is blocked due to operation time limit.",
    }
    assert call(http, portal, "profile").status_code == 200
    res = call(http, portal, "batch", cmd={"a": "user.admin", "b": "profile"}).json()["result"]
    assert (
        res["result_error"]["a"]["error"] == "OPERATION_TIME_LIMIT"
        and res["result"]["b"]["ID"] == "1"
    )
    assert sandbox.counters(portal["member_id"])["status_429"] == 1


def test_latency_that_is_waiting_costs_no_operating_time(sandbox, portal, http):
    sandbox.set_operating_limit(0.2, member_id=portal["member_id"])
    sandbox.set_latency(portal["member_id"], 120, operating=False)
    for _ in range(4):  # 0.48 s of latency, over the 0.2 s limit were it processing
        answer = call(http, portal, "user.admin").json()
        assert answer["time"]["duration"] >= 0.12 and answer["time"]["processing"] < 0.05
    assert answer["time"]["operating"] < 0.2
    batch = call(http, portal, "batch", cmd={"a": "user.admin"}).json()["result"]
    assert batch["result_time"]["a"]["processing"] < 0.05 and "a" in batch["result"]


def test_request_killed_after_timeout_but_command_ran(sandbox, portal, http):
    sandbox.settings(request_timeout=0.3)
    sandbox.set_latency(portal["member_id"], 600)
    resp = call(http, portal, "crm.contact.add", fields={"NAME": "slow"})
    assert resp.status_code == 504 and resp.headers["content-type"].startswith("text/html")
    time.sleep(0.4)
    assert sandbox.log(portal["member_id"], method="crm.contact.add")[0]["status"] == 200


def test_random_latency_and_in_flight(sandbox, portal):
    sandbox.set_latency(portal["member_id"], (100, 150))
    import concurrent.futures

    def one(_):
        with httpx.Client(timeout=5) as c:
            t0 = time.perf_counter()
            c.post(portal["client_endpoint"] + "profile", json={"auth": portal["access_token"]})
            return time.perf_counter() - t0

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        times = list(pool.map(one, range(8)))
    assert min(times) >= 0.1
    counters = sandbox.counters(portal["member_id"])
    assert counters["max_in_flight"] >= 4 and counters["in_flight"] == 0
