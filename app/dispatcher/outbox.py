"""Submitting commands to the outbox, and the operator's view of it (services; callers commit).

``submit`` adds a row and flushes it; the caller's commit makes it durable, and only
then are the dispatchers nudged (one Redis message per commit, from the session's
``after_commit`` event). A rollback nudges nothing and leaves no row. A handler that
submits while it processes an inbox row therefore sends its commands exactly when the
row is marked done, never twice for a retried event.

``ref(command_id, *path)`` (app/dispatcher/refs.py) is a placeholder for an earlier
command's result inside a later command's params; the packer turns it into
``$result[c<id>][...]`` when both share a batch, or into the stored value when the earlier
command completed before. A command that references another (or names it with ``after``)
waits until it is done.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event, func, select, update
from sqlalchemy.orm import Session

from app.dispatcher import nudge
from app.dispatcher.models import CommandStatus, OutboxCommand, Priority
from app.dispatcher.refs import references
from app.extensions import db, redis_ext
from app.tenants.models import Portal

_PENDING_NUDGES = "b24relay_dispatch_nudge"
PRIORITIES = {"realtime": Priority.REALTIME, "bulk": Priority.BULK}


def submit(portal: Portal, method: str, params: Mapping[str, Any] | None = None, *,
           key: str | None = None, after: int | None = None, priority: str = "realtime",
           on_done: str | None = None, inbox_event_id: int | None = None) -> int:
    """Add a command to the portal's outbox (flushed, not committed); return its id."""
    if not method or method.strip().lower() == "batch":
        raise ValueError(f"not a command for the outbox: {method!r}")
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be realtime or bulk, got {priority!r}")
    deps = references(params) | ({int(after)} if after is not None else set())
    row = OutboxCommand(portal_id=portal.id, method=method.strip(), params=dict(params or {}),
                        key=key, after_id=after if after is not None else max(deps, default=None),
                        priority=PRIORITIES[priority].value, status=CommandStatus.QUEUED.value,
                        attempts=0, on_done=on_done, on_done_sent=on_done is None,
                        inbox_event_id=inbox_event_id)
    db.session.add(row)
    db.session.flush()
    nudge_after_commit(db.session(), [portal.id])
    return row.id


def nudge_after_commit(session: Session, portal_ids: Iterable[int]) -> None:
    """Nudge the dispatchers for these portals once the session's transaction commits."""
    session.info.setdefault(_PENDING_NUDGES, set()).update(portal_ids)


@event.listens_for(Session, "after_commit")
def _publish_nudges(session: Session) -> None:
    ids = session.info.pop(_PENDING_NUDGES, None)
    if ids:
        nudge.publish(redis_ext.client, ids)


@event.listens_for(Session, "after_rollback")
def _forget_nudges(session: Session) -> None:
    session.info.pop(_PENDING_NUDGES, None)


@dataclass(frozen=True)
class Depth:
    """How many of a portal's commands stand where."""

    portal_id: int
    status: str
    priority: int
    count: int


def depths(portal_id: int | None = None) -> list[Depth]:
    """Command counts by portal, status and priority (``flask outbox show``)."""
    c = OutboxCommand
    query = (select(c.portal_id, c.status, c.priority, func.count())
             .group_by(c.portal_id, c.status, c.priority)
             .order_by(c.portal_id, c.status, c.priority))
    if portal_id is not None:
        query = query.where(c.portal_id == portal_id)
    return [Depth(*row) for row in db.session.execute(query)]


def dead_letters(portal_id: int | None = None, limit: int = 50) -> Sequence[OutboxCommand]:
    """The newest dead commands, optionally of one portal."""
    query = select(OutboxCommand).where(OutboxCommand.status == CommandStatus.DEAD.value)
    if portal_id is not None:
        query = query.where(OutboxCommand.portal_id == portal_id)
    return db.session.scalars(query.order_by(OutboxCommand.id.desc()).limit(limit)).all()


def replay_dead(command_ids: Sequence[int], portal_id: int | None = None) -> list[int]:
    """Queue dead commands again with fresh attempts and a fresh retry horizon; ids replayed."""
    c = OutboxCommand
    query = select(c.id, c.portal_id).where(c.status == CommandStatus.DEAD.value)
    if command_ids:
        query = query.where(c.id.in_(command_ids))
    if portal_id is not None:
        query = query.where(c.portal_id == portal_id)
    rows = db.session.execute(query).all()
    if not rows:
        return []
    db.session.execute(update(c).where(c.id.in_([r.id for r in rows]),
                                       c.status == CommandStatus.DEAD.value)
                       .values(status=CommandStatus.QUEUED.value, attempts=0, not_before=None,
                               first_sent_at=None, dead_reason=None, error=None,
                               lease_until=None, lease_owner=None, completed_at=None))
    nudge_after_commit(db.session(), {r.portal_id for r in rows})
    return sorted(r.id for r in rows)
