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
    # an idle portal costs nothing: its books go with the window
    wait_for(lambda: not redis_client.exists("b24relay:operating:p:crm.deal.list"), timeout=2)


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


def test_seconds_in_flight_count_before_their_answer_lands(redis_client):
    """A batch reserves its commands at the cost the last answers showed; its answer swaps
    the reservation for what it cost, or books it as spent when the answer says not."""
    ledger = OperatingLedger(redis_client, limit=10.0)  # paused at 8 s
    finish = "telephony.externalcall.finish"
    assert ledger.budget("p", finish).room >= 80  # nothing known: PRIOR_COST per command
    ledger.add_batch("p", {finish: 2.0}, {finish: 2})  # two finishes answered: 1 s each
    assert ledger.budget("p", finish).room == 6
    reserved = ledger.reserve("p", {"b1": {finish: 4}, "b2": {finish: 2}}, ttl=60)
    assert reserved == {"b1": {finish: 4.0}, "b2": {finish: 2.0}}
    budget = ledger.budget("p", finish)
    assert budget.until is not None and budget.room == 0 and budget.used == 8.0
    ledger.settle("p", "b1", {finish: 4}, {finish: 3.0}, {finish: 4})  # cheaper than feared
    budget = ledger.budget("p", finish)
    assert budget.until is None and budget.used == pytest.approx(7.0)
    # the cost came down, slowly (0.75 s a finish this time): one more fits, not two
    assert budget.room == 2 and ledger.reserve("p", {"b3": {finish: 1}}, 60)["b3"][finish] \
        == pytest.approx(1.0 + (0.75 - 1.0) * 0.3)
    ledger.settle("p", "b3", {finish: 1}, {finish: 1.0}, {finish: 1})
    ledger.settle("p", "b2", {finish: 2}, None)  # a 504 after it ran: it may have cost that
    assert ledger.budget("p", finish).used == pytest.approx(2.0 + 3.0 + 1.0 + 2.0)
    assert ledger.pause_until("p", finish) is not None
    assert ledger.budget("p", "telephony.externalcall.register").until is None


def test_a_reservation_whose_answer_never_comes_lapses(redis_client):
    ledger = OperatingLedger(redis_client, limit=1.0)
    ledger.reserve("p", {"lost": {"crm.deal.add": 10}}, ttl=0.5)  # 1 s at PRIOR_COST
    assert ledger.pause_until("p", "crm.deal.add") is not None
    wait_for(lambda: ledger.pause_until("p", "crm.deal.add") is None, timeout=3)
    assert ledger.budget("p", "crm.deal.add").used == 0.0


def test_seconds_stay_a_whole_window_after_they_were_booked(redis_client):
    """Bitrix24's minute buckets start at its own first call and ours cannot line up with
    them: a bucket of ours that opened earlier than the portal's must not let seconds booked
    later in it leave the window before the portal lets them go."""
    window = 2.0
    ledger = OperatingLedger(redis_client, limit=2.0, window=window)  # paused at 1.6 s
    ledger.add("p", "m", 1.0)
    time.sleep(0.15)
    second = time.time()
    ledger.add("p", "m", 1.0)
    time.sleep(0.15)
    ledger.add("p", "m", 1.0)
    # 3 s booked: the pause lasts until the first two have left, the second booked at
    # ``second``; a tenth of the window per bucket let it go with the first
    until = ledger.pause_until("p", "m")
    assert until is not None and until >= second + window - 0.01, until - second
    assert until <= second + window + 0.2
