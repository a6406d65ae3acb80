"""The calls' sweeper (issue 22): calls whose ``end`` never came, events whose start never came.

Run every TELEPHONY_SWEEP_INTERVAL by workers/calls.py. Two passes, each by the index
``ix_calls_state_created_at`` (state, created_at), ``created_at`` being when the app heard
of the call first (not the PBX's ``at``: a PBX that re-sends an old day must not have its
calls swept between their start and their end):

- **park**: an ``incomplete`` call (events, no start) first heard of more than
  TELEPHONY_START_WAIT ago is parked: ``parked_at`` is set, ``flask calls show`` says how
  long it waited, and its events wait for ``flask calls retry`` (a late start registers
  the call but does not apply them, see machine.py);
- **finish**: a ``ringing`` or ``answered`` call first heard of more than
  TELEPHONY_END_TIMEOUT ago gets its parked events applied (if any), then, still not
  ended, a synthetic ``end`` (status :data:`machine.SWEPT`) through the state machine: the
  others' cards are hidden, then ``finish`` by the last handler (answered) or the owner,
  DURATION 0, FAILED_REASON "no end from the PBX", 304 for an unanswered incoming call
  (a missed call: nobody answered as far as anyone knows), ``OTHER`` otherwise. Not 200
  with the time up to the sweep: nobody knows how long they talked, and such a DURATION
  would be made up.

A PBX ``end`` racing the sweep: both take the call's row lock (handlers.locked), so one
goes first; after a sweep the real ``end`` is a duplicate (the call is ended) and changes
nothing. The sweep leaves a call alone while an event of its inbox key is unfinished (the
per-key claim's rule: it would run after them), and a held portal's calls wait.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from flask import current_app
from sqlalchemy import exists, select, tuple_

from app.extensions import db
from app.ingress.models import InboxEvent
from app.ingress.ordering import UNFINISHED
from app.telephony import handlers, machine
from app.telephony.models import Call
from app.tenants.models import Portal, utcnow
from app.tenants.status import PortalUnavailable, ensure_callable

log = logging.getLogger(__name__)

LIVE = (machine.State.RINGING.value, machine.State.ANSWERED.value)
BATCH = 200  # calls read per query; a run goes on until none is left


@dataclass
class Swept:
    """What one run did."""

    parked: int = 0
    finished: int = 0
    left: int = 0  # due, but left for a later run (an unfinished inbox event, a held portal)


def sweep(now: datetime | None = None) -> Swept:
    """Park the calls that waited too long for their start, finish those whose end is late."""
    now = now or utcnow()
    cfg = current_app.config
    report = Swept()
    start_cutoff = now - timedelta(seconds=float(cfg["TELEPHONY_START_WAIT"]))
    for call_id in _due([machine.State.INCOMPLETE.value], start_cutoff, unparked=True):
        report.parked += _park(call_id, start_cutoff, now)
    end_cutoff = now - timedelta(seconds=float(cfg["TELEPHONY_END_TIMEOUT"]))
    for call_id in _due(list(LIVE), end_cutoff):
        done = _finish(call_id, end_cutoff, now)
        report.finished += done
        report.left += not done
    if report.parked or report.finished or report.left:
        log.info("calls sweep: %s parked, %s finished without an end, %s left for later",
                 report.parked, report.finished, report.left)
    return report


def _due(states: list[str], cutoff: datetime, unparked: bool = False) -> Any:
    """Ids of the calls in these states first heard of before ``cutoff``, oldest first, a
    batch at a time (keyset on (created_at, id), so calls left alone are not read again)."""
    after: tuple[datetime, int] | None = None
    while True:
        query = (select(Call.created_at, Call.id)
                 .where(Call.state.in_(states), Call.created_at < cutoff)
                 .order_by(Call.created_at, Call.id).limit(BATCH))
        if unparked:
            query = query.where(Call.parked_at.is_(None))
        if after is not None:
            query = query.where(tuple_(Call.created_at, Call.id) > after)
        rows = db.session.execute(query).all()
        db.session.commit()  # end the read: each call is handled in its own transaction
        for row in rows:
            yield row.id
        if len(rows) < BATCH:
            return
        after = (rows[-1].created_at, rows[-1].id)


def _park(call_id: int, cutoff: datetime, now: datetime) -> int:
    row = handlers.locked(Call.id == call_id, Call.state == machine.State.INCOMPLETE.value,
                          Call.parked_at.is_(None), Call.created_at < cutoff)
    if row is None:  # its start came meanwhile
        db.session.rollback()
        return 0
    handlers.store(row, machine.park(handlers.state_of(row)))
    row.parked_at = now
    db.session.commit()
    log.warning("call %s (PBX %s) parked: its events waited for their start", row.id,
                row.pbx_call_id)
    return 1


def _finish(call_id: int, cutoff: datetime, now: datetime) -> bool:
    try:
        return _finish_one(call_id, cutoff, now)
    except PortalUnavailable:
        db.session.rollback()
        return False  # a held portal's calls wait with it
    except Exception as exc:  # noqa: BLE001 - the other calls are still swept; this one later
        db.session.rollback()
        log.warning("call %s: sweep failed: %r", call_id, exc)
        return False


def _finish_one(call_id: int, cutoff: datetime, now: datetime) -> bool:
    head = db.session.execute(select(Call.portal_id, Call.pbx_call_id)
                              .where(Call.id == call_id)).first()
    portal = db.session.get(Portal, head.portal_id) if head is not None else None
    if head is None or portal is None:  # deleted with its portal meanwhile
        db.session.rollback()
        return False
    ensure_callable(portal)
    if _key_busy(head.portal_id, head.pbx_call_id):
        db.session.rollback()
        return False
    row = handlers.locked(Call.id == call_id, Call.state.in_(LIVE), Call.created_at < cutoff)
    if row is None:  # its end came meanwhile
        db.session.rollback()
        return False
    policy = handlers.policy_for(portal)
    call, commands = machine.retry(handlers.state_of(row), policy)  # parked events first
    if call.state.value in LIVE:
        call, more = machine.apply(call, end_event(row.pbx_call_id, now), policy)
        commands += more
    handlers.store(row, call)
    handlers.send(row, commands)
    db.session.commit()
    log.warning("call %s (PBX %s): no end from the PBX within TELEPHONY_END_TIMEOUT; "
                "finished by the sweeper", row.id, row.pbx_call_id)
    return True


def end_event(pbx_call_id: str, now: datetime) -> dict[str, Any]:
    """The synthetic end the sweeper applies (never accepted from a PBX: intake refuses the
    status)."""
    return {"call_id": pbx_call_id, "event": "end", "at": now.isoformat(),
            "status": machine.SWEPT, "duration": 0}


def _key_busy(portal_id: int, pbx_call_id: str) -> bool:
    """Whether an event of the call waits in the inbox or is being handled."""
    return bool(db.session.scalar(select(exists().where(
        InboxEvent.portal_id == portal_id, InboxEvent.order_key == pbx_call_id,
        InboxEvent.status.in_(UNFINISHED)))))
