"""The sweep: the periodic backstop that finds every portal with work (a worker job).

Nudges are hints; the sweep is what guarantees progress. With one query it finds the
portals that have due queued commands (retries whose ``not_before`` passed, portals
whose held status cleared, portals whose owner died) or expired leases. It recovers the
expired leases (queued again when ``policy.resend_refusal`` allows the command, else dead
as an unknown outcome, with why: the worker stopped while the batch was in flight, so it
may have run), nudges
the portals, and enqueues the settling of outcomes nobody settled: a stopped engine never
sent it, or its settle message ran out of retries (a handler that kept failing).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from flask import current_app
from sqlalchemy import and_, or_, select, update
from sqlalchemy.engine import Connection

from app.dispatcher import nudge, policy, results
from app.dispatcher.models import CommandStatus, OutboxCommand
from app.dispatcher.outcomes import unknown_reason
from app.extensions import db, redis_ext
from app.tenants.models import Portal, aware, utcnow
from app.tenants.status import HELD

log = logging.getLogger(__name__)
T = OutboxCommand.__table__
STOPPED = "the worker stopped while it was in flight"
NOTIFY_GRACE = timedelta(seconds=30)  # an engine enqueues settling itself right after the write
# A settle sent this long ago and still not done is sent again: its message ran out of
# retries (about 15 minutes of backoff) or was lost with its broker.
RESEND_AFTER = timedelta(minutes=30)
QUEUED, INFLIGHT = CommandStatus.QUEUED.value, CommandStatus.INFLIGHT.value


@dataclass
class Swept:
    """What one sweep did."""

    nudged: list[int] = field(default_factory=list)
    requeued: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    notified: list[int] = field(default_factory=list)  # settles (re)sent
    unknown_handled: list[int] = field(default_factory=list)  # recovered, with a handler


def sweep(now: datetime | None = None) -> Swept:
    """Recover expired leases, nudge portals with due work, resend missed settles."""
    now = now or utcnow()
    out = Swept()
    with db.engine.begin() as conn:
        portals = _portals_with_work(conn, now)
        expired = [pid for pid, status, _ in portals if status == INFLIGHT]
        if expired:
            _recover(conn, expired, now, out)
    out.nudged = sorted({pid for pid, _, held in portals if not held})
    nudge.publish(redis_ext.client, out.nudged)
    results.send_settle(out.unknown_handled)  # their outcome is known to be unknown now
    out.notified = out.unknown_handled + resend_settle(now)
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
    rows = conn.execute(select(T.c.id, T.c.method, T.c.params, T.c.first_sent_at,
                               T.c.handler).where(
        T.c.portal_id.in_(portal_ids), T.c.status == INFLIGHT, T.c.lease_until < now)).all()
    limits = policy.ResendLimits.from_config(current_app.config)
    refused = {r.id: why for r in rows
               if (why := policy.resend_refusal(r.method, r.params or {}, now, limits,
                                                aware(r.first_sent_at)))}
    safe = [r.id for r in rows if r.id not in refused]
    unsafe = sorted(refused)
    stale = and_(T.c.status == INFLIGHT, T.c.lease_until < now)
    if safe:
        conn.execute(update(T).where(T.c.id.in_(safe), stale).values(
            status=QUEUED, lease_until=None, lease_owner=None, not_before=None))
    for why in set(refused.values()):  # one statement per reason
        ids = [i for i, reason in refused.items() if reason == why]
        conn.execute(update(T).where(T.c.id.in_(ids), stale).values(
            status=CommandStatus.DEAD.value, lease_until=None,
            dead_reason=unknown_reason(STOPPED, why),
            outcome=results.OutcomeKind.UNKNOWN.value, completed_at=now))
    out.requeued, out.dead = safe, unsafe
    out.unknown_handled = [r.id for r in rows if r.id in set(unsafe) and r.handler]


def resend_settle(now: datetime) -> list[int]:
    """Enqueue settling for finished commands whose outcome nobody settled: never sent (the
    engine stopped first) or sent long ago."""
    never = and_(T.c.settle_sent_at.is_(None), T.c.completed_at < now - NOTIFY_GRACE)
    query = (select(T.c.id)
             .where(T.c.settled.is_(False), T.c.status.in_(results.FINISHED),
                    or_(never, T.c.settle_sent_at < now - RESEND_AFTER)).limit(1000))
    ids = list(db.session.scalars(query))
    results.send_settle(ids)
    return ids
