"""A worker SIGKILLed with batches in flight loses nothing: another one takes over the portal,
resends what is safe to repeat and dead-letters as unknown outcomes what may have run."""

from __future__ import annotations

import signal
from collections import Counter

from app.dispatcher import submit
from app.extensions import db
from tests.conftest import wait_for
from tests.dispatcher.conftest import rows

FAST = {"DISPATCH_REQUEST_TIMEOUT": "3", "DISPATCH_LEASE_MARGIN": "1",
        "DISPATCH_OWNER_TTL": "2", "DISPATCH_SWEEP_INTERVAL": "1", "DISPATCH_LINGER_MS": "0"}


def test_sigkill_mid_flight_then_restart_completes_each_command_once_or_dead_as_unknown(
        make_portal, sandbox, start_worker):
    portal, info = make_portal()
    member = info["member_id"]
    sandbox.set_latency(member, 1000)
    unsafe = {submit(portal.id, "crm.deal.add", {"fields": {"TITLE": f"deal {n}"}}): f"deal {n}"
              for n in range(150)}
    safe = [submit(portal.id, "crm.contact.list", {"filter": {"ID": n}}) for n in range(50)]
    db.session.commit()
    first = start_worker(threads=1, periodic=True, **FAST, DISPATCH_MAX_INFLIGHT="2")
    wait_for(lambda: sandbox.counters(member)["in_flight"] >= 1, timeout=30)
    first.stop(signal.SIGKILL)
    start_worker(threads=1, periodic=True, **FAST)
    done = wait_for(lambda: (found := rows(portal.id))
                    and all(r.status in ("done", "dead") for r in found) and found, timeout=30)
    by_id = {r.id: r for r in done}
    log = sandbox.log(member, method="crm.deal.add")
    ran = Counter(e["params"]["fields"]["TITLE"] for e in log)
    assert all(by_id[i].status == "done" for i in safe)
    dead = [i for i in unsafe if by_id[i].status == "dead"]
    assert dead, "the kill hit no batch in flight: the test proves nothing"
    for command_id, title in unsafe.items():
        row = by_id[command_id]
        if row.status == "done":
            assert ran[title] == 1, f"{title} ran {ran[title]} times"
        else:
            assert row.dead_reason.startswith("unknown outcome: the worker stopped")
            assert row.outcome == "unknown"
            assert ran[title] <= 1
