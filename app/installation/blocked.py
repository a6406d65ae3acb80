"""The way back from ``blocked`` (OVERLOAD_LIMIT, Bitrix24 support's manual REST block).

Bitrix24 does not say when support lifts a block, and a human may never tell the app. So a
blocked portal is probed: every ``OVERLOAD_PROBE_MINUTES`` (15) after it was (last found)
blocked, one ``app.info`` goes to the portal with its stored chain, through the portal's
shared rate bucket, as any direct call. If it answers, the portal is active again and its
held commands and events go on; if it says OVERLOAD_LIMIT, the portal stays blocked until
the next probe. That is at most four requests an hour to a blocked portal, and a block
that is lifted costs at most one interval of delay, with nobody watching.

A probe must be able to refresh an expired token (a block lasts days; the token an hour),
and a held portal's chain is never refreshed. So for the probe's one call the portal is
made ``active``, while the probe holds the portal's dispatcher lease (the Redis key an
engine takes before it drives a portal): no engine sends the queued backlog meanwhile,
and a still-blocked portal gets one request, not a round of batches. The probe gives the
lease back after the answer; with the portal active again, the engines take it over.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from flask import current_app
from sqlalchemy import select

from app.bitrix import errors
from app.dispatcher import direct, lease, nudge
from app.extensions import db, redis_ext
from app.tenants import status as portal_status
from app.tenants.models import Portal, PortalStatus, utcnow

log = logging.getLogger(__name__)
PROBE_METHOD = "app.info"
LEASE_SECONDS = 120  # above any one call's worst case (a refresh, then a 65 s request)

# Outcomes of a probe.
LIFTED = "lifted"        # the portal answered: active again
STILL_BLOCKED = "blocked"
MOVED = "moved"          # the answer moved it elsewhere (e.g. payment_required, uninstalled)
NO_ANSWER = "no_answer"  # transport error, 5xx, rate limit: blocked, probed again later
SKIPPED = "skipped"      # not blocked any more, or an engine holds its lease right now


def probe_interval() -> timedelta | None:
    """How long a blocked portal waits between probes (None: never probed)."""
    minutes = float(current_app.config["OVERLOAD_PROBE_MINUTES"])
    return timedelta(minutes=minutes) if minutes > 0 else None


def due_for_probe(limit: int = 100) -> list[int]:
    """Blocked portals whose last block (or probe) is older than the probe interval."""
    every = probe_interval()
    if every is None:
        return []
    query = (select(Portal.id).where(Portal.status == PortalStatus.BLOCKED.value,
                                     Portal.status_changed_at < utcnow() - every)
             .order_by(Portal.status_changed_at).limit(limit))
    return list(db.session.scalars(query))


def probe(portal: Portal) -> str:
    """One ``app.info`` to a blocked portal; resume it when it answers. Returns the outcome."""
    if portal.status != PortalStatus.BLOCKED.value:
        return SKIPPED
    me = f"probe:{uuid.uuid4().hex[:12]}"
    if not lease.take(redis_ext.client, portal.id, me, LEASE_SECONDS):
        return SKIPPED  # an engine is still settling the batch that met the block
    try:
        outcome = _probe_leased(portal)
    finally:
        lease.give_back(redis_ext.client, portal.id, me)
    if outcome == LIFTED:
        nudge.publish(redis_ext.client, [portal.id])  # the engines resume it now
    log.log(logging.WARNING if outcome == LIFTED else logging.INFO,
            "portal %s: REST block probe: %s", portal.member_id, outcome)
    return outcome


def _probe_leased(portal: Portal) -> str:
    reason = portal.status_reason
    if not portal_status.swap(portal, PortalStatus.BLOCKED, PortalStatus.ACTIVE, None):
        return SKIPPED
    try:
        direct.call_method(portal, PROBE_METHOD)
    except portal_status.PortalUnavailable as exc:  # the answer moved it (again)
        return STILL_BLOCKED if exc.status == PortalStatus.BLOCKED.value else MOVED
    except errors.BitrixError as exc:
        log.info("portal %s: REST block probe got no answer: %s", portal.member_id, exc)
        portal_status.swap(portal, PortalStatus.ACTIVE, PortalStatus.BLOCKED, reason)
        return NO_ANSWER
    except BaseException:
        portal_status.swap(portal, PortalStatus.ACTIVE, PortalStatus.BLOCKED, reason)
        raise
    return LIFTED
