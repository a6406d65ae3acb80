"""Portal look-ups and chain upkeep that send no REST (names are a contract).

``get_portal``, ``refresh_now``, ``idle_portals``, ``refresh_idle_portals``,
``store_new_chain``, ``set_status`` and ``PortalUnavailable``. Calls to a portal go
through the dispatcher: queued (``app.dispatcher.submit``) or, when a person waits,
direct (``app.dispatcher.direct``).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from flask import current_app
from sqlalchemy import func, or_, select

from app.bitrix import errors
from app.extensions import db
from app.tenants import status as portal_status
from app.tenants import tokens
from app.tenants.models import Portal, PortalStatus, utcnow
from app.tenants.status import PortalUnavailable, set_status
from app.tenants.tokens import Credentials, store_new_chain

__all__ = ["PortalUnavailable", "get_portal", "idle_portals", "refresh_idle_portals",
           "refresh_now", "set_status", "store_new_chain"]

log = logging.getLogger(__name__)


def get_portal(member_id: str) -> Portal | None:
    """The portal installed under ``member_id``, or None."""
    return Portal.by_member_id(member_id)


def refresh_now(portal: Portal) -> Credentials:
    """Refresh the portal's chain now through the single-flight path (CLI, idle job)."""
    portal_status.ensure_callable(portal)
    fresh = tokens.refresh(portal, Credentials.of(portal).token_version)
    portal_status.ensure_callable(portal)
    return fresh


def idle_portals(days: int | None = None) -> list[Portal]:
    """Active portals with neither a refresh nor activity in the last ``days`` days."""
    if days is None:
        days = int(current_app.config["IDLE_REFRESH_DAYS"])
    cutoff = utcnow() - timedelta(days=days)
    renewed = func.coalesce(Portal.last_refresh_at, Portal.installed_at, Portal.created_at)
    query = select(Portal).where(
        Portal.status == PortalStatus.ACTIVE.value, Portal.refresh_token.is_not(None),
        renewed < cutoff,
        or_(Portal.last_activity_at.is_(None), Portal.last_activity_at < cutoff),
    ).order_by(renewed)
    return list(db.session.scalars(query))


def refresh_idle_portals(days: int | None = None, limit: int = 500) -> list[str]:
    """Keep idle chains alive (a refresh token dies after 180 days unused); returns member_ids."""
    done: list[str] = []
    for portal in idle_portals(days)[:limit]:
        try:
            refresh_now(portal)
        except (errors.BitrixError, PortalUnavailable) as exc:
            log.warning("idle refresh of %s failed: %s", portal.member_id, exc)
            continue
        done.append(portal.member_id)
    return done
