"""The inbox as operators see it: its depth, the dead letters, replaying or discarding them,
and the rows of one ordering key (a PBX call's events).

Read by the /metrics gauge, a portal's settings page, its dead-letters and call pages
(placements/dead, placements/calls) and ``flask inbox …`` (app/ingress/cli.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update

from app.extensions import db
from app.ingress.inbox.enqueueing import enqueue
from app.ingress.models import PARKED, PENDING, InboxEvent, InboxStatus
from app.tenants.models import aware, utcnow

log = logging.getLogger(__name__)


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


def dead_kinds(portal_id: int) -> dict[tuple[str, str], int]:
    """A portal's dead letters counted by kind: (source, event type) → how many."""
    query = (select(InboxEvent.source, InboxEvent.event_type, func.count())
             .where(InboxEvent.status == InboxStatus.DEAD.value,
                    InboxEvent.portal_id == portal_id)
             .group_by(InboxEvent.source, InboxEvent.event_type))
    return {(source, kind): n for source, kind, n in db.session.execute(query).all()}


def dead_ids(portal_id: int, source: str | None = None, event_type: str | None = None,
             among: Sequence[int] = ()) -> list[int]:
    """The ids of a portal's dead letters: of one kind (for "retry all", "discard all"), or
    those of ``among`` that are still dead."""
    query = select(InboxEvent.id).where(InboxEvent.status == InboxStatus.DEAD.value,
                                        InboxEvent.portal_id == portal_id)
    if source is not None:
        query = query.where(InboxEvent.source == source)
    if event_type is not None:
        query = query.where(InboxEvent.event_type == event_type)
    if among:
        query = query.where(InboxEvent.id.in_(list(among)))
    return list(db.session.scalars(query.order_by(InboxEvent.id)).all())


def dead_payloads(portal_id: int, row_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The stored bodies of these dead letters of a portal (intake stripped the event's tokens;
    whoever shows them still hides what looks secret)."""
    if not row_ids:
        return {}
    query = select(InboxEvent.id, InboxEvent.payload).where(
        InboxEvent.id.in_(list(row_ids)), InboxEvent.portal_id == portal_id,
        InboxEvent.status == InboxStatus.DEAD.value)
    return {r.id: dict(r.payload or {}) for r in db.session.execute(query).all()}


def discard_dead(row_ids: Sequence[int], portal_id: int) -> list[int]:
    """Delete these dead letters of a portal for good (callers commit); the ids deleted.

    Discarding is what retention does to a dead row after ``INBOX_KEEP_DEAD_DAYS``, done
    early: the row goes, and a dead row holds no ordering key back, so nothing waits for it.
    Each row discarded leaves a log line (portal, id, kind, why it died) as the audit trail.
    """
    if not row_ids:
        return []
    where = (InboxEvent.id.in_(list(row_ids)), InboxEvent.portal_id == portal_id,
             InboxEvent.status == InboxStatus.DEAD.value)
    rows = db.session.execute(select(InboxEvent.id, InboxEvent.member_id, InboxEvent.source,
                                     InboxEvent.event_type, InboxEvent.last_error)
                              .where(*where)).all()
    if not rows:
        return []
    db.session.execute(delete(InboxEvent).where(*where, InboxEvent.id.in_([r.id for r in rows])))
    for r in rows:
        log.info("inbox dead letter %s of portal %s discarded: %s %s (%s)", r.id, r.member_id,
                 r.source, r.event_type, (r.last_error or "")[:200])
    return sorted(r.id for r in rows)


@dataclass(frozen=True)
class KeyedEvent:
    """One inbox row of an ordering key (a PBX call's event), as a call's story shows it."""

    id: int
    event_type: str
    status: str
    attempts: int
    received_at: datetime
    processed_at: datetime | None
    error: str
    payload: dict[str, Any]


def events_for_key(portal_id: int, order_key: str, limit: int = 500) -> list[KeyedEvent]:
    """A portal's inbox rows of one ordering key (a PBX call's ``call_id``), in arrival order
    (index ix_inbox_events_order_key)."""
    query = (select(InboxEvent).where(InboxEvent.portal_id == portal_id,
                                      InboxEvent.order_key == order_key)
             .order_by(InboxEvent.id).limit(limit))
    return [KeyedEvent(r.id, r.event_type, r.status, r.attempts, aware(r.received_at),
                       aware(r.processed_at) if r.processed_at else None, r.last_error or "",
                       dict(r.payload or {}))
            for r in db.session.scalars(query).all()]
