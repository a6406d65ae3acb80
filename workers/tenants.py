"""Tenant upkeep actors."""

from __future__ import annotations

import logging

import dramatiq

from app.tenants import service
from workers.scheduler import periodic

log = logging.getLogger(__name__)


@periodic(3600)
@dramatiq.actor(queue_name="default", max_retries=0)
def refresh_idle_portals() -> None:
    """Refresh chains of portals quiet for IDLE_REFRESH_DAYS, so they outlive 180 days unused."""
    done = service.refresh_idle_portals()
    if done:
        log.info("idle refresh: %d portal(s): %s", len(done), ", ".join(done))
