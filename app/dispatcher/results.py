"""Outcomes: how each command ended, delivered to the handler its submitter registered.

Every command ends with exactly one :class:`Outcome`, on success and failure alike:

- ``DONE``: Bitrix24 ran it; ``result`` is its answer;
- ``DEAD``: it failed for good; ``reason`` says why and ``error`` is Bitrix24's error;
- ``UNKNOWN``: it may or may not have run (a method that is not safe to repeat whose
  request timed out, or whose worker stopped while it was in flight); never sent again.

A use case owns a tag and registers a handler for it, at bootstrap::

    register_outcome_handlers({"installation.users_page": users_page})

    # or, in a module the worker imports
    @outcome_handler("telephony.registered")
    def registered(outcome: Outcome) -> None: ...

and submits with ``submit(portal_id, ..., handler="installation.users_page",
context={...})``. When the command finishes, the engine (or the sweep, for one a stopped
worker left behind) enqueues the one settle actor with its id; the actor calls
:func:`settle`, which runs the handler in the worker's app context and commits once, with
the row marked settled. A settle sent twice runs the handler once in effect; handlers
must still be idempotent (a crash between their side effects elsewhere and the commit
runs them again). An unknown tag is logged and settled as unhandled.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, select, update

from app import queue
from app.dispatcher.models import CommandStatus, OutboxCommand
from app.extensions import db
from app.registry import Registry
from app.tenants.models import aware, utcnow

log = logging.getLogger(__name__)
T = OutboxCommand.__table__
# The one actor that settles outcomes (workers/dispatcher.py declares it by this name): the
# dispatcher owns the name because its engine and sweep enqueue it, and app/ imports no
# actor module.
SETTLE_ACTOR = "dispatcher_settle_outcomes"
FINISHED = (CommandStatus.DONE.value, CommandStatus.DEAD.value)


class OutcomeKind(enum.StrEnum):
    """How a command ended (stored in ``outbox_commands.outcome``)."""

    DONE = "done"
    DEAD = "dead"
    UNKNOWN = "unknown"  # it may have run: not sent again, and not known to have failed


@dataclass(frozen=True)
class Outcome:
    """What a handler receives about one finished command."""

    command_id: int
    portal_id: int
    method: str
    params: Mapping[str, Any]
    kind: OutcomeKind
    result: Any = None
    error: Mapping[str, Any] | None = None  # Bitrix24's {"error", "error_description"}
    reason: str | None = None  # why it is dead or unknown
    context: Mapping[str, Any] = field(default_factory=dict)  # what the submitter attached
    key: str | None = None
    handler: str | None = None
    completed_at: datetime | None = None

    @property
    def ok(self) -> bool:
        """Whether the command ran and its result is here."""
        return self.kind is OutcomeKind.DONE


Handler = Callable[[Outcome], Any]
_handlers: Registry[str, Handler] = Registry()


class NotYet(Exception):  # noqa: N818 - an instruction to settle later, not a failure kind
    """Raised by a handler whose outcome needs others still on their way: the settle is
    rolled back and tried again later."""


def outcome_handler(tag: str) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of commands submitted with ``tag``."""

    return lambda fn: _handlers.add(tag, fn)


def register_outcome_handlers(handlers: Mapping[str, Handler]) -> None:
    """Register a table of tag -> handler (the same rules as :func:`outcome_handler`)."""
    for tag, fn in handlers.items():
        outcome_handler(tag)(fn)


def handler_for(tag: str) -> Handler | None:
    """The handler registered for ``tag``, or None."""
    return _handlers.get(tag)


def settle(command_id: int) -> bool:
    """Run a finished command's handler and mark it settled, in one commit (the caller's
    app context; rolled back and re-raised when the handler raises). False when there was
    nothing to settle: not finished yet, settled already, or gone."""
    claimed = cast(CursorResult, db.session.execute(update(T).where(  # a DML statement's result
        T.c.id == command_id, T.c.settled.is_(False), T.c.status.in_(FINISHED))
        .values(settled=True))).rowcount
    if not claimed:  # on PostgreSQL a concurrent settle waits on the row lock, then sees 0
        db.session.rollback()
        return False
    try:
        outcome = _outcome(db.session.execute(select(T).where(T.c.id == command_id)).one())
        fn = handler_for(outcome.handler or "")
        if fn is None:
            log.warning("command %s: no handler registered for %r; settled as unhandled",
                        command_id, outcome.handler)
        else:
            fn(outcome)
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise
    return True


def earlier(outcome: Outcome) -> list[Outcome]:
    """The outcomes of the earlier commands of ``outcome``'s ordering key, in order; raises
    :class:`NotYet` while one is unfinished (a batch may finish a key's later command while
    an earlier one waits to be retried)."""
    if outcome.key is None:
        return []
    rows = db.session.execute(select(T).where(
        T.c.portal_id == outcome.portal_id, T.c.key == outcome.key,
        T.c.id < outcome.command_id).order_by(T.c.id)).all()
    if any(r.status not in FINISHED for r in rows):
        raise NotYet(f"an earlier command of key {outcome.key!r} is still on its way")
    return [_outcome(r) for r in rows]


def _outcome(row: Any) -> Outcome:
    kind = OutcomeKind(row.outcome or (OutcomeKind.DONE if row.status == CommandStatus.DONE
                                       else OutcomeKind.DEAD))
    return Outcome(command_id=row.id, portal_id=row.portal_id, method=row.method,
                   params=row.params or {}, kind=kind, result=row.result, error=row.error,
                   reason=row.dead_reason, context=row.context or {}, key=row.key,
                   handler=row.handler, completed_at=aware(row.completed_at))


def send_settle(command_ids: Sequence[int]) -> None:
    """Enqueue the settle actor for these finished commands and note when (app context)."""
    ids = sorted(set(command_ids))
    if not ids:
        return
    queue.enqueue(SETTLE_ACTOR, ids)
    db.session.execute(update(T).where(T.c.id.in_(ids)).values(settle_sent_at=utcnow()))
    db.session.commit()
