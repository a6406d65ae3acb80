"""The per-portal rate bucket in real Redis, paced against the sandbox portal's own bucket."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio

from app.bitrix import RestClient, errors
from app.dispatcher import direct
from app.dispatcher.bucket import REALTIME_WINDOW, AsyncRateBucket, RateBucket, limits, reserve
from app.extensions import db
from app.tenants.models import Portal, PortalStatus
from tests.conftest import ROOT

CLIENT_ID, CLIENT_SECRET = "app.d2bucket", "d2-secret"
FAST = {"fast": (20.0, 10)}  # the sandbox's bucket scaled up 10x in rate, down 5x in size

# One pacing process: THREADS threads share COUNT requests, each taking a token before sending.
PACER = """
import json, sys, threading, time
import redis
from app.bitrix import RestClient
from app.dispatcher.bucket import RateBucket

url, endpoint, token, count, threads = sys.argv[1:6]
bucket = RateBucket(redis.Redis.from_url(url), plans={"fast": (20.0, 10)})
rest, lock, left, codes = RestClient(), threading.Lock(), [int(count)], []
print("READY", flush=True)
sys.stdin.readline()

def work():
    while True:
        with lock:
            if left[0] == 0:
                return
            left[0] -= 1
        while (wait := bucket.take("shared", "fast")) > 0:
            time.sleep(wait)
        try:
            rest.call(endpoint, "user.current", None, token)
            codes.append("ok")
        except Exception as exc:
            codes.append(getattr(exc, "code", type(exc).__name__))

started = time.monotonic()
pool = [threading.Thread(target=work) for _ in range(int(threads))]
for t in pool: t.start()
for t in pool: t.join()
print(json.dumps({"codes": codes, "seconds": time.monotonic() - started}), flush=True)
"""


def test_two_processes_pacing_with_the_bucket_never_overflow_the_portal(sandbox, redis_url,
                                                                        redis_client):
    portal = sandbox.create_portal()
    sandbox.set_bucket(portal["member_id"], drain=20, burst=10)
    args = [redis_url, portal["client_endpoint"], portal["access_token"], "40", "3"]
    procs = [subprocess.Popen([sys.executable, "-c", PACER, *args], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(2)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "READY"
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        reports = [json.loads(proc.stdout.readline()) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    codes = [code for report in reports for code in report["codes"]]
    assert codes == ["ok"] * 80, codes
    assert sandbox.counters(portal["member_id"])["query_limit_exceeded"] == 0
    # Together, not each: 8 at once then 19.8/s is 3.6 s; two private budgets would halve it.
    drain, capacity = limits(*FAST["fast"])
    ideal = (80 - capacity) / drain
    slowest = max(report["seconds"] for report in reports)
    print(f"80 requests from 2 processes x 3 threads: {slowest:.2f} s, ideal {ideal:.2f} s")
    assert ideal * 0.95 <= slowest <= ideal * 1.25


def test_query_limit_fills_the_bucket_for_everyone(sandbox, redis_client):
    portal = sandbox.create_portal()
    sandbox.set_bucket(portal["member_id"], drain=20, burst=10, level=10)
    sandbox.set_fault(portal["member_id"], "query_limit", count=1)  # refused while it is full
    mine, theirs = RateBucket(redis_client, plans=FAST), RateBucket(redis_client, plans=FAST)
    args = (portal["client_endpoint"], "user.current", None, portal["access_token"])
    rest = RestClient()
    try:
        assert mine.take(portal["member_id"], "fast") == 0.0
        with pytest.raises(errors.QueryLimitExceeded):
            rest.call(*args)
        mine.fill(portal["member_id"], "fast")
        wait = theirs.take(portal["member_id"], "fast")
        assert wait == pytest.approx((10 + 1 - 8) / 19.8, abs=0.02)  # until below our capacity
        time.sleep(wait)
        assert theirs.take(portal["member_id"], "fast") == 0.0
        assert rest.call(*args)["result"]["ID"] == "1"
    finally:
        rest.close()


SLOW = {"enterprise": (0.05, 250)}  # a burst of 250 and so slow a drain that timing is moot


def test_async_and_sync_buckets_share_one_budget(redis_url, redis_client):
    _drain, capacity = limits(*SLOW["enterprise"])

    async def drain_it() -> list[float]:
        client = redis.asyncio.Redis.from_url(redis_url)
        bucket = AsyncRateBucket(client, plans=SLOW)
        try:
            return [await bucket.take("m1", "enterprise") for _ in range(int(capacity) + 1)]
        finally:
            await client.aclose()

    waits = asyncio.run(drain_it())
    assert waits[:-1] == [0.0] * int(capacity) and waits[-1] > 0.0
    sync = RateBucket(redis_client, plans=SLOW)
    assert sync.take("m1", "enterprise") > 0.0
    assert sync.take("m2", "enterprise") == 0.0  # another portal has its own bucket


def test_bulk_leaves_a_reserve_to_real_time_work_once_a_portal_has_some(redis_client):
    bucket = RateBucket(redis_client, plans=SLOW)
    drain, capacity = limits(*SLOW["enterprise"])
    kept = reserve(drain)
    # a bulk-only portal: bulk may fill the whole bucket
    assert [bucket.take("bulky", "enterprise", realtime=False)
            for _ in range(int(capacity))] == [0.0] * int(capacity)
    assert not redis_client.exists("b24relay:bucket:bulky:rt")
    # a portal with calls: one real-time take marks it, and bulk stops short of the reserve
    assert bucket.take("calls", "enterprise") == 0.0
    ttl = redis_client.pttl("b24relay:bucket:calls:rt")
    assert 0 < ttl <= REALTIME_WINDOW * 1000
    bulk = [bucket.take("calls", "enterprise", realtime=False) for _ in range(int(capacity))]
    assert bulk.count(0.0) == int(capacity) - kept - 1 and bulk[-1] > 0.0
    # ... so a call that arrives now leaves at once, up to the capacity
    assert [bucket.take("calls", "enterprise") for _ in range(kept)] == [0.0] * kept
    assert bucket.take("calls", "enterprise") > 0.0


def test_an_idle_portal_leaves_nothing_behind(redis_client):
    bucket = RateBucket(redis_client)
    bucket.take("idle", "standard")
    ttl = redis_client.pttl("b24relay:bucket:idle")
    assert 0 < ttl <= 1000 + 1000 / 1.98 + 5  # gone once drained, plus a second


def test_unknown_plan_counts_as_standard(redis_client):
    bucket = RateBucket(redis_client)
    assert [bucket.take("p", "no-such-plan") for _ in range(48)] == [0.0] * 48
    assert bucket.take("p", "no-such-plan") > 0.0


@pytest.fixture
def portal_row(app: Any, sandbox: Any) -> tuple[Portal, dict[str, Any]]:
    """A standard sandbox portal and its Portal row."""
    app.config.update(B24_CLIENT_ID=CLIENT_ID, B24_CLIENT_SECRET=CLIENT_SECRET)
    info = sandbox.create_portal(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    portal = Portal(member_id=info["member_id"], domain=info["domain"],
                    client_endpoint=info["client_endpoint"],
                    server_endpoint=info["server_endpoint"], access_token=info["access_token"],
                    refresh_token=info["refresh_token"],
                    expires_at=datetime.fromtimestamp(info["expires"], UTC), token_version=1,
                    status=PortalStatus.ACTIVE.value)
    db.session.add(portal)
    db.session.commit()
    return portal, info


def test_direct_calls_wait_for_the_budget_the_dispatcher_used(portal_row, sandbox, redis_client):
    portal, info = portal_row
    dispatcher = RateBucket(redis_client)
    for _ in range(48):  # the dispatcher sent 48 batches just now
        assert dispatcher.take(portal.member_id, "standard") == 0.0
    sandbox.set_bucket(portal.member_id, drain=2, burst=50, level=48)
    started = time.monotonic()
    for _ in range(3):
        assert direct.call_method(portal, "user.current")["ID"] == "1"
    assert sandbox.counters(portal.member_id)["query_limit_exceeded"] == 0
    assert time.monotonic() - started >= 2.5 / 1.98  # each waited for its token


def test_a_direct_call_that_meets_the_limit_fills_the_bucket(portal_row, sandbox, redis_client):
    portal, _ = portal_row
    sandbox.set_fault(portal.member_id, "query_limit", count=1)
    with pytest.raises(errors.QueryLimitExceeded):
        direct.call_method(portal, "user.current")
    assert RateBucket(redis_client).take(portal.member_id, "standard") > 1.0
