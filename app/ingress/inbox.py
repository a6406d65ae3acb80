"""The inbox: store an event once, hand it to the broker, find rows that got stuck.

Intake commits the row *before* it enqueues, so a message never points at a row a
worker cannot see, and an event the broker never got is still in the table: the
sweeper queues it again. A row is stored as ``queued`` (intake is about to send
it), and put back to ``received`` if the broker could not take it. Enqueueing uses
a Redis client with short timeouts and no retries, and stops trying for a moment
after a failure, so a Redis outage costs the request at most one short timeout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from flask import current_app
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import JSON, Boolean, DateTime, bindparam, func, or_, select, text, update
from sqlalchemy.engine import Connection

from app import queue
from app.extensions import db, retry_if_connection_died
from app.ingress import metrics
from app.ingress.models import PARKED, PENDING, InboxEvent, InboxStatus
from app.tenants.models import Portal, aware, utcnow
from app.tenants.status import HELD

log = logging.getLogger(__name__)

ACTOR = "process_inbox_event"
ACTOR_GROUP = "process_inbox_events"  # rows queued together, split by the worker
QUEUE = "events"
ENQUEUE_TIMEOUT_SECONDS = 0.25
REDIS_BACKOFF_SECONDS = 1.0


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


@dataclass(frozen=True)
class Stored:
    """An inbox row id, and whether this delivery created it."""

    id: int
    created: bool


def digest(value: Any) -> str:
    """SHA-256 of a canonical JSON rendering (the dedupe key)."""
    raw = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()


def b24_dedupe_key(event: dict[str, Any]) -> str:
    """What makes two Bitrix24 deliveries the same event (not the per-user auth block)."""
    return digest([event.get("event"), event.get("event_handler_id"), event.get("ts"),
                   event.get("data")])


# One prepared statement, valid on PostgreSQL and SQLite (3.35+): the hot path skips the
# ORM and statement compilation; a duplicate (same dedupe key) inserts nothing.
_INSERT = text(
    "INSERT INTO inbox_events (portal_id, member_id, source, event_type, dedupe_key, payload,"
    " unverified, status, attempts, received_at)"
    " VALUES (:portal_id, :member_id, :source, :event_type, :dedupe_key, :payload,"
    " :unverified, :status, 0, :received_at)"
    " ON CONFLICT (member_id, source, dedupe_key) DO NOTHING RETURNING id"
).bindparams(bindparam("payload", type_=JSON), bindparam("unverified", type_=Boolean),
             bindparam("received_at", type_=DateTime(timezone=True)))


_EXISTING = text("SELECT id FROM inbox_events"
                 " WHERE member_id = :member_id AND source = :source AND dedupe_key = :dedupe_key")


@contextmanager
def _transaction(single: bool) -> Iterator[Connection]:
    """A transaction for several rows; one statement alone runs in autocommit.

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
    with _transaction(single=len(events) == 1) as conn:  # committed before anything is queued
        for ev in events:
            values = _values(ev)
            row_id = conn.execute(_INSERT, values).scalar()
            out.append(Stored(row_id, True) if row_id is not None else
                       Stored(conn.execute(_EXISTING, values).scalar_one(), False))
    return out


# The same INSERT for psycopg itself (PostgreSQL's hot path, see _pg_insert).
_PG_INSERT = (
    "INSERT INTO inbox_events (portal_id, member_id, source, event_type, dedupe_key, payload,"
    " unverified, status, attempts, received_at)"
    " VALUES (%(portal_id)s, %(member_id)s, %(source)s, %(event_type)s, %(dedupe_key)s,"
    " %(payload)s, %(unverified)s, %(status)s, 0, %(received_at)s)"
    " ON CONFLICT (member_id, source, dedupe_key) DO NOTHING RETURNING id")

# A Bitrix24 event stored only if its portal's stored token hash is the event's: the check
# and the write are one statement against the committed portal row, so from the moment a
# change of the token commits, no process accepts the old one (no cache to keep right), and
# one portal or 10,000 cost the same index probe.
_VERIFIED = (
    "INSERT INTO inbox_events (portal_id, member_id, source, event_type, dedupe_key, payload,"
    " unverified, status, attempts, received_at)"
    " SELECT id, member_id, {source}, {event_type}, {dedupe_key}, {payload}, FALSE,"
    " {status}, 0, {received_at} FROM portals"
    " WHERE member_id = {member_id} AND application_token_hash = {token_hash}"
    " ON CONFLICT (member_id, source, dedupe_key) DO NOTHING RETURNING id")
_NAMES = ("source", "event_type", "dedupe_key", "payload", "status", "received_at",
          "member_id", "token_hash")
_PG_VERIFIED = _VERIFIED.format(**{n: f"%({n})s" for n in _NAMES})
_SQL_VERIFIED = text(_VERIFIED.format(**{n: f":{n}" for n in _NAMES})).bindparams(
    bindparam("payload", type_=JSON), bindparam("received_at", type_=DateTime(timezone=True)))


def _values(ev: NewEvent) -> dict[str, Any]:
    """An event's column values, for the INSERT statements."""
    return {"portal_id": ev.portal_id, "member_id": ev.member_id, "source": ev.source,
            "event_type": ev.event_type[:64], "dedupe_key": ev.dedupe_key,
            "payload": ev.payload, "unverified": ev.unverified, "status": ev.status,
            "received_at": utcnow()}


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
    raises there.
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
    if len(events) == 1 and _on_psycopg():
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


def fast_redis(url: str) -> redis.Redis:
    """A Redis client for intake: it gives up after a short timeout, without retrying."""
    return redis.Redis.from_url(url, socket_timeout=ENQUEUE_TIMEOUT_SECONDS,
                                socket_connect_timeout=ENQUEUE_TIMEOUT_SECONDS,
                                retry=Retry(NoBackoff(), 0))


def _intake_broker() -> dramatiq.Broker:
    """A broker whose Redis client gives up fast (the shared one waits seconds)."""
    ext = current_app.extensions
    if "ingress_broker" not in ext:
        cfg = current_app.config
        url = cfg.get("BROKER_URL") or cfg["REDIS_URL"]
        if url.startswith(("amqp://", "amqps://")):
            ext["ingress_broker"] = queue.broker()
        else:
            client = fast_redis(url)
            # No middleware: enqueue hooks do nothing a message needs (retries, time and
            # age limits act in the worker, with the worker broker's own middleware).
            ext["ingress_broker"] = RedisBroker(
                client=client, namespace=cfg.get("DRAMATIQ_NAMESPACE", "b24relay"),
                middleware=[])
        ext["ingress_redis_down_until"] = 0.0
    return ext["ingress_broker"]


def _messages(row_ids: list[int], together: bool) -> list[tuple[list[int], dramatiq.Message]]:
    """One message per row; with ``together``, one for them all (the worker splits it into
    one per row, so claims and retries stay per row): one broker round trip for them all."""
    if together and len(row_ids) > 1:
        return [(row_ids, dramatiq.Message(queue_name=QUEUE, actor_name=ACTOR_GROUP,
                                           args=(row_ids,), kwargs={}, options={}))]
    return [([row_id], dramatiq.Message(queue_name=QUEUE, actor_name=ACTOR, args=(row_id,),
                                        kwargs={}, options={})) for row_id in row_ids]


def enqueue(row_ids: list[int], source: str, via: str = "intake",
            together: bool = False) -> list[int]:
    """Hand freshly stored rows to the broker; return the ids that made it.

    Rows are stored as ``queued`` (one commit on the happy path). A broker failure
    is not an error for the caller: the rows that missed the broker are put back
    to ``received``, and the sweeper queues them once the broker is back (it
    would find them as ``queued`` too, should even that update fail).
    """
    ext = current_app.extensions
    broker = _intake_broker()
    sent: list[int] = []
    if time.monotonic() >= ext["ingress_redis_down_until"]:
        try:
            for ids, message in _messages(row_ids, together):
                broker.enqueue(message)
                sent.extend(ids)
        except Exception as exc:  # noqa: BLE001 - any broker failure: the sweeper recovers
            ext["ingress_redis_down_until"] = time.monotonic() + REDIS_BACKOFF_SECONDS
            log.warning("broker unavailable, %d inbox rows left for the sweeper: %s",
                        len(row_ids) - len(sent), exc)
    if sent:
        metrics.QUEUED.labels(source, via).inc(len(sent))
    done = set(sent)
    missed = [row_id for row_id in row_ids if row_id not in done]
    if missed:
        mark_received(missed)
    return sent


def mark_received(row_ids: list[int]) -> None:
    """queued -> received for rows the broker never got (shown as such in the inbox depth)."""
    try:
        with db.engine.begin() as conn:
            conn.execute(update(InboxEvent)
                         .where(InboxEvent.id.in_(row_ids),
                                InboxEvent.status == InboxStatus.QUEUED.value)
                         .values(status=InboxStatus.RECEIVED.value))
    except Exception as exc:  # noqa: BLE001 - bookkeeping only; the sweeper finds queued rows too
        log.warning("could not mark %d unqueued rows as received: %s", len(row_ids), exc)


@dataclass(frozen=True)
class SweepPolicy:
    """How long a row may sit in each unfinished state before the sweeper queues it again.

    ``received`` rows are known to have missed the broker, so they go back soon;
    ``queued`` rows normally just wait their turn in the broker, so only a long
    silence means their message was lost; ``processing`` rows wait out the
    longest handler before their worker is presumed dead.

    A ``queued`` row's wait backs off: each requeue sets ``claimed_at``, and the
    next one waits at least as long as the row had already waited then
    (``claimed_at - received_at``), capped at ``queued_after_cap``. So while the
    broker has a long backlog (a slow Bitrix24), a row gets a few extra messages
    over its lifetime instead of one per ``queued_after``; a lost message is still
    replaced within the cap. Extra messages are harmless (the claim takes a row once).

    Parked rows go back without a delay once they can go on: ``unhandled`` (and
    legacy ``skipped``) rows whose (source, event_type) is in ``handled``, and
    ``held`` rows whose portal's status no longer holds its calls.
    """

    received_after: float = 10.0
    queued_after: float = 120.0
    queued_after_cap: float = 1800.0
    processing_after: float = 600.0
    handled: Mapping[str, Sequence[str]] = field(default_factory=dict)  # source -> event types


def _queued_wait(policy: SweepPolicy, received_at: datetime, claimed_at: datetime | None) -> float:
    """Seconds of silence after which a queued row is queued again (doubling, capped)."""
    waited = 0.0
    if claimed_at is not None:
        waited = (aware(claimed_at) - aware(received_at)).total_seconds()
    return min(policy.queued_after_cap, max(policy.queued_after, waited))


def _now_handled(policy: SweepPolicy) -> Any:
    """Parked-for-no-handler rows whose event type has a handler now (None if none do)."""
    per_source = [(InboxEvent.source == source)
                  & func.upper(InboxEvent.event_type).in_([t.upper() for t in types])
                  for source, types in policy.handled.items() if types]
    if not per_source:
        return None
    return (InboxEvent.status.in_([InboxStatus.UNHANDLED.value,
                                   InboxStatus.LEGACY_SKIPPED.value]) & or_(*per_source))


def stuck_rows(policy: SweepPolicy, limit: int = 1000,
               now: datetime | None = None) -> list[tuple[int, str]]:
    """(id, source) of the rows the policy says no worker will finish on its own."""
    now = now or utcnow()
    since = func.coalesce(InboxEvent.claimed_at, InboxEvent.received_at)

    def silent(status: str, seconds: float) -> Any:
        return (InboxEvent.status == status) & (since < now - timedelta(seconds=seconds))

    callable_portals = select(Portal.id).where(Portal.status.notin_([s.value for s in HELD]))
    stuck = (silent(InboxStatus.RECEIVED.value, policy.received_after)
             | silent(InboxStatus.QUEUED.value, policy.queued_after)
             | silent(InboxStatus.PROCESSING.value, policy.processing_after)
             | ((InboxEvent.status == InboxStatus.HELD.value)
                & InboxEvent.portal_id.in_(callable_portals)))
    handled = _now_handled(policy)
    if handled is not None:
        stuck = stuck | handled
    rows = db.session.execute(
        select(InboxEvent.id, InboxEvent.source, InboxEvent.status, InboxEvent.received_at,
               InboxEvent.claimed_at)
        .where(stuck).order_by(since, InboxEvent.id).limit(limit)).all()
    out = []
    for r in rows:
        if r.status == InboxStatus.QUEUED.value:
            silence = (now - aware(r.claimed_at or r.received_at)).total_seconds()
            if silence < _queued_wait(policy, r.received_at, r.claimed_at):
                continue  # requeued before: wait longer this time
        out.append((r.id, r.source))
    return out


def requeue_stuck(policy: SweepPolicy, limit: int = 1000) -> int:
    """Queue stuck and releasable parked rows again (abandoned claims go back to ``queued``)."""
    rows = stuck_rows(policy, limit)
    if not rows:
        return 0
    ids = [row_id for row_id, _ in rows]
    now = utcnow()
    db.session.execute(update(InboxEvent)
                       .where(InboxEvent.id.in_(ids),
                              InboxEvent.status == InboxStatus.PROCESSING.value)
                       .values(status=InboxStatus.QUEUED.value, claimed_at=now,
                               last_error="worker lost while processing; requeued"))
    db.session.execute(update(InboxEvent)
                       .where(InboxEvent.id.in_(ids),
                              InboxEvent.status.in_([*PENDING, *PARKED,
                                                     InboxStatus.LEGACY_SKIPPED.value]))
                       .values(status=InboxStatus.QUEUED.value, claimed_at=now))
    db.session.commit()
    for row_id, source in rows:
        queue.enqueue(ACTOR, row_id, queue_name=QUEUE)
        metrics.QUEUED.labels(source, "sweeper").inc()
    return len(rows)


def depth(portal_id: int | None = None) -> dict[str, int]:
    """Rows per unfinished status (parked ones too) and dead: the inbox-depth gauge, or one
    portal's share of it (its settings page). ``done`` rows are never counted: there are
    millions, and the status index finds the others without reading them."""
    wanted = [*PENDING, InboxStatus.PROCESSING.value, *PARKED, InboxStatus.DEAD.value]
    counts = dict.fromkeys(wanted, 0)
    query = (select(InboxEvent.status, func.count()).where(InboxEvent.status.in_(wanted))
             .group_by(InboxEvent.status))
    if portal_id is not None:
        query = query.where(InboxEvent.portal_id == portal_id)
    counts.update({status: n for status, n in db.session.execute(query).all()})
    return counts


@dataclass(frozen=True)
class DeadLetter:
    """A dead-lettered event as its portal's admin sees it: what, when, and why."""

    id: int
    source: str
    event_type: str
    received_at: datetime
    attempts: int
    reason: str


def dead_letters(portal_id: int | None = None, limit: int = 10) -> list[DeadLetter]:
    """The newest dead-lettered events, of one portal or of all (payloads stay out)."""
    query = (select(InboxEvent.id, InboxEvent.source, InboxEvent.event_type,
                    InboxEvent.received_at, InboxEvent.attempts, InboxEvent.last_error)
             .where(InboxEvent.status == InboxStatus.DEAD.value)
             .order_by(InboxEvent.received_at.desc(), InboxEvent.id.desc()).limit(limit))
    if portal_id is not None:
        query = query.where(InboxEvent.portal_id == portal_id)
    return [DeadLetter(r.id, r.source, r.event_type, aware(r.received_at), r.attempts,
                       r.last_error or "") for r in db.session.execute(query).all()]


def replay_dead(row_ids: Sequence[int] = (), portal_id: int | None = None) -> list[int]:
    """Give dead rows (these ids, or all of a portal's) a fresh set of attempts; queue them.

    For an operator who fixed what killed them. Only rows still ``dead`` are touched; the
    payload is as it was left, without the event's tokens, so handlers use the portal's own.
    """
    where = [InboxEvent.status == InboxStatus.DEAD.value]
    if row_ids:
        where.append(InboxEvent.id.in_(list(row_ids)))
    if portal_id is not None:
        where.append(InboxEvent.portal_id == portal_id)
    if len(where) == 1:
        raise ValueError("name the rows or the portal to replay")
    rows = db.session.execute(select(InboxEvent.id, InboxEvent.source).where(*where)).all()
    if not rows:
        return []
    ids = [r.id for r in rows]
    db.session.execute(update(InboxEvent)
                       .where(InboxEvent.id.in_(ids), InboxEvent.status == InboxStatus.DEAD.value)
                       .values(status=InboxStatus.QUEUED.value, attempts=0, claimed_at=utcnow(),
                               processed_at=None))
    db.session.commit()
    for source in sorted({r.source for r in rows}):
        enqueue([r.id for r in rows if r.source == source], source, via="replay")
    return ids
