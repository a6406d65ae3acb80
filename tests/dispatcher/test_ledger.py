"""The operating-time ledger in real Redis, fed by real answers of the sandbox portal."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio

from app.bitrix import RestClient, errors
from app.dispatcher.ledger import AsyncOperatingLedger, OperatingLedger, batch_charges
from tests.conftest import wait_for


@pytest.fixture
def portal(sandbox: Any) -> dict[str, Any]:
    return sandbox.create_portal(bucket={"drain": 100, "burst": 1000})


@pytest.fixture
def rest() -> Any:
    client = RestClient()
    yield client
    client.close()


def test_a_method_pauses_before_the_portal_blocks_it(portal, sandbox, rest, redis_client):
    mid = portal["member_id"]
    sandbox.set_operating_limit(0.3, member_id=mid)
    sandbox.set_latency(mid, 100)  # processing of each one-command batch
    ledger = OperatingLedger(redis_client, limit=0.3)
    commands = {"deals": ("crm.deal.list", {})}
    charged, first = [], time.time()
    while ledger.pause_until(mid, "CRM.DEAL.LIST") is None and len(charged) < 10:
        result = rest.batch(portal["client_endpoint"], commands, portal["access_token"])
        assert result.ok, result.errors  # never blocked by the portal
        charges = batch_charges(result, commands)
        ledger.add_batch(mid, charges)
        charged.append(charges["crm.deal.list"])
    # paused by the batch that took it to 80 % of 0.3 s (the third at 0.1 s each; the
    # portal's own clock may charge more on a loaded machine), and not before
    assert 2 <= len(charged) <= 3
    assert sum(charged[:-1]) < 0.8 * 0.3 <= sum(charged) + 1e-6
    assert ledger.pause_until(mid, "crm.deal.list") == pytest.approx(first + 600, abs=1.0)
    assert ledger.pause_until(mid, "user.current") is None
    assert ledger.pause_until("another-portal", "crm.deal.list") is None


def test_the_pause_ends_when_the_oldest_seconds_leave_the_window(redis_client):
    ledger = OperatingLedger(redis_client, limit=1.0, window=0.5)
    ledger.add("p", "crm.deal.list", 0.5)
    ledger.add("p", "crm.deal.list", 0.4)
    assert ledger.pause_until("p", "crm.deal.list") is not None
    wait_for(lambda: ledger.pause_until("p", "crm.deal.list") is None, timeout=2)
    assert not redis_client.exists("b24relay:operating:p:crm.deal.list")


def test_operation_time_limit_holds_only_that_method(portal, sandbox, rest, redis_client):
    mid = portal["member_id"]
    sandbox.set_operating_limit(0.05, member_id=mid)
    sandbox.set_latency(mid, 80)
    ledger = OperatingLedger(redis_client)  # the real limit is unknown: 480 s by default
    body = rest.call(portal["client_endpoint"], "crm.deal.list", {}, portal["access_token"])
    ledger.add(mid, "crm.deal.list", body["time"]["processing"])
    booked = time.time()
    with pytest.raises(errors.OperationTimeLimit) as exc_info:
        rest.call(portal["client_endpoint"], "crm.deal.list", {}, portal["access_token"])
    until = ledger.hold(mid, "crm.deal.list", exc_info.value.reset_at)
    assert until == pytest.approx(booked + 600, abs=1.0)  # no reset_at: the oldest bucket's end
    assert ledger.pause_until(mid, "crm.deal.list") == until
    assert ledger.pause_until(mid, "crm.deal.get") is None
    later = ledger.hold(mid, "crm.deal.list", until + 30)  # operating_reset_at when known
    assert ledger.pause_until(mid, "crm.deal.list") == later == until + 30


def test_async_ledger_shares_the_books(redis_url, redis_client):
    async def main() -> float | None:
        client = redis.asyncio.Redis.from_url(redis_url)
        ledger = AsyncOperatingLedger(client, limit=10.0)
        try:
            await ledger.add_batch("p", {"crm.deal.add": 4.0, "user.get": 1.0})
            await ledger.add("p", "CRM.DEAL.ADD", 4.5)
            held = await ledger.hold("p", "im.notify", time.time() + 60)
            assert await ledger.pause_until("p", "im.notify") == held
            return await ledger.pause_until("p", "crm.deal.add")
        finally:
            await client.aclose()

    paused = asyncio.run(main())
    assert paused is not None and paused > time.time() + 590
    sync = OperatingLedger(redis_client, limit=10.0)
    assert sync.pause_until("p", "crm.deal.add") == paused
    assert sync.pause_until("p", "user.get") is None
