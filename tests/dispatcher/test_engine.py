"""The engine against the sandbox portal: parallel batches, order, references, priority."""

from __future__ import annotations

import time

from sqlalchemy import select

from app.dispatcher import Priority, ref, submit
from app.dispatcher.models import OutboxCommand
from app.extensions import db
from tests.conftest import wait_for
from tests.dispatcher.conftest import call_commands, rows, settled


def _status(command_id: int) -> str:
    with db.engine.connect() as conn:
        return conn.execute(select(OutboxCommand.status)
                            .where(OutboxCommand.id == command_id)).scalar_one()


def _call_entries(log: list[dict], external_id: str, call_id: str) -> list[dict]:
    """The sandbox log entries of one call, in execution order."""
    return sorted((e for e in log if e["params"].get("EXTERNAL_CALL_ID") == external_id
                   or e["params"].get("CALL_ID") == call_id), key=lambda e: e["seq"])


def test_parallel_batches_send_120_ordered_commands_in_about_one_round_trip(
        make_portal, sandbox, start_engine):
    portal, info = make_portal()
    sandbox.set_latency(info["member_id"], 1000)
    start_engine()
    ids = [i for call in range(40) for i in call_commands(portal, call)]
    started = time.monotonic()
    db.session.commit()
    done = settled(portal.id, len(ids))
    wall = time.monotonic() - started
    assert [r.status for r in done] == ["done"] * 120, [(r.id, r.error) for r in done]
    log = sandbox.log(info["member_id"])
    batches = {e["batch_id"] for e in log}
    assert len(log) == 120 and len(batches) == 3
    last_start = max(min(e["start"] for e in log if e["batch_id"] == b) for b in batches)
    first_end = min(max(e["finish"] for e in log if e["batch_id"] == b) for b in batches)
    assert last_start < first_end, "a batch waited for an earlier one to come back"
    assert wall < 2.5, f"120 commands took {wall:.2f} s at 1 s per request: not in parallel"
    for reg in done[::3]:
        entries = _call_entries(log, reg.params["EXTERNAL_CALL_ID"], reg.result["CALL_ID"])
        assert [e["method"].rsplit(".", 1)[1] for e in entries] == ["register", "show", "finish"]
        assert len({e["batch_id"] for e in entries}) == 1  # the key's chain went whole
        assert all(e["status"] == 200 for e in entries)
    assert done[2].result["CALL_ID"] == done[0].result["CALL_ID"]  # finish stored its result


def test_a_reference_to_a_command_done_earlier_sends_its_stored_value(make_portal, sandbox,
                                                                       start_engine):
    portal, info = make_portal()
    start_engine(DISPATCH_LINGER_MS=0)
    reg = call_commands(portal, 1)[0]
    db.session.commit()
    first = settled(portal.id, 3)
    call_id = first[0].result["CALL_ID"]
    later = submit(portal.id, "telephony.externalcall.attachrecord",
                   {"CALL_ID": ref(reg, "CALL_ID"), "FILENAME": "a.mp3"})
    db.session.commit()
    assert settled(portal.id, 4)[-1].status == "done"
    entry = sandbox.log(info["member_id"], method="telephony.externalcall.attachrecord")[0]
    assert entry["params"]["CALL_ID"] == call_id and later


def test_a_realtime_command_overtakes_a_2000_command_bulk_backlog(make_portal, sandbox,
                                                                   start_engine):
    portal, info = make_portal()
    sandbox.set_latency(info["member_id"], 2000)
    start_engine(DISPATCH_MAX_INFLIGHT=3)
    for n in range(2000):
        submit(portal.id, "crm.deal.add", {"fields": {"TITLE": f"bulk {n}"}},
               priority=Priority.BULK)
    db.session.commit()
    wait_for(lambda: sandbox.counters(info["member_id"])["batches"] >= 2)
    submitted = time.monotonic()
    card = submit(portal.id, "telephony.externalcall.register",
                  {"USER_ID": 1, "PHONE_NUMBER": "+4930999", "TYPE": 2, "EXTERNAL_CALL_ID": "rt"})
    db.session.commit()
    wait_for(lambda: _status(card) == "done", interval=0.02)
    waited = time.monotonic() - submitted
    row = rows(portal.id)[-1]
    bulk_left = sum(r.status != "done" for r in rows(portal.id))
    assert waited < 2.8, f"the call card waited {waited:.2f} s behind bulk work"
    assert bulk_left > 1000 and row.result["CALL_ID"]


def test_a_key_longer_than_a_batch_runs_in_submission_order(make_portal, sandbox, start_engine):
    portal, info = make_portal()
    sandbox.set_latency(info["member_id"], 300)
    start_engine(DISPATCH_LINGER_MS=0)
    for n in range(60):
        submit(portal.id, "crm.deal.add", {"fields": {"TITLE": str(n)}}, key="one-chain")
    db.session.commit()
    assert {r.status for r in settled(portal.id, 60)} == {"done"}
    log = sorted(sandbox.log(info["member_id"]), key=lambda e: e["seq"])
    assert [int(e["params"]["fields"]["TITLE"]) for e in log] == list(range(60))
    first, second = log[0]["batch_id"], log[-1]["batch_id"]
    assert max(e["finish"] for e in log if e["batch_id"] == first) <= \
        min(e["start"] for e in log if e["batch_id"] == second)
