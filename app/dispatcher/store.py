"""The dispatcher's database work, in SQL Core on a plain engine (run in the engine's threads).

Nothing here needs a Flask app context or an ORM session: the engine passes the
SQLAlchemy engine in, and rows come back as plain values, so no ORM object is ever
shared between coroutines.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, select, update
from sqlalchemy.engine import Connection, Engine

from app.dispatcher.models import CommandStatus, OutboxCommand
from app.dispatcher.packer import MISSING, Candidate, Dependency
from app.tenants.models import aware

T = OutboxCommand.__table__
QUEUED, INFLIGHT = CommandStatus.QUEUED.value, CommandStatus.INFLIGHT.value
DONE, DEAD = CommandStatus.DONE.value, CommandStatus.DEAD.value
_CANDIDATE_COLUMNS = (T.c.id, T.c.method, T.c.params, T.c.key, T.c.after_id, T.c.priority,
                      T.c.attempts, T.c.first_sent_at, T.c.submitted_at, T.c.on_done)


@dataclass
class Ready:
    """A portal's due queued commands and what the packer needs to judge them."""

    candidates: list[Candidate]
    blockers: dict[str, int]
    deps: dict[int, Dependency]
    complete: bool  # every due command is a candidate (the fetch was not cut)


def _due(now: datetime) -> Any:
    return or_(T.c.not_before.is_(None), T.c.not_before <= now)


def fetch_ready(engine: Engine, portal_id: int, now: datetime, limit: int) -> Ready:
    """Up to ``limit`` due queued commands (real-time first, then by id), blockers and deps."""
    with engine.connect() as conn:
        rows = conn.execute(select(*_CANDIDATE_COLUMNS)
                            .where(T.c.portal_id == portal_id, T.c.status == QUEUED, _due(now))
                            .order_by(T.c.priority, T.c.id).limit(limit)).all()
        candidates = [_candidate(row) for row in rows]
        full = len(rows) >= limit
        return Ready(candidates, _blockers(conn, portal_id, candidates, now, full),
                     _dependencies(conn, portal_id, candidates), complete=not full)


def _candidate(row: Any) -> Candidate:
    return Candidate(row.id, row.method, row.params or {}, row.key, row.after_id, row.priority,
                     row.attempts, aware(row.first_sent_at), aware(row.submitted_at), row.on_done)


def _blockers(conn: Connection, portal_id: int, candidates: list[Candidate], now: datetime,
              full: bool) -> dict[str, int]:
    """Per key, the lowest unfinished id that is not a candidate (in flight, not yet due,
    or beyond the fetched window)."""
    keys = sorted({c.key for c in candidates if c.key is not None})
    if not keys:
        return {}
    outside = [T.c.status == INFLIGHT, and_(T.c.status == QUEUED, ~_due(now))]
    if full:
        last = candidates[-1]
        outside.append(and_(T.c.status == QUEUED, or_(
            T.c.priority > last.priority,
            and_(T.c.priority == last.priority, T.c.id > last.id))))
    query = (select(T.c.key, func.min(T.c.id))
             .where(T.c.portal_id == portal_id, T.c.key.in_(keys), or_(*outside))
             .group_by(T.c.key))
    return {key: low for key, low in conn.execute(query)}


def _dependencies(conn: Connection, portal_id: int,
                  candidates: list[Candidate]) -> dict[int, Dependency]:
    wanted = sorted(set().union(*(c.depends_on() for c in candidates)) if candidates else set())
    if not wanted:
        return {}
    rows = conn.execute(select(T.c.id, T.c.status, T.c.result)
                        .where(T.c.portal_id == portal_id, T.c.id.in_(wanted))).all()
    found = {row.id: Dependency(row.status, row.result) for row in rows}
    return {dep: found.get(dep, Dependency(MISSING)) for dep in wanted}


def has_ready(engine: Engine, portal_id: int, now: datetime) -> bool:
    """Whether the portal has any due queued command."""
    with engine.connect() as conn:
        return conn.execute(select(T.c.id).where(T.c.portal_id == portal_id,
                                                 T.c.status == QUEUED, _due(now))
                            .limit(1)).first() is not None


def lease(engine: Engine, ids: Sequence[int], *, owner: str, batch_id: str, now: datetime,
          until: datetime) -> set[int]:
    """Take queued commands into flight; returns the ids actually leased."""
    return lease_round(engine, [(batch_id, ids)], owner=owner, now=now, until=until)[batch_id]


def lease_round(engine: Engine, batches: Sequence[tuple[str, Sequence[int]]], *, owner: str,
                now: datetime, until: datetime) -> dict[str, set[int]]:
    """Lease several batches (``(batch_id, ids)``) in one transaction: one commit a round.

    Returns, per batch id, the ids actually leased (a command another engine leased
    first, or recovered meanwhile, is not).
    """
    out: dict[str, set[int]] = {}
    with engine.begin() as conn:
        for batch_id, ids in batches:
            stmt = (update(T).where(T.c.id.in_(list(ids)), T.c.status == QUEUED)
                    .values(status=INFLIGHT, lease_until=until, lease_owner=owner,
                            batch_id=batch_id, attempts=T.c.attempts + 1,
                            first_sent_at=func.coalesce(T.c.first_sent_at, now))
                    .returning(T.c.id))
            out[batch_id] = {row.id for row in conn.execute(stmt)}
    return out


# Every outcome row carries every column below, so one executemany writes a whole batch.
OUTCOME_COLUMNS = ("status", "attempts_delta", "not_before", "result", "error", "dead_reason",
                   "completed_at")
_RECORD = (update(T).where(T.c.id == bindparam("b_id"), T.c.status == INFLIGHT,
                           T.c.lease_owner == bindparam("b_owner"))
           .values(status=bindparam("b_status"),
                   attempts=T.c.attempts + bindparam("b_attempts_delta"),
                   not_before=bindparam("b_not_before"), result=bindparam("b_result"),
                   error=bindparam("b_error"), dead_reason=bindparam("b_dead_reason"),
                   completed_at=bindparam("b_completed_at"), lease_until=None))


def record(engine: Engine, owner: str, outcomes: Iterable[dict[str, Any]]) -> None:
    """Write each command's outcome (``id`` plus OUTCOME_COLUMNS) in one executemany.

    Only rows this owner still leases are written: a lease the sweep already recovered
    belongs to someone else now.
    """
    params = [{"b_id": o["id"], "b_owner": owner, **{f"b_{k}": o[k] for k in OUTCOME_COLUMNS}}
              for o in outcomes]
    if params:
        with engine.begin() as conn:
            conn.execute(_RECORD, params)


def mark_doomed(engine: Engine, doomed: dict[int, str], now: datetime) -> None:
    """Dead-letter queued commands that can never run (their dependency is dead)."""
    stmt = (update(T).where(T.c.id == bindparam("b_id"), T.c.status == QUEUED)
            .values(status=DEAD, dead_reason=bindparam("b_reason"), completed_at=now))
    if doomed:
        with engine.begin() as conn:
            conn.execute(stmt, [{"b_id": i, "b_reason": r} for i, r in doomed.items()])


def mark_notified(engine: Engine, ids: Sequence[int]) -> None:
    """Record that the on_done actors of these done commands were enqueued."""
    if ids:
        with engine.begin() as conn:
            conn.execute(update(T).where(T.c.id.in_(list(ids))).values(on_done_sent=True))


def lease_seconds(request_timeout: float, margin: float) -> timedelta:
    """How long a batch's commands stay leased: the request's worst case plus a margin."""
    return timedelta(seconds=request_timeout + margin)
