"""Sweeping: find the inbox rows no worker will finish on its own, and queue them again.

A row can be left behind: its message was lost (Redis restarted, intake was killed
between its answer and the send), its worker died while processing, or it is parked
and can go on now (a handler was registered, its portal is callable again). The
sweeper (workers/ingress.py, every ``INBOX_SWEEP_INTERVAL``) finds them by status and
age (a claimed row's: since its worker's last heartbeat) and sends them again; an extra
message is harmless (the claim takes a row once).
A row that waits for an earlier row of its ordering key (app/ingress/ordering.py) is
queued again like any other, and its claim waits again: the sweeper is the backstop
for the wake-up its predecessor's finisher sends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update

from app import queue
from app.extensions import db
from app.ingress import metrics
from app.ingress.inbox.enqueueing import ACTOR, QUEUE
from app.ingress.models import PARKED, PENDING, InboxEvent, InboxStatus
from app.tenants.models import Portal, aware, utcnow
from app.tenants.status import HELD


@dataclass(frozen=True)
class SweepPolicy:
    """How long a row may sit in each unfinished state before the sweeper queues it again.

    ``received`` rows are known to have missed the broker, so they go back soon;
    ``queued`` rows normally just wait their turn in the broker, so only a long
    silence means their message was lost; a ``processing`` row's worker renews its
    ``claimed_at`` while the handler runs (app/ingress/heartbeat.py), so a claim silent
    for ``processing_after`` lost its worker.

    A ``queued`` row's wait backs off: each requeue sets ``claimed_at``, and the
    next one waits at least as long as the row had already waited then
    (``claimed_at - received_at``), capped at ``queued_after_cap``. So while the
    broker has a long backlog (a slow Bitrix24), a row gets a few extra messages
    over its lifetime instead of one per ``queued_after``; a lost message is still
    replaced within the cap. Extra messages are harmless (the claim takes a row once).

    Parked rows go back without a delay once they can go on: ``unhandled`` (and
    legacy ``skipped``) rows whose (source, event_type) is in ``handled``, and
    ``held`` rows whose portal's status no longer holds its calls.
    """

    received_after: float = 10.0
    queued_after: float = 120.0
    queued_after_cap: float = 1800.0
    processing_after: float = 30.0
    handled: Mapping[str, Sequence[str]] = field(default_factory=dict)  # source -> event types


def _queued_wait(policy: SweepPolicy, received_at: datetime, claimed_at: datetime | None) -> float:
    """Seconds of silence after which a queued row is queued again (doubling, capped)."""
    waited = 0.0
    if claimed_at is not None:
        waited = (aware(claimed_at) - aware(received_at)).total_seconds()
    return min(policy.queued_after_cap, max(policy.queued_after, waited))


def _now_handled(policy: SweepPolicy) -> Any:
    """Parked-for-no-handler rows whose event type has a handler now (None if none do)."""
    per_source = [(InboxEvent.source == source)
                  & func.upper(InboxEvent.event_type).in_([t.upper() for t in types])
                  for source, types in policy.handled.items() if types]
    if not per_source:
        return None
    return (InboxEvent.status.in_([InboxStatus.UNHANDLED.value,
                                   InboxStatus.LEGACY_SKIPPED.value]) & or_(*per_source))


def stuck_rows(policy: SweepPolicy, limit: int = 1000,
               now: datetime | None = None) -> list[tuple[int, str]]:
    """(id, source) of the rows the policy says no worker will finish on its own."""
    now = now or utcnow()
    since = func.coalesce(InboxEvent.claimed_at, InboxEvent.received_at)

    def silent(status: str, seconds: float) -> Any:
        return (InboxEvent.status == status) & (since < now - timedelta(seconds=seconds))

    callable_portals = select(Portal.id).where(Portal.status.notin_([s.value for s in HELD]))
    stuck = (silent(InboxStatus.RECEIVED.value, policy.received_after)
             | silent(InboxStatus.QUEUED.value, policy.queued_after)
             | silent(InboxStatus.PROCESSING.value, policy.processing_after)
             | ((InboxEvent.status == InboxStatus.HELD.value)
                & InboxEvent.portal_id.in_(callable_portals)))
    handled = _now_handled(policy)
    if handled is not None:
        stuck = stuck | handled
    rows = db.session.execute(
        select(InboxEvent.id, InboxEvent.source, InboxEvent.status, InboxEvent.received_at,
               InboxEvent.claimed_at)
        .where(stuck).order_by(since, InboxEvent.id).limit(limit)).all()
    out = []
    for r in rows:
        if r.status == InboxStatus.QUEUED.value:
            silence = (now - aware(r.claimed_at or r.received_at)).total_seconds()
            if silence < _queued_wait(policy, r.received_at, r.claimed_at):
                continue  # requeued before: wait longer this time
        out.append((r.id, r.source))
    return out


def requeue_stuck(policy: SweepPolicy, limit: int = 1000) -> int:
    """Queue stuck and releasable parked rows again (abandoned claims go back to ``queued``)."""
    rows = stuck_rows(policy, limit)
    if not rows:
        return 0
    ids = [row_id for row_id, _ in rows]
    now = utcnow()
    db.session.execute(update(InboxEvent)
                       .where(InboxEvent.id.in_(ids),
                              InboxEvent.status == InboxStatus.PROCESSING.value)
                       .values(status=InboxStatus.QUEUED.value, claimed_at=now,
                               last_error="worker lost while processing; requeued"))
    db.session.execute(update(InboxEvent)
                       .where(InboxEvent.id.in_(ids),
                              InboxEvent.status.in_([*PENDING, *PARKED,
                                                     InboxStatus.LEGACY_SKIPPED.value]))
                       .values(status=InboxStatus.QUEUED.value, claimed_at=now))
    db.session.commit()
    for row_id, source in rows:
        queue.enqueue(ACTOR, row_id, queue_name=QUEUE)
        metrics.QUEUED.labels(source, "sweeper").inc()
    return len(rows)
