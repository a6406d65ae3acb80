"""One way out: a direct call and the engine's batches share the portal's bucket and its
single-flight refresh (the sandbox portal over real HTTP, real Redis, a real engine)."""

from __future__ import annotations

import time

import pytest

from app.bitrix import errors
from app.dispatcher import direct, submit
from app.extensions import db
from tests.conftest import wait_for
from tests.dispatcher.conftest import settled
from tests.tenants.conftest import reload_portal

# A QUERY_LIMIT_EXCEEDED fills the standard bucket to its burst (50); the next token is
# free once it drained below our capacity (48): (50 + 1 - 48) / 1.98 = 1.5 s later.
REFILL = (50 + 1 - 48) / 1.98


def test_an_engine_batch_waits_for_the_bucket_a_direct_call_filled(make_portal, sandbox,
                                                                    start_engine):
    portal, info = make_portal()
    start_engine(DISPATCH_LINGER_MS=0)
    sandbox.set_fault(info["member_id"], "query_limit", count=1)
    with pytest.raises(errors.QueryLimitExceeded):
        direct.call_method(portal, "user.current")
    filled = time.monotonic()
    submit(portal.id, "user.current", {})
    db.session.commit()
    done = settled(portal.id, 1)
    waited = time.monotonic() - filled
    assert done[0].status == "done", done[0].error
    assert sandbox.counters(info["member_id"])["rest_requests"] == 2  # sent once, when free
    assert waited >= REFILL - 0.2, f"the batch left {waited:.2f} s after the bucket was filled"


def test_a_direct_call_waits_for_the_bucket_an_engine_batch_filled(make_portal, sandbox,
                                                                    start_engine, redis_client):
    portal, info = make_portal()
    start_engine(DISPATCH_LINGER_MS=0)
    sandbox.set_fault(info["member_id"], "query_limit", count=1)
    submit(portal.id, "user.current", {})
    db.session.commit()
    key = f"b24relay:bucket:{info['member_id']}"  # the engine fills it after storing the answer
    wait_for(lambda: float(redis_client.hget(key, "level") or 0) > 48, interval=0.01)
    started = time.monotonic()
    assert direct.call_method(portal, "user.current")["ID"] == "1"
    waited = time.monotonic() - started
    assert settled(portal.id, 1)[0].status == "done"
    assert sandbox.counters(info["member_id"])["rest_requests"] == 3
    assert waited >= REFILL - 0.3, f"the direct call went {waited:.2f} s after the fill"


def test_a_direct_call_and_an_engine_batch_meeting_expired_token_refresh_once(
        make_portal, sandbox, start_engine):
    portal, info = make_portal()
    sandbox.expire_tokens(info["member_id"])
    start_engine(DISPATCH_LINGER_MS=0)
    submit(portal.id, "user.current", {})
    db.session.commit()  # the engine meets expired_token while the direct call does too
    assert direct.call_method(portal, "user.current")["ID"] == "1"
    assert settled(portal.id, 1)[0].status == "done"
    assert sandbox.counters(info["member_id"])["refreshes"] == 1
    assert reload_portal(info["member_id"]).token_version == 2
