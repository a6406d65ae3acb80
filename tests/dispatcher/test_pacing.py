"""Pacing: commands that trickle in share batches instead of spending the bucket on tiny
ones; a slow portal keeps as many batches in flight as its burst allows."""

from __future__ import annotations

import time

from app.dispatcher import Priority, submit
from app.extensions import db
from tests.dispatcher.conftest import settled


def test_commands_trickling_in_share_a_few_batches_and_a_lone_one_leaves_at_once(
        make_portal, sandbox, start_engine):
    portal, info = make_portal()
    sandbox.set_latency(info["member_id"], 0)
    start_engine()
    for n in range(60):  # 50 commands/s for 1.2 s, each in its own commit
        submit(portal.id, "crm.deal.add", {"fields": {"TITLE": str(n)}}, key=f"call-{n}")
        db.session.commit()
        time.sleep(0.02)
    done = settled(portal.id, 60)
    assert {r.status for r in done} == {"done"}
    batches = {r.batch_id for r in done}
    # 0.3 s apart while the bucket is empty: ~5 batches over 1.2 s (25 ms linger alone made
    # ~25); a loaded machine stretches the submitting, so the bound follows its real span
    span = (done[-1].submitted_at - done[0].submitted_at).total_seconds()
    assert len(batches) <= span / 0.3 + 3, f"{len(batches)} batches for 60 commands over " \
        f"{span:.2f} s"
    first = done[0]
    assert (first.first_sent_at - first.submitted_at).total_seconds() < 0.25, \
        "the first command waited although nothing had left before it"


def test_a_slow_portal_keeps_more_than_half_its_burst_in_flight(make_portal, sandbox,
                                                                start_engine):
    portal, info = make_portal()
    sandbox.set_latency(info["member_id"], 1000)
    for n in range(30 * 50):
        submit(portal.id, "crm.deal.add", {"fields": {"TITLE": str(n)}}, priority=Priority.BULK)
    db.session.commit()  # the backlog is waiting when the engine starts
    engine = start_engine(DISPATCH_LINGER_MS=0)
    engine.wake(portal.id)
    done = settled(portal.id, 30 * 50)
    assert {r.status for r in done} == {"done"}
    start = min(r.first_sent_at for r in done)
    first_second = {r.batch_id for r in done
                    if (r.first_sent_at - start).total_seconds() < 0.5}
    # K was half the burst (25, bulk 24): the burst of 48 tokens waited a round trip
    assert len(first_second) >= 29, f"{len(first_second)} batches left at once"
    assert sandbox.counters(info["member_id"]).get("status_503", 0) == 0

