"""Telephony test helpers: PBX events for one call, the portal's extension map."""

from __future__ import annotations

from typing import Any

from app.extensions import db
from app.tenants.models import Portal
from app.tenants.users import PortalUser

AT = "2026-11-22T16:40:{:02d}+03:00"


def pbx(call_id: str, kind: str, second: int, **fields: Any) -> dict[str, Any]:
    """One PBX call event as PBX_EVENTS.md describes it."""
    return {"call_id": call_id, "event": kind, "at": AT.format(second), **fields}


def map_extensions(portal: Portal, extensions: dict[str, int]) -> None:
    """The portal's users with these inner numbers, as the user sync stores them."""
    db.session.add_all(PortalUser(portal_id=portal.id, user_id=user, name=f"User {user}",
                                  extension=ext, active=True)
                       for ext, user in extensions.items())
    db.session.commit()
