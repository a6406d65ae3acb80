"""Today's calls of one portal, summed up for its dashboard (placements/dashboard).

Every query is scoped by the portal and bounded to the UTC day: calls by
``ix_calls_portal_started_at``, incomplete ones by ``ix_calls_state_created_at``, and the
card latency from at most :data:`LATENCY_SAMPLE` of the day's newest registered calls: the
time from the call's first event reaching us to its register being done (the card shows
then), read through the dispatcher's public ``command_times``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from app.dispatcher import stats
from app.extensions import db
from app.telephony import routing
from app.telephony.machine import State
from app.telephony.models import Call, Originate
from app.tenants.models import aware, utcnow

LATENCY_SAMPLE = 2000


def day_start(now: datetime | None = None) -> datetime:
    """Midnight UTC of ``now``'s day."""
    now = now or utcnow()
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def today(portal_id: int, now: datetime | None = None) -> dict[str, Any]:
    """The portal's calls today: count, states, end statuses, card latency, click-to-call
    outcomes, routing hit rate, incomplete and colliding calls."""
    since = day_start(now)
    asked, routed = routing.hit_rate(portal_id, since.strftime("%Y%m%d"))
    return {"since": since.isoformat(), **_calls(portal_id, since),
            "card_latency": _latency(portal_id, since),
            "click_to_call": _originates(portal_id, since),
            "routing": {"asked": asked, "routed": routed,
                        "rate": round(routed / asked, 3) if asked else None},
            "incomplete": _incomplete(portal_id, since)}


def _calls(portal_id: int, since: datetime) -> dict[str, Any]:
    c = Call
    rows = db.session.execute(
        select(c.state, c.end_status, c.collision, func.count())
        .where(c.portal_id == portal_id, c.started_at >= since)
        .group_by(c.state, c.end_status, c.collision)).all()
    states: dict[str, int] = {}
    ended: dict[str, int] = {}
    total = collisions = 0
    for state, end_status, collision, count in rows:
        total += count
        states[state] = states.get(state, 0) + count
        if end_status:
            ended[end_status] = ended.get(end_status, 0) + count
        if collision:
            collisions += count
    return {"total": total, "states": states, "end_status": ended, "collisions": collisions}


def _incomplete(portal_id: int, since: datetime) -> int:
    """Calls whose events wait for a start that never came (heard of today)."""
    return int(db.session.scalar(
        select(func.count()).select_from(Call).where(
            Call.state == State.INCOMPLETE.value, Call.created_at >= since,
            Call.portal_id == portal_id)) or 0)


def _originates(portal_id: int, since: datetime) -> dict[str, int]:
    o = Originate
    rows = db.session.execute(
        select(o.state, func.count()).where(o.portal_id == portal_id, o.kind == "click",
                                            o.created_at >= since)
        .group_by(o.state)).all()
    return {state: count for state, count in rows}


def _latency(portal_id: int, since: datetime) -> dict[str, Any]:
    c = Call
    calls = db.session.execute(
        select(c.register_command_id, c.created_at)
        .where(c.portal_id == portal_id, c.started_at >= since,
               c.register_command_id.is_not(None), c.replay.is_(None))
        .order_by(c.started_at.desc()).limit(LATENCY_SAMPLE)).all()
    times = stats.command_times(portal_id, [r.register_command_id for r in calls])
    waits = []
    for command_id, heard in calls:
        done = times.get(command_id) if command_id is not None else None
        if done is not None and heard is not None:
            waits.append(max(0.0, (done - aware(heard)).total_seconds()))
    return {"p50": quantile(waits, 0.5), "p99": quantile(waits, 0.99), "calls": len(waits)}


def quantile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``values``, or None without any."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 3)

