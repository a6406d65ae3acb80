"""One call's PBX events are handled one at a time, in order of arrival (app/ingress/ordering.py).

Real parts throughout: gunicorn takes the events in concurrent requests, a real Dramatiq
worker with 4 threads handles them, and the handler (tests/ingress/effect_handlers.py,
loaded only into that worker) records when it ran for which row.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from app.extensions import db
from app.ingress import auth, processing
from app.ingress.models import InboxStatus
from tests.conftest import wait_for
from tests.ingress.conftest import (
    HANDLER_MODULES,
    Gunicorn,
    add_inbox_row,
    queued_rows,
    statuses,
)
from tests.ingress.effect_handlers import ORDER_TABLE

CALLS, PER_CALL = 20, 10
AT = "2026-12-07T01:40:00+03:00"


def _call_events(call: int) -> list[dict[str, Any]]:
    """Ten valid events of one call, each different (none is a duplicate of another)."""
    call_id = f"call-{call}"
    events: list[dict[str, Any]] = [
        {"call_id": call_id, "event": "start", "at": AT, "direction": "in",
         "phone": "+74951234567", "extensions": ["101"]},
        {"call_id": call_id, "event": "answer", "at": AT, "extension": "101"}]
    events += [{"call_id": call_id, "event": "transfer", "at": AT, "from_extension": str(100 + n),
                "to_extension": str(101 + n)} for n in range(1, 7)]
    events += [{"call_id": call_id, "event": "end", "at": AT, "status": "answered",
                "duration": 42},
               {"call_id": call_id, "event": "record", "at": AT,
                "url": f"https://pbx.example/r/{call}.mp3"}]
    return events


@pytest.fixture
def order_table(app: Any) -> Iterator[None]:
    with db.engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {ORDER_TABLE}"))
        conn.execute(text(f"CREATE TABLE {ORDER_TABLE} (call_id VARCHAR(64) NOT NULL,"
                          " inbox_id INTEGER NOT NULL, started FLOAT NOT NULL,"
                          " ended FLOAT NOT NULL)"))
    yield
    db.session.rollback()
    with db.engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {ORDER_TABLE}"))


def _runs() -> list[Any]:
    db.session.rollback()
    return db.session.execute(text(f"SELECT call_id, inbox_id, started, ended FROM {ORDER_TABLE}"
                                   " ORDER BY started")).all()


def test_each_calls_events_are_handled_one_at_a_time_in_order_of_arrival(
        app, portal, start_worker, order_table):
    key = auth.issue_api_key(portal)
    events = [ev for call in range(CALLS) for ev in _call_events(call)]
    random.shuffle(events)
    web = Gunicorn(app.config, WEB_CONCURRENCY="2", WEB_THREADS="4")
    try:
        start_worker(threads=4, modules=HANDLER_MODULES, INGRESS_TEST_ORDER_HANDLER="1")
        with httpx.Client(base_url=web.url, timeout=30,
                          headers={"Authorization": f"Bearer {key}"}) as client:
            def post(event: dict[str, Any]) -> int:
                response = client.post("/api/v1/calls/events", json=event)
                assert response.status_code == 202, response.text
                return response.json()["ids"][0]

            with ThreadPoolExecutor(max_workers=16) as pool:
                ids = list(pool.map(post, events))
        assert len(set(ids)) == CALLS * PER_CALL  # none was taken for a duplicate
        wait_for(lambda: statuses() == {"done": CALLS * PER_CALL}, timeout=120)
    finally:
        web.stop()

    runs = _runs()
    assert sorted(r.inbox_id for r in runs) == sorted(ids)  # each handled exactly once
    per_call: dict[str, list[Any]] = defaultdict(list)
    for run in runs:
        per_call[run.call_id].append(run)
    assert len(per_call) == CALLS
    for call_id, call_runs in per_call.items():
        assert [r.inbox_id for r in call_runs] == sorted(r.inbox_id for r in call_runs), call_id
        for before, after in zip(call_runs, call_runs[1:], strict=False):
            assert before.ended <= after.started, f"{call_id}: rows {before.inbox_id} and " \
                                                  f"{after.inbox_id} overlapped"


def _pbx_row(portal: Any, status: str, call: str = "call-1") -> int:
    # A PBX event of a kind nothing handles (intake would refuse it; stored directly here).
    return add_inbox_row(status, portal, source="pbx", event_type="nohandler", order_key=call,
                         payload={"call_id": call, "event": "nohandler"})


@pytest.mark.parametrize("earlier", [InboxStatus.QUEUED, InboxStatus.PROCESSING,
                                     InboxStatus.RECEIVED])
def test_a_row_waits_for_an_unfinished_earlier_row_of_its_call_without_spending_an_attempt(
        app, portal, earlier):
    first = _pbx_row(portal, earlier.value)
    second = _pbx_row(portal, InboxStatus.QUEUED.value)
    other_call = _pbx_row(portal, InboxStatus.QUEUED.value, call="call-2")
    keyless = add_inbox_row(InboxStatus.QUEUED.value, portal, event_type="NOHANDLER")
    assert processing.process(second) == "not_claimed"
    assert processing.process(other_call) == InboxStatus.UNHANDLED.value  # another call goes on
    assert processing.process(keyless) == InboxStatus.UNHANDLED.value
    db.session.rollback()
    row = db.session.execute(text("SELECT status, attempts FROM inbox_events WHERE id = :id"),
                             {"id": second}).one()
    assert (row.status, row.attempts) == ("queued", 0)
    assert first < second


@pytest.mark.parametrize("earlier", [InboxStatus.DONE, InboxStatus.DEAD, InboxStatus.UNHANDLED,
                                     InboxStatus.HELD])
def test_a_finished_or_parked_earlier_row_does_not_hold_its_call_back(app, portal, earlier):
    _pbx_row(portal, earlier.value)
    second = _pbx_row(portal, InboxStatus.QUEUED.value)
    assert processing.process(second) == InboxStatus.UNHANDLED.value  # claimed: no handler here


def test_finishing_a_row_queues_the_next_waiting_row_of_its_call(app, portal, redis_client):
    first = _pbx_row(portal, InboxStatus.QUEUED.value)
    second = _pbx_row(portal, InboxStatus.QUEUED.value)
    assert processing.process(second) == "not_claimed"
    assert queued_rows(redis_client, app) == []
    assert processing.process(first) == InboxStatus.UNHANDLED.value  # parked: lets go
    assert queued_rows(redis_client, app) == [second]
    assert processing.process(second) == InboxStatus.UNHANDLED.value
