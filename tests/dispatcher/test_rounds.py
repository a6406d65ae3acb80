"""Throughput: one fetch packs a batch for every free slot, leased in one transaction."""

from __future__ import annotations

from app.dispatcher import Priority, submit
from app.extensions import db
from tests.dispatcher.conftest import settled


def test_a_backlog_leaves_as_several_batches_leased_in_one_round(make_portal, sandbox,
                                                                  start_engine):
    portal, info = make_portal()
    sandbox.set_latency(info["member_id"], 500)
    for n in range(300):
        submit(portal.id, "crm.deal.add", {"fields": {"TITLE": str(n)}}, priority=Priority.BULK)
    for n in range(3):  # a key chain must not be split over batches that run side by side
        submit(portal.id, "crm.deal.add", {"fields": {"TITLE": f"k{n}"}}, key="chain")
    db.session.commit()  # no engine listens yet: the backlog is waiting when it starts
    engine = start_engine(DISPATCH_LINGER_MS=0)
    engine.wake(portal.id)
    done = settled(portal.id, 303)
    assert {r.status for r in done} == {"done"}
    first = [r for r in done if r.first_sent_at == done[0].first_sent_at]
    assert len({r.batch_id for r in first}) >= 6, "the backlog left one batch per round"
    log = sorted(sandbox.log(info["member_id"]), key=lambda e: e["seq"])
    chain = [e for e in log if str(e["params"]["fields"]["TITLE"]).startswith("k")]
    assert [e["params"]["fields"]["TITLE"] for e in chain] == ["k0", "k1", "k2"]
