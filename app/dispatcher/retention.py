"""How long outbox rows are kept: finished commands are deleted after a while.

At 18,000 calls a day, several commands a call, and thousands of portals, the outbox
gains millions of rows a day; nothing else ever deletes one. The rules, each a setting:

- ``done`` rows are deleted ``OUTBOX_KEEP_DONE_DAYS`` (7) after they completed: time
  to look into a complaint, far past any settle retry;
- ``dead`` rows are deleted ``OUTBOX_KEEP_DEAD_DAYS`` (30) after they died: a month to
  read the reason and replay them (``flask outbox dead|replay``).

Never deleted: queued and in-flight rows; a done or dead row whose outcome is not
settled yet (its handler has not run, and the outcome is built from the row); and a done
or dead row that an unfinished command of its portal depends on (``after``, or a ``ref`` in
its params): the packer reads that row's status and result, and a missing one would
dead-letter the dependant. Such rows are skipped in this pass and deleted by a later one.

Every command with a dependency has ``after_id`` set (``outbox.submit`` stores the
highest dependency when ``after`` is not given), so only those are read to find the
protected rows. A command submitted while a pass runs that references a row old enough
to go could lose that row (and then be dead-lettered, never sent wrong): commands
reference recent ones, so this is left open rather than paid for on every delete.

Rows go oldest first, ``Retention.batch`` (5000) at a time, each batch its own short
transaction, walking the ``(status, completed_at, id)`` index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from flask import current_app
from prometheus_client import Counter
from sqlalchemy import delete, select, tuple_
from sqlalchemy.engine import Connection, Engine

from app.dispatcher.models import CommandStatus, OutboxCommand
from app.dispatcher.refs import references
from app.extensions import db
from app.tenants.models import utcnow

log = logging.getLogger(__name__)
T = OutboxCommand.__table__
DONE, DEAD = CommandStatus.DONE.value, CommandStatus.DEAD.value
UNFINISHED = (CommandStatus.QUEUED.value, CommandStatus.INFLIGHT.value)
BATCH = 5000

PRUNED = Counter("b24relay_outbox_pruned_total", "Finished outbox rows deleted by retention.",
                 ["status"])


@dataclass(frozen=True)
class Retention:
    """Days each kind of finished row is kept (see the module docstring)."""

    done_days: float = 7
    dead_days: float = 30
    batch: int = BATCH

    @classmethod
    def from_config(cls) -> Retention:
        """The policy the app's settings (``OUTBOX_KEEP_DONE_DAYS``, ``..._DEAD_DAYS``) give."""
        cfg = current_app.config
        return cls(done_days=cfg["OUTBOX_KEEP_DONE_DAYS"], dead_days=cfg["OUTBOX_KEEP_DEAD_DAYS"])


@dataclass
class _Pass:
    """One prune pass: the rows unfinished commands depend on, read once per portal."""

    engine: Engine
    protected: dict[int, set[int]] = field(default_factory=dict)  # portal id -> command ids

    def kept(self, rows: list[Any]) -> set[int]:
        """The ids among ``rows`` (id, portal_id) an unfinished command depends on."""
        missing = sorted({r.portal_id for r in rows} - set(self.protected))
        if missing:
            self._load(missing)
        return {r.id for r in rows if r.id in self.protected[r.portal_id]}

    def _load(self, portal_ids: list[int]) -> None:
        for pid in portal_ids:
            self.protected[pid] = set()
        query = select(T.c.portal_id, T.c.after_id, T.c.params).where(
            T.c.portal_id.in_(portal_ids), T.c.status.in_(UNFINISHED), T.c.after_id.is_not(None))
        with self.engine.connect() as conn:
            for row in conn.execute(query):
                self.protected[row.portal_id] |= references(row.params) | {row.after_id}


def prune(policy: Retention, now: datetime | None = None) -> dict[str, int]:
    """Apply ``policy`` once; how many done and dead rows were deleted."""
    now = now or utcnow()
    run = _Pass(db.engine)
    done = _delete_older(run, DONE, now - timedelta(days=policy.done_days), policy.batch)
    dead = _delete_older(run, DEAD, now - timedelta(days=policy.dead_days), policy.batch)
    PRUNED.labels(DONE).inc(done)
    PRUNED.labels(DEAD).inc(dead)
    result = {"done_deleted": done, "dead_deleted": dead}
    if done or dead:
        log.info("outbox retention: %s", result)
    return result


def _delete_older(run: _Pass, status: str, cutoff: datetime, batch: int) -> int:
    """Delete ``status`` rows completed before ``cutoff``, oldest first, a batch a commit."""
    total, after = 0, None
    while True:
        with run.engine.begin() as conn:
            rows = _candidates(conn, status, cutoff, after, batch)
            if not rows:
                return total
            after = (rows[-1].completed_at, rows[-1].id)
            kept = run.kept(rows)
            doomed = [r.id for r in rows if r.id not in kept]
            if doomed:
                total += conn.execute(delete(T).where(
                    T.c.id.in_(doomed), T.c.status == status, _settled())).rowcount
        if len(rows) < batch:
            return total


def _candidates(conn: Connection, status: str, cutoff: datetime,
                after: tuple[datetime, int] | None, batch: int) -> list[Any]:
    """The next ``batch`` rows of ``status`` completed before ``cutoff``, past ``after``."""
    query = select(T.c.id, T.c.portal_id, T.c.completed_at).where(
        T.c.status == status, T.c.completed_at < cutoff, _settled())
    if after is not None:
        query = query.where(tuple_(T.c.completed_at, T.c.id) > tuple_(*after))
    return list(conn.execute(query.order_by(T.c.completed_at, T.c.id).limit(batch)))


def _settled() -> Any:
    """A finished row goes only once its outcome was settled (or it had no handler)."""
    return T.c.settled.is_(True)
