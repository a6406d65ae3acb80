"""The inbox as operators see it: its depth, the dead letters, and replaying them.

Read by the /metrics gauge, a portal's settings page and ``flask inbox …``
(app/ingress/cli.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update

from app.extensions import db
from app.ingress.inbox.enqueueing import enqueue
from app.ingress.models import PARKED, PENDING, InboxEvent, InboxStatus
from app.tenants.models import aware, utcnow


def depth(portal_id: int | None = None) -> dict[str, int]:
    """Rows per unfinished status (parked ones too) and dead: the inbox-depth gauge, or one
    portal's share of it (its settings page). ``done`` rows are never counted: there are
    millions, and the status index finds the others without reading them."""
    wanted = [*PENDING, InboxStatus.PROCESSING.value, *PARKED, InboxStatus.DEAD.value]
    counts = dict.fromkeys(wanted, 0)
    query = (select(InboxEvent.status, func.count()).where(InboxEvent.status.in_(wanted))
             .group_by(InboxEvent.status))
    if portal_id is not None:
        query = query.where(InboxEvent.portal_id == portal_id)
    counts.update({status: n for status, n in db.session.execute(query).all()})
    return counts


@dataclass(frozen=True)
class DeadLetter:
    """A dead-lettered event as its portal's admin sees it: what, when, and why."""

    id: int
    source: str
    event_type: str
    received_at: datetime
    attempts: int
    reason: str


def dead_letters(portal_id: int | None = None, limit: int = 10) -> list[DeadLetter]:
    """The newest dead-lettered events, of one portal or of all (payloads stay out)."""
    query = (select(InboxEvent.id, InboxEvent.source, InboxEvent.event_type,
                    InboxEvent.received_at, InboxEvent.attempts, InboxEvent.last_error)
             .where(InboxEvent.status == InboxStatus.DEAD.value)
             .order_by(InboxEvent.received_at.desc(), InboxEvent.id.desc()).limit(limit))
    if portal_id is not None:
        query = query.where(InboxEvent.portal_id == portal_id)
    return [DeadLetter(r.id, r.source, r.event_type, aware(r.received_at), r.attempts,
                       r.last_error or "") for r in db.session.execute(query).all()]


def replay_dead(row_ids: Sequence[int] = (), portal_id: int | None = None) -> list[int]:
    """Give dead rows (these ids, or all of a portal's) a fresh set of attempts; queue them.

    For an operator who fixed what killed them. Only rows still ``dead`` are touched; the
    payload is as it was left, without the event's tokens, so handlers use the portal's own.
    """
    where = [InboxEvent.status == InboxStatus.DEAD.value]
    if row_ids:
        where.append(InboxEvent.id.in_(list(row_ids)))
    if portal_id is not None:
        where.append(InboxEvent.portal_id == portal_id)
    if len(where) == 1:
        raise ValueError("name the rows or the portal to replay")
    rows = db.session.execute(select(InboxEvent.id, InboxEvent.source).where(*where)).all()
    if not rows:
        return []
    ids = [r.id for r in rows]
    db.session.execute(update(InboxEvent)
                       .where(InboxEvent.id.in_(ids), InboxEvent.status == InboxStatus.DEAD.value)
                       .values(status=InboxStatus.QUEUED.value, attempts=0, claimed_at=utcnow(),
                               processed_at=None))
    db.session.commit()
    for source in sorted({r.source for r in rows}):
        enqueue([r.id for r in rows if r.source == source], source, via="replay")
    return ids
