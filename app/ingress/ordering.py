"""Ordering per key: the rows of one (portal, key) are handled one at a time, in id order.

An inbox row may carry an ordering key (``order_key``). A PBX call event's key is its
``call_id`` (set at intake, app/ingress/views.py), scoped by the row's portal; Bitrix24
events have none. The rule, kept by the claim (app/ingress/processing.py):

- a row with a key can be claimed only when no earlier row (lower id) of the same
  (portal, key) is unfinished: ``received``, ``queued`` or ``processing``, which includes
  a row waiting for its retry (``queued`` again). Parked (``unhandled``, ``held``),
  ``done`` and ``dead`` rows do not hold the rows after them back;
- a keyless row is claimed as before, by the same single UPDATE (the key test stops at
  ``order_key IS NULL``);
- a message for a row that must wait does nothing, and spends no attempt: the row stays
  ``queued``. When a row stops holding its key back (done, dead, parked), its worker,
  after that commit, queues the key's next waiting row (:func:`wake_next`). Should that
  message be lost, the sweeper queues the waiting row again after ``INBOX_REQUEUE_AFTER``.

So handlers of keyed events need no locks of their own: one call's events reach them one
at a time, in order of arrival (row id). Arrival order is id order on both databases:
SQLite has one writer at a time, and on PostgreSQL a keyed insert holds a lock on its key
until it commits (app/ingress/inbox/storing.py), so a key's rows commit in id order and a
worker that sees a row sees the key's earlier rows too. The race of a finisher and a
waiting row's claim is safe either way: the claim that saw the earlier row unfinished
left its row ``queued``, and the finisher looks for queued rows only after its commit.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import exists, or_, select
from sqlalchemy.orm import aliased

from app import queue
from app.extensions import db
from app.ingress import metrics
from app.ingress.inbox import ACTOR, QUEUE
from app.ingress.models import PENDING, InboxEvent, InboxStatus

log = logging.getLogger(__name__)

UNFINISHED = (*PENDING, InboxStatus.PROCESSING.value)  # these hold the later rows back


def pbx_key(event: dict[str, Any]) -> str:
    """A PBX call event's ordering key: its call's id (checked at intake: 1..256 chars)."""
    return str(event["call_id"])


def first_of_its_key() -> Any:
    """The claim's condition: the row has no key, or no earlier row of its key is unfinished.

    Built once: it has no parameters, and building the expression cost more CPU than the
    claim's statement itself (a third of it, profiled on a PBX event's path)."""
    global _FIRST_OF_ITS_KEY
    if _FIRST_OF_ITS_KEY is None:
        earlier = aliased(InboxEvent)
        _FIRST_OF_ITS_KEY = or_(InboxEvent.order_key.is_(None), ~exists().where(
            earlier.portal_id == InboxEvent.portal_id, earlier.order_key == InboxEvent.order_key,
            earlier.id < InboxEvent.id, earlier.status.in_(UNFINISHED)))
    return _FIRST_OF_ITS_KEY


_FIRST_OF_ITS_KEY: Any = None


def next_waiting(portal_id: int | None, order_key: str) -> tuple[int, str] | None:
    """(id, source) of the first row of the key that waits to be claimed, if any."""
    row = db.session.execute(
        select(InboxEvent.id, InboxEvent.source)
        .where(InboxEvent.portal_id == portal_id, InboxEvent.order_key == order_key,
               InboxEvent.status.in_(PENDING))
        .order_by(InboxEvent.id).limit(1)).first()
    return (row.id, row.source) if row else None


def wake_next(portal_id: int | None, order_key: str | None) -> None:
    """Queue the key's next waiting row; call after the commit that let it go.

    A failure is only logged: the waiting row is ``queued``, so the sweeper sends it again.
    """
    if order_key is None:
        return
    try:
        found = next_waiting(portal_id, order_key)
        db.session.commit()  # end the read; nothing was written
        if found is None:
            return
        queue.enqueue(ACTOR, found[0], queue_name=QUEUE)
        metrics.QUEUED.labels(found[1], "order").inc()
    except Exception as exc:  # noqa: BLE001 - the sweeper queues the row again
        db.session.rollback()
        log.warning("could not queue the next row of key %r (portal %s); the sweeper will: %s",
                    order_key, portal_id, exc)
