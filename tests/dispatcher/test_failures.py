"""Failures per command: retries with backoff, dead letters, unknown outcomes, a token that
expired, a held portal, and idle portals that cost nothing."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from sqlalchemy import select

from app.dispatcher import submit
from app.dispatcher.sweep import sweep
from app.extensions import db
from app.tenants.models import Portal, PortalStatus
from app.tenants.status import set_status
from tests.conftest import wait_for
from tests.dispatcher.conftest import rows


def _settle_with_sweeps(portal_id: int, count: int, timeout: float = 20.0) -> list:
    """Run the sweep (as the periodic job would) until ``count`` commands are final."""
    def final() -> list | None:
        sweep()
        found = rows(portal_id)
        return found if sum(r.status in ("done", "dead") for r in found) >= count else None

    return wait_for(final, timeout=timeout, interval=0.2)


def test_a_gateway_error_is_retried_and_a_permanent_error_dead_lettered(make_portal, sandbox,
                                                                        start_engine):
    portal, info = make_portal()
    sandbox.set_fault(info["member_id"], "html_502", count=1)
    start_engine(DISPATCH_LINGER_MS=0)
    add = submit(portal.id, "crm.deal.add", {"fields": {"TITLE": "kept"}})
    get = submit(portal.id, "crm.deal.get", {"id": 987654})
    db.session.commit()
    by_id = {r.id: r for r in _settle_with_sweeps(portal.id, 2)}
    assert (by_id[add].status, by_id[add].attempts) == ("done", 2)
    assert by_id[get].status == "dead" and by_id[get].dead_reason == "NOT_FOUND: Not found"
    assert (by_id[add].outcome, by_id[get].outcome) == ("done", "dead")
    assert by_id[get].error == {"error": "NOT_FOUND", "error_description": "Not found"}
    assert len(sandbox.log(info["member_id"], method="crm.deal.add")) == 1


def test_an_unknown_outcome_is_resent_only_when_the_method_is_safe_to_repeat(
        make_portal, sandbox, start_engine):
    portal, info = make_portal()
    sandbox.set_fault(info["member_id"], "html_504", count=1)
    start_engine(DISPATCH_LINGER_MS=0)
    add = submit(portal.id, "crm.deal.add", {"fields": {"TITLE": "maybe"}})
    get = submit(portal.id, "crm.contact.list", {})
    db.session.commit()
    by_id = {r.id: r for r in _settle_with_sweeps(portal.id, 2)}
    assert by_id[add].status == "dead" and by_id[add].dead_reason.startswith("unknown outcome")
    assert by_id[get].status == "done"
    assert (by_id[add].outcome, by_id[get].outcome) == ("unknown", "done"), "told apart by a column"


def test_an_expired_token_costs_one_refresh_for_every_batch_in_flight(make_portal, sandbox,
                                                                      start_engine):
    portal, info = make_portal()
    sandbox.set_latency(info["member_id"], 200)
    sandbox.expire_tokens(info["member_id"])
    start_engine(DISPATCH_LINGER_MS=0)
    for n in range(150):
        submit(portal.id, "crm.deal.add", {"fields": {"TITLE": f"d{n}"}})
    db.session.commit()
    done = _settle_with_sweeps(portal.id, 150)
    assert [r.status for r in done] == ["done"] * 150
    assert {r.attempts for r in done} == {1}  # the refused sends did not count
    assert sandbox.counters(info["member_id"])["refreshes"] == 1
    assert len(sandbox.log(info["member_id"], method="crm.deal.add")) == 150


def test_a_held_portal_keeps_its_commands_and_resumes_when_active(make_portal, sandbox,
                                                                  start_engine):
    portal, info = make_portal()
    sandbox.set_fault(info["member_id"], "payment_required", count=1)
    start_engine(DISPATCH_LINGER_MS=0)
    ids = [submit(portal.id, "crm.deal.add", {"fields": {"TITLE": f"d{n}"}}) for n in range(3)]
    db.session.commit()
    wait_for(lambda: db.session.scalar(select(Portal.status).where(Portal.id == portal.id)
                                       .execution_options(populate_existing=True))
             == PortalStatus.PAYMENT_REQUIRED.value)
    held = rows(portal.id)
    assert [(r.status, r.attempts) for r in held] == [("queued", 0)] * 3
    assert portal.id not in sweep().nudged
    db.session.expire_all()
    set_status(db.session.get(Portal, portal.id), PortalStatus.ACTIVE)
    done = _settle_with_sweeps(portal.id, 3)
    assert [(r.id, r.status) for r in done] == [(i, "done") for i in ids]


@pytest.mark.parametrize("count", [200])
def test_idle_portals_hold_no_driver_no_lease_and_no_bucket(oauth_app, start_engine,
                                                            redis_client, count):
    for n in range(count):
        db.session.add(Portal(member_id=f"idle{n}", domain="idle.example",
                              client_endpoint="http://127.0.0.1:9/rest/", status="active"))
    db.session.commit()
    engine = start_engine()
    assert sweep().nudged == []
    from app.dispatcher import nudge
    from app.extensions import redis_ext
    ids = list(db.session.scalars(select(Portal.id)))
    nudge.publish(redis_ext.client, ids)  # as if every portal had been nudged by mistake
    wait_for(lambda: not engine.drivers and not redis_client.keys("b24relay:dispatch:*")
             and not redis_client.keys("b24relay:bucket:*"), timeout=10)


def test_stop_ends_even_when_a_task_swallows_its_cancel(oauth_app, start_engine):
    """The nudge listener was seen to carry on after its cancel (inside redis-py's pub/sub
    read) and stop() never returned; a task that swallows one cancel must not hang stop."""
    engine = start_engine()
    swallowed = threading.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()  # as the library did: go on as if nothing happened
        await asyncio.sleep(3600)

    asyncio.run_coroutine_threadsafe(_adopt(engine, stubborn), engine._loop).result(5)
    started = time.monotonic()
    engine.stop(timeout=1)
    assert swallowed.is_set() and not engine._thread.is_alive()
    assert time.monotonic() - started < 5


async def _adopt(engine, factory) -> None:
    """Run ``factory()`` as one of the engine's own long-lived tasks (like the listener)."""
    task = asyncio.create_task(factory(), name="stubborn")
    engine._tasks.append(task)
