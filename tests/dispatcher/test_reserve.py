"""Real-time work against a bucket kept full by bulk work, and a portal that waits out a pause."""

from __future__ import annotations

import random
import time

import redis
from sqlalchemy import func, select

from app.dispatcher import ref, submit
from app.dispatcher.ledger import OperatingLedger
from app.dispatcher.models import OutboxCommand, Priority
from app.dispatcher.packer import Candidate, pack_round
from app.extensions import db
from tests.conftest import wait_for
from tests.dispatcher.conftest import rows, settled


def _register(portal, n: int) -> int:
    return submit(portal.id, "telephony.externalcall.register",
                  {"USER_ID": 1, "PHONE_NUMBER": f"+49301{n:05d}", "TYPE": 2,
                   "EXTERNAL_CALL_ID": f"reserve-{n}", "SHOW": 0}, key=f"call-{n}",
                  priority=Priority.REALTIME)  # as telephony sends a card


def _row(command_id: int) -> OutboxCommand:
    db.session.expire_all()
    return db.session.get(OutboxCommand, command_id)


def _waited(command_id: int) -> float:
    row = _row(command_id)
    return (row.first_sent_at - row.submitted_at).total_seconds()


def _not_done(portal_id: int) -> int:
    return db.session.scalar(select(func.count()).select_from(OutboxCommand).where(
        OutboxCommand.portal_id == portal_id, OutboxCommand.status != "done"))


def test_a_call_leaves_at_once_while_bulk_work_keeps_the_bucket_full(make_portal, sandbox,
                                                                      start_engine):
    """A user sync drains a standard portal's bucket at 2 requests/s; calls arriving meanwhile
    must not wait the drain interval (0.5 s) for the next token: bulk leaves them a reserve."""
    portal, info = make_portal()
    start_engine(DISPATCH_LINGER_MS=0)
    _register(portal, 0)  # the portal has real-time traffic
    db.session.commit()
    wait_for(lambda: [r.status for r in rows(portal.id)] == ["done"])
    for n in range(4000):  # 80 batches: the bucket's 46-48, then ~17 s at 2/s
        submit(portal.id, "crm.deal.add", {"fields": {"TITLE": f"bulk {n}"}},
               priority=Priority.BULK)
    db.session.commit()
    wait_for(lambda: sandbox.counters(info["member_id"])["batches"] >= 45)
    calls, rng = [], random.Random(7)
    for n in range(1, 11):
        time.sleep(rng.uniform(0.5, 0.9))
        calls.append(_register(portal, n))
        db.session.commit()
        left = _not_done(portal.id)
        wait_for(lambda c=calls[-1]: _row(c).status == "done", interval=0.02)
    waits = [_waited(c) for c in calls]
    assert left > 50, "the bulk work ended before the last call: the bucket was not full"
    # Behind the bulk work without a reserve each call waits for the next token: evenly
    # 0-0.5 s, a mean of 0.25 s (a mean under 0.15 s by chance: ~1 %). With it: the
    # engine's own few tens of milliseconds, whatever the machine's load.
    mean = sum(waits) / len(waits)
    assert mean < 0.15, f"calls waited {waits} (mean {mean:.3f} s) behind bulk work"
    counters = sandbox.counters(info["member_id"])
    assert counters.get("status_503", 0) == 0  # the reserve is inside our capacity


def test_a_portal_whose_only_work_is_paused_is_woken_when_the_pause_ends(make_portal, sandbox,
                                                                          start_engine,
                                                                          redis_url):
    """No sweep runs here: the driver retires and its engine wakes the portal itself."""
    portal, info = make_portal()
    ledger = OperatingLedger(redis.Redis.from_url(redis_url))
    until = time.time() + 1.5
    ledger.hold(info["member_id"], "crm.deal.add", until)
    start_engine(DISPATCH_LINGER_MS=0)
    command = submit(portal.id, "crm.deal.add", {"fields": {"TITLE": "after the pause"}})
    db.session.commit()
    done = settled(portal.id, 1, timeout=10)[0]
    assert done.status == "done" and done.id == command
    sent = done.first_sent_at.timestamp()
    assert until <= sent < until + 1.0, f"sent {sent - until:+.2f} s from the pause's end"


def test_a_slot_kept_for_real_time_work_leaves_with_it_and_is_filled_with_bulk():
    bulk = [Candidate(i, "crm.deal.add", {}, None, None, Priority.BULK.value)
            for i in range(1, 121)]
    call = Candidate(200, "telephony.externalcall.register", {}, "call-1", None,
                     Priority.REALTIME.value)
    assert pack_round(bulk, {}, {}, batches=3, realtime_only_from=0) == []
    [only] = pack_round([call, *bulk], {}, {}, batches=3, realtime_only_from=0)
    assert only.realtime and len(only.commands) == 50  # the call and 49 bulk commands
    assert [c.id for c in only.commands] == [200, *range(1, 50)]  # the call runs first
    first, second = pack_round([call, *bulk], {}, {}, batches=3, realtime_only_from=2)
    assert first.realtime and not second.realtime and len(second.commands) == 50


def test_a_calls_card_runs_before_other_calls_finishes_in_one_batch():
    """A batch runs its commands one after the other: a register and its show go before the
    finishes of other calls (a second of portal time each), each call's own commands and a
    reference's target keep their order."""
    def cand(cid: int, method: str, key: str | None, priority: Priority,
             params: dict | None = None) -> Candidate:
        return Candidate(cid, method, params or {}, key, None, priority.value)

    finish_a = cand(1, "telephony.externalcall.finish", "a", Priority.NORMAL)
    register_b = cand(2, "telephony.externalcall.register", "b", Priority.REALTIME)
    show_b = cand(3, "telephony.externalcall.show", "b", Priority.REALTIME,
                  {"CALL_ID": ref(2, "CALL_ID")})
    finish_c = cand(4, "telephony.externalcall.finish", "c", Priority.NORMAL)
    hide_c = cand(5, "telephony.externalcall.hide", "c", Priority.REALTIME)  # after c's finish
    # Candidates come real-time first: c's hide is met before its finish and waits a round.
    [batch] = pack_round([register_b, show_b, hide_c, finish_a, finish_c], {}, {}, batches=1,
                         realtime_only_from=1)
    assert [c.id for c in batch.commands] == [2, 3, 1, 4]
    [batch] = pack_round([register_b, show_b, finish_a, finish_c, hide_c], {}, {}, batches=1,
                         realtime_only_from=1)
    assert [c.id for c in batch.commands] == [2, 3, 4, 5, 1]  # c holds real-time work now
    # A reference across ranks (a real-time command reading a bulk one's result): id order.
    bulk = cand(6, "crm.contact.get", None, Priority.BULK)
    reader = cand(7, "telephony.externalcall.register", None, Priority.REALTIME,
                  {"CRM_ENTITY_ID": ref(6, "ID")})
    [batch] = pack_round([bulk, reader], {}, {}, batches=1, realtime_only_from=1)
    assert [c.id for c in batch.commands] == [6, 7]
