"""Acceptance: 8 processes x 50 threads hit one portal whose access token just expired."""

from __future__ import annotations

import pytest

from app.tenants.models import PortalStatus
from tests.tenants.conftest import reload_portal

PROCESSES, THREADS = 8, 50


@pytest.mark.serial  # 8 processes of 50 threads: on a loaded 2-core machine, past the timeout
def test_expired_token_under_400_concurrent_callers_refreshes_exactly_once(
        make_portal, sandbox, spawn_callers):
    # enterprise plan with a bucket large enough that rate limiting cannot fail a call
    portal, info = make_portal(plan="enterprise", bucket={"drain": 1000, "burst": 100000})
    sandbox.expire_tokens(portal.member_id)
    # ... and our own view of that bucket scaled to match, so no caller waits for the rate;
    # 399 callers wait for one refresh on SQLite: give them longer than the default 15 s, so
    # a slow machine cannot turn the wait into failures (the test is about refreshing once)
    unpaced = {"CALLER_CONFIG": '{"DISPATCH_BUCKET_SCALE": 1000, "B24_REFRESH_LOCK_WAIT": 45}'}
    procs = [spawn_callers(portal.member_id, THREADS, **unpaced) for _ in range(PROCESSES)]
    for proc in procs:
        proc.wait_ready()
    for proc in procs:  # release all 400 callers at once
        proc.go()
    reports = [proc.report() for proc in procs]

    counters = sandbox.counters(portal.member_id)
    ok = sum(r["ok"] for r in reports)
    failures = [e for r in reports for e in r["errors"]]
    print(f"\n{PROCESSES}x{THREADS} callers: ok={ok} refreshes={counters['refreshes']} "
          f"token_reuse={counters['violations']['refresh_token_reuse']} "
          f"401s={counters['status_401']} rest_requests={counters['rest_requests']} "
          f"slowest process={max(r['seconds'] for r in reports)}s")
    assert failures == []
    assert ok == PROCESSES * THREADS
    assert counters["refreshes"] == 1
    assert counters["token_grants"] == 1
    assert counters["violations"]["refresh_token_reuse"] == 0  # nobody presented a spent token
    stored = reload_portal(portal.member_id)
    assert stored.status == PortalStatus.ACTIVE.value
    assert stored.token_version == 2
    assert stored.refresh_token != info["refresh_token"]
