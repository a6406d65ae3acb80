"""Storing: an accepted event becomes one inbox row, through one INSERT.

Every new row goes through the same statement (``_INSERT``), written once here and
rendered for each way it runs: the checked path (``store``: intake after its checks, the
offline pull, provisional events) and the verified fast path (``store_verified``: the
token check is part of the statement), each on SQLAlchemy (SQLite, and PostgreSQL's
general path) and on psycopg directly (PostgreSQL's hot path). A duplicate (same
``(member_id, source, dedupe_key)``) inserts nothing.

A row with an ordering key (a PBX call's events, see app/ingress/ordering.py) is handed
out only after the earlier rows of its key, by id. On PostgreSQL, ids come from a
sequence before the commit, so two requests can commit a call's rows out of id order, and
a worker could then see row 6 before row 5 exists for it. A keyed insert therefore takes a
transaction lock on its (portal, key) first: a key's ids are drawn and committed in the
same order, and a row that is visible has its key's earlier rows visible too. SQLite
needs no lock: one writer at a time, ids drawn inside its write transaction.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, bindparam, text
from sqlalchemy.engine import Connection

from app.extensions import db, retry_if_connection_died
from app.ingress import metrics
from app.ingress.models import InboxStatus
from app.tenants import handler_key
from app.tenants.models import utcnow

log = logging.getLogger(__name__)


@dataclass
class NewEvent:
    """An event about to be stored."""

    member_id: str
    source: str
    event_type: str
    payload: dict[str, Any]
    dedupe_key: str
    portal_id: int | None = None
    unverified: bool = False
    status: str = InboxStatus.QUEUED.value  # or provisional: kept, not queued
    order_key: str | None = None  # rows of one (portal, key) are handled in id order


@dataclass(frozen=True)
class Stored:
    """An inbox row id, and whether this delivery created it."""

    id: int
    created: bool


def digest(value: Any) -> str:
    """SHA-256 of a canonical JSON rendering (the dedupe key)."""
    raw = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()


# Lifecycle events whose auth block is what they deliver: the installer's (or updater's)
# token chain and, on short-form portals, the application_token's only copy.
AUTH_IN_KEY = frozenset({"ONAPPINSTALL", "ONAPPUPDATE"})
# ONAPPUNINSTALL carries no tokens of a user to tell copies apart: whether it came through
# the app's own binding (the handler key, which employees cannot read) is part of its key.
HANDLER_KEY_IN_KEY = frozenset({"ONAPPUNINSTALL"})


def b24_dedupe_key(event: dict[str, Any], query_key: str | None = None) -> str:
    """What makes two Bitrix24 deliveries the same event: its name, handler, time and data;
    for ONAPPINSTALL and ONAPPUPDATE their auth block too (read before its tokens are
    stripped).

    Everything but the auth block of those two is known or guessable to any employee (the
    member_id, a small handler id, constant data, ``ts`` in seconds): without it, copies
    posted ahead with other tokens made Bitrix24's real one a duplicate, never processed,
    and a short-form portal never got its application_token. Each copy is now a row of
    its own, judged by its handler's ``app.info`` check; a repeated delivery of the same
    event (same tokens) is still stored once. ONAPPUNINSTALL has no such tokens, so whether
    it came with the portal's handler key (``query_key``, the request's ``k``) is in its
    key: copies an employee posts ahead cannot make the real one a duplicate.
    """
    parts = [event.get("event"), event.get("event_handler_id"), event.get("ts"),
             event.get("data")]
    name = event.get("event")
    if isinstance(name, str) and name.strip().upper() in AUTH_IN_KEY:
        parts.append(event.get("auth"))
    if isinstance(name, str) and name.strip().upper() in HANDLER_KEY_IN_KEY:
        auth = event.get("auth")
        member_id = str(auth.get("member_id") or "") if isinstance(auth, dict) else ""
        parts.append(["keyed", handler_key.matches(member_id, query_key)])
    return digest(parts)


# The one INSERT, valid on PostgreSQL and SQLite (3.35+); the hot path skips the ORM and
# statement compilation. Its rows come from a SELECT: either the event's own values
# ("WHERE TRUE": SQLite's upsert needs a WHERE after a SELECT), or, on the verified path,
# the portal row whose stored token hash is the event's: the check and the write are one
# statement against the committed portal row, so from the moment a change of the token
# commits, no process accepts the old one (no cache to keep right), and one portal or
# 10,000 cost the same index probe.
_INSERT = (
    "INSERT INTO inbox_events (portal_id, member_id, source, event_type, dedupe_key, payload,"
    " unverified, status, order_key, attempts, received_at)"
    " SELECT {portal_id}, {member_id}, {source}, {event_type}, {dedupe_key}, {payload},"
    " {unverified}, {status}, {order_key}, 0, {received_at} {rows}"
    " ON CONFLICT (member_id, source, dedupe_key) DO NOTHING RETURNING id")
_NAMES = ("portal_id", "member_id", "source", "event_type", "dedupe_key", "payload",
          "unverified", "status", "order_key", "received_at")


def _render(placeholder: Callable[[str], str], verified: bool) -> str:
    """The INSERT in one paramstyle; ``verified``: only for the portal the token hash names."""
    fields = {name: placeholder(name) for name in _NAMES}
    rows = "WHERE TRUE"
    if verified:
        fields.update(portal_id="id", member_id="member_id", unverified="FALSE")
        rows = (f"FROM portals WHERE member_id = {placeholder('member_id')}"
                f" AND application_token_hash = {placeholder('token_hash')}")
    return _INSERT.format(rows=rows, **fields)


def _pyformat(name: str) -> str:
    return f"%({name})s"


def _named(name: str) -> str:
    return f":{name}"


_TYPED = (bindparam("payload", type_=JSON), bindparam("received_at", type_=DateTime(timezone=True)))
_SQL_INSERT = text(_render(_named, verified=False)).bindparams(
    *_TYPED, bindparam("unverified", type_=Boolean))
_SQL_VERIFIED = text(_render(_named, verified=True)).bindparams(*_TYPED)
_PG_INSERT = _render(_pyformat, verified=False)
_PG_VERIFIED = _render(_pyformat, verified=True)

_EXISTING = text("SELECT id FROM inbox_events"
                 " WHERE member_id = :member_id AND source = :source AND dedupe_key = :dedupe_key")

# PostgreSQL: a transaction lock per (portal, ordering key), taken in one order (so two
# requests naming the same keys cannot deadlock) and held until the rows commit.
_LOCK_KEYS = text(
    "SELECT pg_advisory_xact_lock(:portal_id, h) FROM (SELECT DISTINCT hashtext(k) AS h"
    " FROM unnest(CAST(:keys AS text[])) AS k ORDER BY h) AS ordered")


def _values(ev: NewEvent) -> dict[str, Any]:
    """An event's column values, for the INSERT statement."""
    return {"portal_id": ev.portal_id, "member_id": ev.member_id, "source": ev.source,
            "event_type": ev.event_type[:64], "dedupe_key": ev.dedupe_key,
            "payload": ev.payload, "unverified": ev.unverified, "status": ev.status,
            "order_key": ev.order_key, "received_at": utcnow()}


def _keys_to_lock(events: list[NewEvent]) -> dict[int, list[str]]:
    """portal id -> the ordering keys the events name (PostgreSQL only; see the docstring)."""
    if db.engine.dialect.name != "postgresql":
        return {}
    keys: dict[int, set[str]] = {}
    for ev in events:
        if ev.order_key is not None and ev.portal_id is not None:
            keys.setdefault(ev.portal_id, set()).add(ev.order_key)
    return {portal_id: sorted(found) for portal_id, found in sorted(keys.items())}


@contextmanager
def _transaction(single: bool) -> Iterator[Connection]:
    """A transaction for several statements; one statement alone runs in autocommit.

    One INSERT in autocommit is just as atomic and durable, and saves the BEGIN and
    COMMIT round trips on the hot path (one event per request).
    """
    if not single:
        with db.engine.begin() as conn:
            yield conn
        return
    with db.engine.connect() as conn:
        yield conn.execution_options(isolation_level="AUTOCOMMIT")


def _insert(events: list[NewEvent]) -> list[Stored]:
    out: list[Stored] = []
    locks = _keys_to_lock(events)
    with _transaction(single=len(events) == 1 and not locks) as conn:  # committed before queued
        for portal_id, keys in locks.items():
            conn.execute(_LOCK_KEYS, {"portal_id": portal_id, "keys": keys})
        for ev in events:
            values = _values(ev)
            row_id = conn.execute(_SQL_INSERT, values).scalar()
            out.append(Stored(row_id, True) if row_id is not None else
                       Stored(conn.execute(_EXISTING, values).scalar_one(), False))
    return out


def _pg_insert(sql: str, values: dict[str, Any]) -> list[tuple[Any, ...]] | None:
    """One INSERT … RETURNING on PostgreSQL, on a pooled connection's psycopg directly.

    The INSERT is the whole cost of intake beyond HTTP, and SQLAlchemy's execution layer was
    half of it (0.26 vs 0.13 ms of CPU per event, bench/README): here it runs as a prepared
    statement in autocommit on the pool's own connection (``values["payload"]`` goes as
    JSON). Returns the rows, or None on any driver error: the caller then takes the general
    SQLAlchemy path, which on a dead connection invalidates the pool and retries.
    """
    import psycopg
    from psycopg.types.json import Json

    values = {**values, "payload": Json(values["payload"])}
    try:
        raw = db.engine.raw_connection()  # a failed connect raises psycopg's own error here
    except psycopg.Error as exc:
        log.info("inbox fast insert: no connection, taking the general path: %s", exc)
        return None
    try:
        conn = raw.driver_connection
        if conn is None:  # only a connection already closed has none; not one checked out now
            return None
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql, values, prepare=True)
                rows = cur.fetchall()
            conn.autocommit = False
        except psycopg.Error as exc:
            try:  # autocommit: a failed statement leaves no transaction open
                if conn.closed or conn.broken:
                    raw.invalidate(exc)
                else:
                    conn.autocommit = False
            except psycopg.Error:
                raw.invalidate(exc)
            log.info("inbox fast insert failed, taking the general path: %s", exc)
            return None
        except BaseException:
            raw.invalidate()  # never hand a connection back to the pool in autocommit
            raise
    finally:
        raw.close()  # back to the pool (or away, if invalidated)
    return rows


def _on_psycopg() -> bool:
    return db.engine.dialect.driver == "psycopg"


def store_verified(ev: NewEvent, token_hash: str) -> Stored | None:
    """Store a Bitrix24 event if its portal's stored token hash is ``token_hash``.

    None when nothing was stored: the token does not match (or the stored hash is not a
    current one yet), the event is a duplicate, or PostgreSQL's fast path failed. The
    caller then takes the checked path, which tells these apart; a database that is down
    raises there. The event has no ordering key (Bitrix24 events have none).
    """
    values = {**_values(ev), "token_hash": token_hash}
    if _on_psycopg():
        rows = _pg_insert(_PG_VERIFIED, values)
        row_id = rows[0][0] if rows else None
    else:
        row_id = retry_if_connection_died(lambda: _autocommit_scalar(_SQL_VERIFIED, values))
    if row_id is None:
        return None
    metrics.STORED.labels(ev.source, ev.event_type).inc()
    return Stored(row_id, True)


def _autocommit_scalar(statement: Any, values: dict[str, Any]) -> Any:
    with _transaction(single=True) as conn:
        return conn.execute(statement, values).scalar()


def store(events: list[NewEvent]) -> list[Stored]:
    """Write the events in one transaction; a duplicate returns the existing row's id."""
    fast = None
    if len(events) == 1 and events[0].order_key is None and _on_psycopg():
        rows = _pg_insert(_PG_INSERT, _values(events[0]))
        fast = Stored(rows[0][0], True) if rows else None
    # The insert is idempotent by dedupe_key, so a retry on a fresh connection is safe.
    out = [fast] if fast is not None else retry_if_connection_died(lambda: _insert(events))
    for ev, stored in zip(events, out, strict=True):
        if stored.created:
            metrics.STORED.labels(ev.source, ev.event_type).inc()
        else:
            metrics.DUPLICATES.labels(ev.source).inc()
    return out
