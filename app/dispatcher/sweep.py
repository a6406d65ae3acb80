"""The sweep: the periodic backstop that finds every portal with work (a worker job).

Nudges are hints; the sweep is what guarantees progress. With one query it finds the
portals that have due queued commands (retries whose ``not_before`` passed, portals
whose held status cleared, portals whose owner died) or expired leases. It recovers the
expired leases (queued again when the method is safe to repeat, else dead as an unknown
outcome: the worker stopped while the batch was in flight, so it may have run), nudges
the portals, and enqueues on_done notifications a stopped worker never sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import dramatiq
from sqlalchemy import and_, or_, select, update
from sqlalchemy.engine import Connection

from app import queue
from app.dispatcher import nudge, policy
from app.dispatcher.models import CommandStatus, OutboxCommand
from app.dispatcher.outcomes import UNKNOWN_OUTCOME
from app.extensions import db, redis_ext
from app.tenants.models import Portal, utcnow
from app.tenants.status import HELD

log = logging.getLogger(__name__)
T = OutboxCommand.__table__
STOPPED_IN_FLIGHT = f"{UNKNOWN_OUTCOME}: the worker stopped while it was in flight"
NOTIFY_GRACE = timedelta(seconds=30)  # an engine enqueues on_done itself right after the write
QUEUED, INFLIGHT = CommandStatus.QUEUED.value, CommandStatus.INFLIGHT.value


@dataclass
class Swept:
    """What one sweep did."""

    nudged: list[int] = field(default_factory=list)
    requeued: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    notified: list[int] = field(default_factory=list)


def sweep(now: datetime | None = None) -> Swept:
    """Recover expired leases, nudge portals with due work, resend missed on_done."""
    now = now or utcnow()
    out = Swept()
    with db.engine.begin() as conn:
        portals = _portals_with_work(conn, now)
        expired = [pid for pid, status, _ in portals if status == INFLIGHT]
        if expired:
            _recover(conn, expired, now, out)
    out.nudged = sorted({pid for pid, _, held in portals if not held})
    nudge.publish(redis_ext.client, out.nudged)
    out.notified = resend_on_done(now)
    if out.requeued or out.dead:
        log.warning("outbox sweep: %d command(s) queued again, %d dead after a stopped worker",
                    len(out.requeued), len(out.dead))
    return out


def _portals_with_work(conn: Connection, now: datetime) -> list[tuple[int, str, bool]]:
    """(portal id, command status, portal held): due queued commands of callable portals,
    and expired leases of any portal."""
    held = [s.value for s in HELD]
    due = and_(T.c.status == QUEUED, or_(T.c.not_before.is_(None), T.c.not_before <= now),
               Portal.status.not_in(held))
    expired = and_(T.c.status == INFLIGHT, T.c.lease_until < now)
    query = (select(T.c.portal_id, T.c.status, Portal.status.label("portal_status"))
             .join(Portal, Portal.id == T.c.portal_id).where(or_(due, expired)).distinct())
    return [(r.portal_id, r.status, r.portal_status in held) for r in conn.execute(query)]


def _recover(conn: Connection, portal_ids: list[int], now: datetime, out: Swept) -> None:
    rows = conn.execute(select(T.c.id, T.c.method).where(
        T.c.portal_id.in_(portal_ids), T.c.status == INFLIGHT, T.c.lease_until < now)).all()
    safe = [r.id for r in rows if policy.safe_to_repeat(r.method)]
    unsafe = [r.id for r in rows if not policy.safe_to_repeat(r.method)]
    stale = and_(T.c.status == INFLIGHT, T.c.lease_until < now)
    if safe:
        conn.execute(update(T).where(T.c.id.in_(safe), stale).values(
            status=QUEUED, lease_until=None, lease_owner=None, not_before=None))
    if unsafe:
        conn.execute(update(T).where(T.c.id.in_(unsafe), stale).values(
            status=CommandStatus.DEAD.value, lease_until=None, dead_reason=STOPPED_IN_FLIGHT,
            completed_at=now))
    out.requeued, out.dead = safe, unsafe


def resend_on_done(now: datetime) -> list[int]:
    """Enqueue on_done for done commands whose notification was never sent."""
    query = (select(T.c.id, T.c.on_done)
             .where(T.c.on_done_sent.is_(False), T.c.status == CommandStatus.DONE.value,
                    T.c.completed_at < now - NOTIFY_GRACE).limit(1000))
    rows = db.session.execute(query).all()
    for row in rows:
        send_on_done(row.on_done, row.id)
    if rows:
        db.session.execute(update(T).where(T.c.id.in_([r.id for r in rows]))
                           .values(on_done_sent=True))
        db.session.commit()
    return [r.id for r in rows]


def send_on_done(actor_name: str, command_id: int) -> None:
    """Send ``command_id`` to the actor named ``actor_name`` (declared here, or by name)."""
    try:
        dramatiq.get_broker().get_actor(actor_name).send(command_id)
    except dramatiq.errors.ActorNotFound:
        queue.enqueue(actor_name, command_id)
