"""Install actors: re-run a portal's idempotent setup, keep the extension map current.

Both only submit commands (app.tenants.upkeep); the dispatcher sends them and the
follow-ups (workers/followups.py) finish the work, so no worker thread waits on Bitrix24.
"""

from __future__ import annotations

import dramatiq

from app.extensions import db
from app.tenants import install, upkeep
from app.tenants.models import Portal, PortalStatus
from workers.scheduler import periodic

USER_SYNC_SECONDS = 6 * 3600


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


@dramatiq.actor(queue_name="default", max_retries=3, min_backoff=5_000, max_backoff=60_000)
def sync_portal_users(portal_id: int) -> None:
    """Read one portal's users and their extensions again."""
    portal = _active(portal_id)
    if portal is not None:
        upkeep.submit_user_sync(portal)
        db.session.commit()


@periodic(USER_SYNC_SECONDS)
@dramatiq.actor(queue_name="default", max_retries=0)
def sync_users_of_busy_portals() -> None:
    """Bitrix24 sends no user-update event: re-read extensions where the token is live anyway.

    Portals whose access token has expired are skipped, so this job never causes
    a token refresh (refreshing on a timer is what Bitrix24 warns against).
    """
    for portal_id in install.portals_with_live_tokens():
        sync_portal_users.send(portal_id)
