"""Submitting commands to the outbox, and the operator's view of it (services; callers commit).

``submit`` adds a row and flushes it; the caller's commit makes it durable, and only
then are the dispatchers nudged (one Redis message per commit, from the session's
``after_commit`` event). A rollback nudges nothing and leaves no row. A handler that
submits while it processes an inbox row therefore sends its commands exactly when the
row is marked done, never twice for a retried event.

``ref(command_id, *path)`` (app/dispatcher/refs.py) points a later command's params at an
earlier command's result; a command that references another (or names it with ``after``)
waits until it is done. ``handler`` and ``context`` ask for the command's outcome
(app/dispatcher/results.py) once it finishes, done or not.
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

_PENDING_NUDGES = "b24relay_dispatch_nudge"


def submit(portal_id: int, method: str, params: Mapping[str, Any] | None = None, *,
           key: str | None = None, after: int | None = None,
           priority: Priority = Priority.NORMAL, handler: str | None = None,
           context: Mapping[str, Any] | None = None) -> int:
    """Add a command to a portal's outbox (flushed, not committed); return its id.

    - ``portal_id``: the portal (``Portal.id``) whose outbox takes the command.
    - ``method``, ``params``: the REST method and its parameters (JSON); a ``ref`` in the
      params stands for an earlier command's result and makes this one wait for it.
    - ``key``: an ordering key: commands of one key go out one after another, in id order.
    - ``after``: the id of an earlier command of the same portal that must be done first.
    - ``priority``: ``Priority.REALTIME`` (a person waits now), ``NORMAL`` (the default) or
      ``BULK`` (nobody waits; never takes the slots kept for the other two).
    - ``handler``: the tag of an outcome handler (``app.dispatcher.results``); it receives
      the command's ``Outcome`` (done, dead or unknown) once the command finishes.
    - ``context``: JSON the handler receives with the outcome (only with ``handler``).
    """
    if not method or method.strip().lower() == "batch":
        raise ValueError(f"not a command for the outbox: {method!r}")
    if context is not None and handler is None:
        raise ValueError("a context is for a handler: give the handler's tag too")
    deps = references(params) | ({int(after)} if after is not None else set())
    row = OutboxCommand(portal_id=int(portal_id), method=method.strip(),
                        params=dict(params or {}), key=key,
                        after_id=after if after is not None else max(deps, default=None),
                        priority=Priority(priority).value, status=CommandStatus.QUEUED.value,
                        attempts=0, handler=handler,
                        context=dict(context) if context is not None else None,
                        settled=handler is None)
    db.session.add(row)
    db.session.flush()
    nudge_after_commit(db.session(), [row.portal_id])
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
                               first_sent_at=None, dead_reason=None, error=None, outcome=None,
                               lease_until=None, lease_owner=None, completed_at=None,
                               # its new outcome goes to its handler again
                               settled=c.handler.is_(None), settle_sent_at=None))
    nudge_after_commit(db.session(), {r.portal_id for r in rows})
    return sorted(r.id for r in rows)
