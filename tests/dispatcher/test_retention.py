"""Outbox retention: finished commands go in time; unfinished ones, unsettled outcomes and
the results a queued command still needs stay."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import update

from app.dispatcher import ref, submit
from app.dispatcher.models import OutboxCommand
from app.dispatcher.retention import Retention, prune
from app.extensions import db
from app.tenants.models import utcnow
from tests.conftest import wait_for
from tests.dispatcher.conftest import rows, settled
from tests.ingress.conftest import make_portal as make_plain_portal

DAY = timedelta(days=1)


def _row(portal_id: int, status: str, age: timedelta | None, *, params: dict[str, Any] | None
         = None, after_id: int | None = None, settled: bool = True,
         result: Any = None) -> int:
    """A command row that finished (or was submitted) ``age`` ago."""
    row = OutboxCommand(portal_id=portal_id, method="crm.deal.get", params=params or {},
                        after_id=after_id, status=status, settled=settled,
                        handler=None if settled else "tests.followup", result=result,
                        submitted_at=utcnow() - (age or DAY) - DAY,
                        completed_at=None if age is None else utcnow() - age)
    db.session.add(row)
    db.session.commit()
    return row.id


def _ids(portal_id: int | None = None) -> set[int]:
    return {r.id for r in rows(portal_id)}


def test_each_kind_of_command_is_kept_for_its_own_time(app):
    portal = make_plain_portal()
    other = make_plain_portal()
    keep = {
        "fresh done": _row(portal.id, "done", 6 * DAY),
        "recently dead": _row(portal.id, "dead", 29 * DAY),
        "old queued": _row(portal.id, "queued", None),
        "old in flight": _row(portal.id, "inflight", None),
        "old done, outcome not settled": _row(portal.id, "done", 60 * DAY, settled=False),
        "old dead, outcome not settled": _row(portal.id, "dead", 60 * DAY, settled=False),
    }
    gone = {
        "old done": _row(portal.id, "done", 8 * DAY),
        "old dead": _row(portal.id, "dead", 31 * DAY),
        "old done of another portal": _row(other.id, "done", 8 * DAY),
    }

    result = prune(Retention(done_days=7, dead_days=30))

    assert result == {"done_deleted": 2, "dead_deleted": 1}
    assert _ids() == set(keep.values())
    assert not _ids() & set(gone.values())
    # The outcomes were settled since: the rows go on the next pass.
    db.session.execute(update(OutboxCommand).values(settled=True))
    db.session.commit()
    assert prune(Retention()) == {"done_deleted": 1, "dead_deleted": 1}
    assert prune(Retention(), now=utcnow() + 2 * DAY) == {"done_deleted": 1, "dead_deleted": 1}


def test_rows_an_unfinished_command_depends_on_stay_until_it_finishes(app):
    portal = make_plain_portal()
    other = make_plain_portal()
    by_after = _row(portal.id, "done", 40 * DAY)
    by_ref = _row(portal.id, "done", 40 * DAY, result={"CALL_ID": "c1"})
    dead_dep = _row(portal.id, "dead", 40 * DAY)
    by_inflight = _row(portal.id, "done", 40 * DAY)
    same_id_elsewhere = _row(other.id, "done", 40 * DAY)  # not referenced: other portal
    # `after` names one command, a ref in the params another (submit's two ways).
    waiting = _row(portal.id, "queued", None, after_id=by_after,
                   params={"CALL_ID": ref(by_ref, "CALL_ID"), "X": ref(dead_dep)})
    flying = _row(portal.id, "inflight", None, after_id=by_inflight)

    assert prune(Retention()) == {"done_deleted": 1, "dead_deleted": 0}
    assert _ids() == {by_after, by_ref, dead_dep, by_inflight, waiting, flying}
    assert same_id_elsewhere not in _ids()

    db.session.execute(update(OutboxCommand).where(OutboxCommand.id.in_([waiting, flying]))
                       .values(status="done", completed_at=utcnow()))
    db.session.commit()
    assert prune(Retention()) == {"done_deleted": 3, "dead_deleted": 1}
    assert _ids() == {waiting, flying}


def test_batches_walk_past_protected_rows_until_nothing_is_left(app):
    portal = make_plain_portal()
    old = [_row(portal.id, "done", (30 + i) * DAY) for i in range(23)]
    protected = old[::5]  # spread through every batch of 7
    for dep in protected:
        _row(portal.id, "queued", None, after_id=dep)
    fresh = _row(portal.id, "done", DAY)

    assert prune(Retention(batch=7)) == {"done_deleted": 23 - len(protected),
                                         "dead_deleted": 0}
    assert _ids() - {r.id for r in rows() if r.status == "queued"} == {*protected, fresh}


def test_a_queued_command_still_gets_a_pruned_old_commands_result(
        oauth_app, make_portal, start_engine):
    """End to end: the registration finished days ago; the card shown now must carry its
    CALL_ID, read from the stored row that retention had to leave in place."""
    portal, _ = make_portal()
    engine = start_engine()
    reg = submit(portal.id, "telephony.externalcall.register",
                 {"USER_ID": 1, "PHONE_NUMBER": "+4930123456", "TYPE": 2,
                  "EXTERNAL_CALL_ID": "pbx-retention", "SHOW": 0}, key="call")
    unrelated = submit(portal.id, "user.get", {"ID": 1})
    db.session.commit()
    settled(portal.id, 2)
    call_id = next(r.result["CALL_ID"] for r in rows(portal.id) if r.id == reg)
    db.session.execute(update(OutboxCommand).values(completed_at=utcnow() - 10 * DAY))
    db.session.commit()
    show = submit(portal.id, "telephony.externalcall.show",
                  {"CALL_ID": ref(reg, "CALL_ID"), "USER_ID": 1}, key="call")
    db.session.execute(update(OutboxCommand).where(OutboxCommand.id == show)
                       .values(not_before=utcnow() + DAY))  # it waits, e.g. for a retry
    db.session.commit()

    assert prune(Retention()) == {"done_deleted": 1, "dead_deleted": 0}
    assert _ids(portal.id) == {reg, show} and unrelated not in _ids()

    db.session.execute(update(OutboxCommand).where(OutboxCommand.id == show)
                       .values(not_before=None))
    db.session.commit()
    engine.wake(portal.id)
    final = {r.id: r for r in settled(portal.id, 2)}
    assert final[show].status == "done", final[show].dead_reason
    assert final[show].result is True  # the sandbox knew the CALL_ID: the stored one was sent
    assert call_id


def test_flask_outbox_prune(app):
    portal = make_plain_portal()
    _row(portal.id, "done", 3 * DAY)
    young = _row(portal.id, "done", DAY / 2)
    _row(portal.id, "dead", 40 * DAY)
    result = app.test_cli_runner().invoke(args=["outbox", "prune", "--done-days", "2"])
    assert result.exit_code == 0, result.output
    assert "deleted 1 done and 1 dead command(s)" in result.output
    assert _ids() == {young}


def test_a_worker_prunes_the_outbox_on_its_own_schedule(app, start_worker):
    portal = make_plain_portal()
    _row(portal.id, "done", 8 * DAY)
    young = _row(portal.id, "done", DAY)
    start_worker(periodic=True, OUTBOX_PRUNE_INTERVAL="1", OUTBOX_KEEP_DONE_DAYS="7")
    wait_for(lambda: _ids() == {young}, timeout=60)
