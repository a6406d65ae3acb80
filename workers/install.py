"""Install actors: re-run a portal's idempotent setup, keep the extension map current, and run
a portal's self-diagnosis.

The first two only submit commands (app.installation.upkeep); the dispatcher sends them and the
outcome handlers (app.installation.upkeep) finish the work, so no worker thread waits on
Bitrix24. The diagnosis is one read-only round a person will look at (after an install, after a
settings save), sent on the direct path: it holds its thread for one round trip, at most once
per DIAGNOSIS_MIN_INTERVAL per portal.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

import dramatiq

from app.extensions import db
from app.installation import diagnosis, upkeep
from app.installation.user_sync import portals_with_live_tokens
from app.tenants.models import Portal, PortalStatus, aware, utcnow
from workers.scheduler import periodic

USER_SYNC_SECONDS = 6 * 3600
LIVE_MARGIN = timedelta(seconds=120)  # as user_sync.portals_with_live_tokens


def _active(portal_id: int) -> Portal | None:
    portal = db.session.get(Portal, portal_id)
    if portal is None or portal.status != PortalStatus.ACTIVE.value:
        return None
    return portal


@dramatiq.actor(queue_name="default", max_retries=5, min_backoff=2_000, max_backoff=60_000)
def setup_portal(portal_id: int) -> None:
    """Bind whatever is missing on the portal (lines added on the settings page, ...)."""
    portal = _active(portal_id)
    if portal is not None:
        upkeep.submit_setup(portal)
        db.session.commit()


@dramatiq.actor(queue_name="default", max_retries=0)
def diagnose_portal(portal_id: int, trigger: str = "settings", trailing: bool = False) -> None:
    """Run the portal's self-diagnosis and keep its report. Inside DIAGNOSIS_MIN_INTERVAL of the
    last run, one trailing run is scheduled for the interval's end instead (requests meanwhile
    join it), so a settings page saved repeatedly costs the portal one round a minute and the
    last report still follows the last save. Not retried: the next change asks again."""
    wait = diagnosis.admit(portal_id, trailing)
    if wait is None:
        return
    if wait > 0:
        diagnose_portal.send_with_options(args=(portal_id, trigger, True),
                                          delay=int(wait * 1000) + 100)
        return
    diagnosis.run(portal_id, trigger)


@dramatiq.actor(queue_name="default", max_retries=3, min_backoff=5_000, max_backoff=60_000)
def sync_portal_users(portal_id: int, live_only: bool = False) -> None:
    """Read one portal's users and their extensions again (``live_only``: unless its access
    token has expired meanwhile, so a scheduled sync never causes a refresh)."""
    portal = _active(portal_id)
    if portal is None or (live_only and not _token_live(portal)):
        return
    upkeep.submit_user_sync(portal)
    db.session.commit()


def _token_live(portal: Portal) -> bool:
    expires = aware(portal.expires_at)
    return expires is not None and expires > utcnow() + LIVE_MARGIN


def sync_delay_ms(portal_id: int, interval_seconds: float = USER_SYNC_SECONDS) -> int:
    """The portal's fixed place in the sync interval, in ms: a hash of its id spreads the
    portals evenly over the interval, and each keeps its place from one interval to the next
    (so its syncs stay one interval apart)."""
    digest = hashlib.blake2b(str(portal_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % max(1, int(interval_seconds * 1000))


@periodic(USER_SYNC_SECONDS)
@dramatiq.actor(queue_name="default", max_retries=0)
def sync_users_of_busy_portals() -> None:
    """Bitrix24 sends no user-update event: re-read extensions where the token is live anyway.

    Each portal is enqueued once per interval, delayed to its own place in the interval
    (``sync_delay_ms``): 1,000 live portals make a flat load, not 1,000 syncs at the tick (or
    at a worker's boot). Portals whose access token has expired, now or by their turn, are
    skipped, so this job never causes a token refresh (refreshing on a timer is what
    Bitrix24 warns against).
    """
    for portal_id in portals_with_live_tokens():
        sync_portal_users.send_with_options(args=(portal_id,), kwargs={"live_only": True},
                                            delay=sync_delay_ms(portal_id))
