"""Install actors: re-run a portal's idempotent setup (after its settings changed)."""

from __future__ import annotations

import dramatiq

from app.extensions import db
from app.tenants import install
from app.tenants.models import Portal, PortalStatus


@dramatiq.actor(queue_name="default", max_retries=5, min_backoff=2_000, max_backoff=60_000)
def setup_portal(portal_id: int) -> None:
    """Bind whatever is missing on the portal (lines added on the settings page, ...)."""
    portal = db.session.get(Portal, portal_id)
    if portal is None or portal.status != PortalStatus.ACTIVE.value:
        return
    install.setup_portal(portal)
