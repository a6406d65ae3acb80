"""The dispatcher's database work, in SQL Core on a plain engine (run in the engine's threads).

Nothing here needs a Flask app context or an ORM session: the engine passes the
SQLAlchemy engine in, and rows come back as plain values, so no ORM object is ever
shared between coroutines.

On PostgreSQL a round's leases and a group's outcomes are each one statement (``UPDATE ...
FROM unnest(arrays)``, ``UPDATE ... FROM json_to_recordset(document)``) and id and key lists
are one array parameter (``= ANY(...)``): a statement per batch costs a round trip, and a
placeholder per value a parse on both ends. SQLite runs in-process, where statements are
cheap: it keeps plain statements.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ARRAY,
    JSON,
    BigInteger,
    DateTime,
    Integer,
    String,
    Text,
    and_,
    any_,
    bindparam,
    cast,
    column,
    func,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine

from app.dispatcher.models import CommandStatus, OutboxCommand
from app.dispatcher.packer import MISSING, Candidate, Dependency
from app.dispatcher.results import OutcomeKind
from app.tenants.models import aware

T = OutboxCommand.__table__
QUEUED, INFLIGHT = CommandStatus.QUEUED.value, CommandStatus.INFLIGHT.value
DONE, DEAD = CommandStatus.DONE.value, CommandStatus.DEAD.value
_CANDIDATE_COLUMNS = (T.c.id, T.c.method, T.c.params, T.c.key, T.c.after_id, T.c.priority,
                      T.c.attempts, T.c.first_sent_at, T.c.submitted_at, T.c.handler)


@dataclass
class Ready:
    """A portal's due queued commands and what the packer needs to judge them."""

    candidates: list[Candidate]
    blockers: dict[str, int]
    deps: dict[int, Dependency]
    complete: bool  # every due command is a candidate (the fetch was not cut)


def _due(now: datetime) -> Any:
    return or_(T.c.not_before.is_(None), T.c.not_before <= now)


def _postgres(conn: Connection | Engine) -> bool:
    return conn.dialect.name == "postgresql"


def _statements(engine: Engine) -> AbstractContextManager[Connection]:
    """A connection for one unit of work: on PostgreSQL each statement commits by itself,
    on SQLite one transaction.

    Every write on PostgreSQL here is one statement, which is atomic and durable at its own
    commit: BEGIN and COMMIT around it would be two more round trips. A read of several
    statements loses nothing either: under READ COMMITTED each statement takes its own
    snapshot inside a transaction too. SQLite's lease runs a statement per batch, so it keeps
    the transaction (which a read never opens there).
    """
    if _postgres(engine):
        return engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    return engine.begin()


def _among(conn: Connection, column: Any, values: Iterable[Any], item: Any) -> Any:
    """``column IN values``: on PostgreSQL ``= ANY(array)``, one parameter however many."""
    if _postgres(conn):
        return column == any_(bindparam(None, list(values), type_=ARRAY(item)))
    return column.in_(list(values))


def _array(name: str, values: list[Any], item: Any) -> Any:
    return bindparam(name, values, type_=ARRAY(item))


def fetch_ready(engine: Engine, portal_id: int, now: datetime, limit: int) -> Ready:
    """Up to ``limit`` due queued commands (real-time first, then by id), blockers and deps."""
    with _statements(engine) as conn:
        rows = conn.execute(select(*_CANDIDATE_COLUMNS)
                            .where(T.c.portal_id == portal_id, T.c.status == QUEUED, _due(now))
                            .order_by(T.c.priority, T.c.id).limit(limit)).all()
        candidates = [_candidate(row) for row in rows]
        full = len(rows) >= limit
        return Ready(candidates, _blockers(conn, portal_id, candidates, now, full),
                     _dependencies(conn, portal_id, candidates), complete=not full)


def _candidate(row: Any) -> Candidate:
    # unpacked by position: a Row's attribute lookups cost more than the rest of this
    id_, method, params, key, after_id, priority, attempts, first_sent, submitted, handler = row
    return Candidate(id_, method, params or {}, key, after_id, priority, attempts,
                     aware(first_sent), aware(submitted), handler)


def _blockers(conn: Connection, portal_id: int, candidates: list[Candidate], now: datetime,
              full: bool) -> dict[str, int]:
    """Per key, the lowest unfinished id that is not a candidate (in flight, not yet due,
    or beyond the fetched window), if it is below the highest keyed candidate: only an
    earlier command blocks one (the packer compares ids), and the bound lets the server
    read the few rows outside the candidates instead of probing every key."""
    keys = sorted({c.key for c in candidates if c.key is not None})
    if not keys:
        return {}
    highest = max(c.id for c in candidates if c.key is not None)
    outside = [T.c.status == INFLIGHT, and_(T.c.status == QUEUED, ~_due(now))]
    if full:
        last = candidates[-1]
        outside.append(and_(T.c.status == QUEUED, or_(
            T.c.priority > last.priority,
            and_(T.c.priority == last.priority, T.c.id > last.id))))
    query = (select(T.c.key, func.min(T.c.id))
             .where(T.c.portal_id == portal_id, _among(conn, T.c.key, keys, String),
                    T.c.id < highest, or_(*outside))
             .group_by(T.c.key))
    return {key: low for key, low in conn.execute(query)}


def _dependencies(conn: Connection, portal_id: int,
                  candidates: list[Candidate]) -> dict[int, Dependency]:
    wanted = sorted(set().union(*(c.depends_on() for c in candidates)) if candidates else set())
    if not wanted:
        return {}
    rows = conn.execute(select(T.c.id, T.c.status, T.c.result)
                        .where(T.c.portal_id == portal_id,
                               _among(conn, T.c.id, wanted, BigInteger))).all()
    found = {row.id: Dependency(row.status, row.result) for row in rows}
    return {dep: found.get(dep, Dependency(MISSING)) for dep in wanted}


def has_ready(engine: Engine, portal_id: int, now: datetime) -> bool:
    """Whether the portal has any due queued command."""
    with _statements(engine) as conn:
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
    with _statements(engine) as conn:
        if _postgres(conn):
            return _lease_unnest(conn, batches, owner, now, until)
        out: dict[str, set[int]] = {}
        for batch_id, ids in batches:
            # ``status || ''``: SQLite would otherwise walk the status index over the whole
            # backlog instead of looking the ids up by primary key.
            stmt = (update(T).where(T.c.id.in_(list(ids)), T.c.status + "" == QUEUED)
                    .values(status=INFLIGHT, lease_until=until, lease_owner=owner,
                            batch_id=batch_id, attempts=T.c.attempts + 1,
                            first_sent_at=func.coalesce(T.c.first_sent_at, now))
                    .returning(T.c.id))
            out[batch_id] = {row.id for row in conn.execute(stmt)}
    return out


def _lease_unnest(conn: Connection, batches: Sequence[tuple[str, Sequence[int]]], owner: str,
                  now: datetime, until: datetime) -> dict[str, set[int]]:
    """The round's leases as one ``UPDATE ... FROM unnest(ids, batch ids)``."""
    pairs = [(i, batch_id) for batch_id, ids in batches for i in ids]
    v = func.unnest(_array("ids", [i for i, _ in pairs], BigInteger),
                    _array("batches", [b for _, b in pairs], String)
                    ).table_valued("id", "batch_id").render_derived()
    stmt = (update(T).where(T.c.id == v.c.id, T.c.status == QUEUED)
            .values(status=INFLIGHT, lease_until=until, lease_owner=owner,
                    batch_id=v.c.batch_id, attempts=T.c.attempts + 1,
                    first_sent_at=func.coalesce(T.c.first_sent_at, now))
            .returning(T.c.id, T.c.batch_id))
    out: dict[str, set[int]] = {batch_id: set() for batch_id, _ in batches}
    for row in conn.execute(stmt):
        out[row.batch_id].add(row.id)
    return out


# Every outcome row carries every column below, so one statement writes a whole group.
OUTCOME_COLUMNS = ("status", "attempts_delta", "not_before", "result", "error", "dead_reason",
                   "completed_at", "outcome")
_RECORD = (update(T).where(T.c.id == bindparam("b_id"), T.c.status == INFLIGHT,
                           T.c.lease_owner == bindparam("b_owner"))
           .values(status=bindparam("b_status"),
                   attempts=T.c.attempts + bindparam("b_attempts_delta"),
                   not_before=bindparam("b_not_before"), result=bindparam("b_result"),
                   error=bindparam("b_error"), dead_reason=bindparam("b_dead_reason"),
                   completed_at=bindparam("b_completed_at"), outcome=bindparam("b_outcome"),
                   lease_until=None))


def record(engine: Engine, owner: str, outcomes: Iterable[dict[str, Any]]) -> None:
    """Write each command's outcome (``id`` plus OUTCOME_COLUMNS) in one statement.

    Only rows this owner still leases are written: a lease the sweep already recovered
    belongs to someone else now.
    """
    rows = list(outcomes)
    if not rows:
        return
    with _statements(engine) as conn:
        if _postgres(conn):
            conn.execute(_record_json(owner, rows))
        else:
            conn.execute(_RECORD, [{"b_id": o["id"], "b_owner": owner,
                                    **{f"b_{k}": o[k] for k in OUTCOME_COLUMNS}}
                                   for o in rows])


# The outcome document's columns and their types; JSON null comes back as SQL NULL, so
# result and error fall back to JSON null, as the JSON columns store Python's None.
_OUTCOME_RECORD = (column("id", BigInteger), column("status", String),
                   column("attempts_delta", Integer), column("not_before", DateTime(True)),
                   column("result", JSON), column("error", JSON), column("dead_reason", Text),
                   column("completed_at", DateTime(True)), column("outcome", String))
_JSON_NULL = literal_column("'null'::json", JSON)


def _record_json(owner: str, rows: list[dict[str, Any]]) -> Any:
    """Every outcome as one ``UPDATE ... FROM json_to_recordset(:outcomes)``.

    One JSON document is a single parameter, encoded in one C call; arrays of JSON text
    cost psycopg a Python escape per element."""
    doc = json.dumps([{**{k: o[k] for k in OUTCOME_COLUMNS}, "id": o["id"],
                       "not_before": _iso(o["not_before"]),
                       "completed_at": _iso(o["completed_at"])} for o in rows])
    v = (func.json_to_recordset(cast(bindparam("outcomes", doc, type_=Text), JSON))
         .table_valued(*_OUTCOME_RECORD).render_derived(with_types=True))
    return (update(T).where(T.c.id == v.c.id, T.c.status == INFLIGHT, T.c.lease_owner == owner)
            .values(status=v.c.status, attempts=T.c.attempts + v.c.attempts_delta,
                    not_before=v.c.not_before, result=func.coalesce(v.c.result, _JSON_NULL),
                    error=func.coalesce(v.c.error, _JSON_NULL), dead_reason=v.c.dead_reason,
                    completed_at=v.c.completed_at, outcome=v.c.outcome, lease_until=None))


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def mark_doomed(engine: Engine, doomed: dict[int, str], now: datetime) -> None:
    """Dead-letter queued commands that can never run (their dependency is dead)."""
    stmt = (update(T).where(T.c.id == bindparam("b_id"), T.c.status == QUEUED)
            .values(status=DEAD, dead_reason=bindparam("b_reason"), completed_at=now,
                    outcome=OutcomeKind.DEAD.value))
    if doomed:
        with engine.begin() as conn:
            conn.execute(stmt, [{"b_id": i, "b_reason": r} for i, r in doomed.items()])


def lease_seconds(request_timeout: float, margin: float) -> timedelta:
    """How long a batch's commands stay leased: the request's worst case plus a margin."""
    return timedelta(seconds=request_timeout + margin)
