"""Operating time end to end: an engine in this process, a sandbox portal that counts each
method's seconds and refuses it past its budget (protocol §6.2). The dispatcher pauses a
method before the portal does, batches in flight included, and a refusal that still comes
is waited out, never dead-lettered."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.bitrix import RestClient
from app.dispatcher import Priority, outcomes, policy, submit
from app.dispatcher.ledger import OperatingLedger
from app.dispatcher.models import CommandStatus
from app.dispatcher.packer import Candidate
from app.dispatcher.policy import Verdict
from app.extensions import db
from tests.conftest import wait_for
from tests.dispatcher.conftest import rows, settled

pytestmark = pytest.mark.timeout(180)
ADD = "crm.deal.add"


def _costly_portal(make_portal: Any, sandbox: Any, cost: float, budget: float) -> Any:
    portal, info = make_portal()
    mid = info["member_id"]
    sandbox.set_bucket(mid, drain=100, burst=1000)
    sandbox.set_latency(mid, 0)  # only the method's own cost books operating time
    sandbox.set_method_cost(mid, ADD, cost)
    sandbox.set_operating_limit(budget, member_id=mid)
    return portal, info


def test_batches_in_flight_never_take_a_method_past_the_portals_budget(
        make_portal, sandbox, start_engine, redis_client):
    """120 commands at 0.05 s each (6 s) against a budget of 4 s: the engine used to send
    them all at once, three batches side by side, as the ledger had heard of none of their
    seconds yet; the portal refused the third of them past its budget. Reserved as they
    leave, only what fits under 80 % goes, and the rest waits for the window."""
    portal, info = _costly_portal(make_portal, sandbox, cost=0.05, budget=4.0)
    mid = info["member_id"]
    start_engine(DISPATCH_LINGER_MS=0, DISPATCH_OPERATING_LIMIT=4.0)
    first = submit(portal.id, ADD, {"fields": {"TITLE": "teaches the cost"}})
    db.session.commit()
    assert settled(portal.id, 1)[0].id == first
    for n in range(120):
        submit(portal.id, ADD, {"fields": {"TITLE": str(n)}}, key=f"call-{n % 40}",
               priority=Priority.BULK)
    db.session.commit()
    ledger = OperatingLedger(redis_client, limit=4.0)
    wait_for(lambda: ledger.pause_until(mid, ADD) is not None
             and not [r for r in rows(portal.id) if r.status == "inflight"], timeout=60)
    found = rows(portal.id)
    done = [r for r in found if r.status == "done"]
    assert not [r for r in found if r.status == "dead"]
    assert sandbox.counters(mid).get("operation_time_limit", 0) == 0
    # 80 % of 4 s at 0.05 s (more on a loaded machine): up to 64 commands, in more than one
    # batch of 50 side by side; the others stay queued for the window
    assert 40 <= len(done) <= 65, len(done)
    assert len({r.batch_id for r in done}) >= 2
    assert {r.status for r in found if r not in done} == {"queued"}


def test_a_refusal_that_still_comes_is_waited_out_and_never_dead_lettered(
        make_portal, sandbox, start_engine, redis_client):
    """OPERATION_TIME_LIMIT is not the command's failure: it goes again once the method's
    budget resets, its attempt not counted, however long it has been retried already."""
    portal, info = make_portal()
    mid = info["member_id"]
    sandbox.set_fault(mid, "operation_time_limit", count=1, methods=[ADD])
    start_engine(DISPATCH_LINGER_MS=0)
    refused = submit(portal.id, ADD, {"fields": {"TITLE": "refused"}}, key="call-1")
    other = submit(portal.id, "user.current", {})
    db.session.commit()
    settled(portal.id, 1)
    wait_for(lambda: {r.id: r.status for r in rows(portal.id)}
             == {refused: "queued", other: "done"})
    row = {r.id: r for r in rows(portal.id)}[refused]
    assert row.attempts == 0 and row.error["error"] == "OPERATION_TIME_LIMIT"
    wait_s = (row.not_before - row.first_sent_at).total_seconds()
    assert 50 <= wait_s <= 70  # no operating_reset_at in a batch: the next bucket, a minute
    ledger = OperatingLedger(redis_client)
    assert ledger.pause_until(mid, ADD) is not None  # the method, not the portal
    assert ledger.pause_until(mid, "user.current") is None

    # Past the retry horizon a refusal still only waits: its answer, as the portal gives it
    rest = RestClient()
    try:
        sandbox.set_fault(mid, "operation_time_limit", count=1, methods=[ADD])
        answer = rest.batch(info["client_endpoint"], {"c1": (ADD, {"fields": {}}),
                                                      "c2": ("user.current", {})},
                            info["access_token"])
    finally:
        rest.close()
    assert answer.errors["c1"].code == "OPERATION_TIME_LIMIT"
    now = datetime.now(UTC)
    old = Candidate(1, ADD, {}, "call-9", None, Priority.NORMAL.value, attempts=40,
                    first_sent_at=now - timedelta(days=3))
    ran = Candidate(2, "user.current", {}, None, None, Priority.NORMAL.value)
    [update, _], effects = outcomes.decide([old, ran], answer, now, outcomes.Rules(
        timedelta(hours=24), policy.ResendLimits(register_window=timedelta(minutes=25))))
    assert update["status"] == CommandStatus.QUEUED.value and update["attempts_delta"] == -1
    assert update["not_before"] > now
    assert effects.verdicts == {Verdict.OPERATING: 1, Verdict.DONE: 1}
    # the refused command did not run: it costs nothing and teaches the ledger no cost
    assert effects.costed == {"user.current": 1} and set(effects.processing) == {"user.current"}
