"""How long inbox rows are kept: finished rows are pruned, parked rows expire.

At 500 events/s the inbox gains 43 million rows a day, so finished rows cannot
stay forever. The rules, each a setting:

- ``done`` rows are deleted ``INBOX_KEEP_DONE_DAYS`` (7) after they arrived:
  long enough to look into a complaint, and far past any sender's retries (the
  dedupe key only has to outlive those);
- ``dead`` rows are deleted ``INBOX_KEEP_DEAD_DAYS`` (30) after they failed, so
  there is a month to read ``last_error`` and replay them;
- parked rows (``unhandled``, ``held``) that waited ``INBOX_PARK_DAYS`` (30) are
  not deleted: they become ``dead`` with a reason saying so, and then follow the
  ``dead`` rule. An event that could not be handled for a month is stale (a deal
  update, a call long over), and replaying it later would do harm, but it is
  still shown and counted before it goes.

Rows still on their way (``received``, ``queued``, ``processing``) are never touched.
Expiry and deletes run in batches (``Retention.batch``, 5000 rows), each its own short transaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from flask import current_app
from prometheus_client import Counter
from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Delete,
    Update,
    delete,
    func,
    literal,
    select,
    update,
)

from app.extensions import db
from app.ingress.models import PARKED, InboxEvent, InboxStatus
from app.tenants.models import utcnow

log = logging.getLogger(__name__)

PRUNED = Counter("b24relay_inbox_pruned_total", "Finished inbox rows deleted by retention.",
                 ["status"])
EXPIRED = Counter("b24relay_inbox_expired_total",
                  "Parked inbox rows that waited too long and were marked dead.", ["status"])

BATCH = 5000
PARKED_OR_LEGACY = (*PARKED, InboxStatus.LEGACY_SKIPPED.value)


@dataclass(frozen=True)
class Retention:
    """Days each kind of row is kept (see the module docstring)."""

    done_days: float = 7
    dead_days: float = 30
    park_days: float = 30
    batch: int = BATCH

    @classmethod
    def from_config(cls) -> Retention:
        """The policy the app's settings (``INBOX_KEEP_*_DAYS``, ``INBOX_PARK_DAYS``) give."""
        cfg = current_app.config
        return cls(done_days=cfg["INBOX_KEEP_DONE_DAYS"], dead_days=cfg["INBOX_KEEP_DEAD_DAYS"],
                   park_days=cfg["INBOX_PARK_DAYS"])


def _in_batches(statement: Update | Delete, condition: ColumnElement[bool], batch: int) -> int:
    """Run ``statement`` on the rows matching ``condition``, ``batch`` rows per commit."""
    total = 0
    while True:
        ids = select(InboxEvent.id).where(condition).limit(batch).scalar_subquery()
        count = cast(CursorResult, db.session.execute(  # a DML statement's result
            statement.where(InboxEvent.id.in_(ids), condition)
            .execution_options(synchronize_session=False))).rowcount
        db.session.commit()
        total += count
        if count < batch:
            return total


def prune(policy: Retention, now: datetime | None = None) -> dict[str, int]:
    """Apply ``policy`` once; how many rows were expired and deleted, by kind."""
    now = now or utcnow()
    expire = update(InboxEvent).values(
        status=InboxStatus.DEAD.value, processed_at=now,
        last_error=literal("expired: parked as ") + InboxEvent.status
        + literal(f" for over {policy.park_days:g} days; not replayed"))
    expired = _in_batches(expire, InboxEvent.status.in_(PARKED_OR_LEGACY)
                          & (InboxEvent.received_at < now - timedelta(days=policy.park_days)),
                          policy.batch)
    done = _in_batches(delete(InboxEvent), (InboxEvent.status == InboxStatus.DONE.value)
                       & (InboxEvent.received_at < now - timedelta(days=policy.done_days)),
                       policy.batch)
    dead = _in_batches(delete(InboxEvent), (InboxEvent.status == InboxStatus.DEAD.value)
                       & (func.coalesce(InboxEvent.processed_at, InboxEvent.received_at)
                          < now - timedelta(days=policy.dead_days)), policy.batch)
    if expired:
        EXPIRED.labels("parked").inc(expired)
    PRUNED.labels(InboxStatus.DONE.value).inc(done)
    PRUNED.labels(InboxStatus.DEAD.value).inc(dead)
    result = {"expired": expired, "done_deleted": done, "dead_deleted": dead}
    if any(result.values()):
        log.info("inbox retention: %s", result)
    return result
