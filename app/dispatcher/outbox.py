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

The operator's side: counts (``depths``), dead letters (list, count by method, replay,
discard), and one ordering key's commands (a call's story, placements/calls).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, event, func, select, update
from sqlalchemy.orm import Session

from app.dispatcher import nudge
from app.dispatcher.models import CommandStatus, OutboxCommand, Priority
from app.dispatcher.refs import references
from app.extensions import db, redis_ext
from app.tenants.models import aware

log = logging.getLogger(__name__)
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


def dead_kinds(portal_id: int) -> dict[str, int]:
    """A portal's dead commands counted by REST method."""
    c = OutboxCommand
    query = (select(c.method, func.count())
             .where(c.portal_id == portal_id, c.status == CommandStatus.DEAD.value)
             .group_by(c.method))
    return {method: n for method, n in db.session.execute(query).all()}


def dead_ids(portal_id: int, method: str | None = None, among: Sequence[int] = ()) -> list[int]:
    """The ids of a portal's dead commands: of one method (for "retry all", "discard all"),
    or those of ``among`` that are still dead."""
    c = OutboxCommand
    query = select(c.id).where(c.portal_id == portal_id, c.status == CommandStatus.DEAD.value)
    if method is not None:
        query = query.where(c.method == method)
    if among:
        query = query.where(c.id.in_(list(among)))
    return list(db.session.scalars(query.order_by(c.id)).all())


@dataclass(frozen=True)
class Discarded:
    """What a discard did: the commands deleted, and those kept (their outcome is still on
    its way to its handler, or an unfinished command depends on them: try again later)."""

    ids: list[int]
    kept: list[int]


def discard_dead(command_ids: Sequence[int], portal_id: int) -> Discarded:
    """Delete these dead commands of a portal for good (callers commit).

    What retention does after ``OUTBOX_KEEP_DEAD_DAYS``, done early and under its rules
    (app/dispatcher/retention.py): a command whose outcome is not settled yet, or that an
    unfinished command of the portal depends on, is kept. Each deletion leaves a log line
    (portal, id, method, reason) as the audit trail.
    """
    c = OutboxCommand
    rows = db.session.execute(
        select(c.id, c.method, c.settled, c.dead_reason)
        .where(c.id.in_(list(command_ids)), c.portal_id == portal_id,
               c.status == CommandStatus.DEAD.value)).all() if command_ids else []
    protected = _depended_on(portal_id)
    gone = [r for r in rows if r.settled and r.id not in protected]
    if gone:
        db.session.execute(delete(c).where(c.id.in_([r.id for r in gone]),
                                           c.status == CommandStatus.DEAD.value))
    for r in gone:
        log.info("outbox dead letter %s of portal %s discarded: %s (%s)", r.id, portal_id,
                 r.method, (r.dead_reason or "")[:200])
    return Discarded(sorted(r.id for r in gone),
                     sorted(r.id for r in rows if r not in gone))


def _depended_on(portal_id: int) -> set[int]:
    """The commands an unfinished command of the portal waits for (``after`` or a ``ref``)."""
    c = OutboxCommand
    query = select(c.after_id, c.params).where(
        c.portal_id == portal_id, c.after_id.is_not(None),
        c.status.in_([CommandStatus.QUEUED.value, CommandStatus.INFLIGHT.value]))
    out: set[int] = set()
    for after_id, params in db.session.execute(query).all():
        out |= references(params) | {after_id}
    return out


@dataclass(frozen=True)
class CommandRecord:
    """One command as an operator reads it: what was sent, how it ended, and when."""

    id: int
    method: str
    params: dict[str, Any]
    status: str
    outcome: str | None
    attempts: int
    submitted_at: datetime
    first_sent_at: datetime | None
    completed_at: datetime | None
    reason: str
    error: dict[str, Any] | None


def commands_for_key(portal_id: int, key: str, limit: int = 500) -> list[CommandRecord]:
    """A portal's commands of one ordering key (a call's ``call:<id>``), in id order
    (index ix_outbox_commands_portal_key); retention may have deleted the oldest."""
    c = OutboxCommand
    query = (select(c).where(c.portal_id == portal_id, c.key == key).order_by(c.id)
             .limit(limit))
    return [CommandRecord(r.id, r.method, dict(r.params or {}), r.status, r.outcome,
                          r.attempts, aware(r.submitted_at),
                          aware(r.first_sent_at) if r.first_sent_at else None,
                          aware(r.completed_at) if r.completed_at else None,
                          r.dead_reason or "", r.error)
            for r in db.session.scalars(query).all()]
