"""The user sync: ``user.get`` records into the extension map (app.tenants.users.PortalUser).

Both executors of the setup read users (app/installation/setup.py directly at install,
app.installation.upkeep through the outbox); ONUSERADD and the periodic sync
(workers/install.py) keep the map current. These functions add rows and
never commit: the caller does.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from app.extensions import db
from app.tenants.models import Portal, PortalStatus, utcnow
from app.tenants.users import PortalUser, find_user


def _display_name(record: dict[str, Any]) -> str:
    parts = [str(record.get(k) or "").strip() for k in ("NAME", "LAST_NAME")]
    return " ".join(p for p in parts if p)[:255]


def _active(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().upper() in {"Y", "1", "TRUE"}


def upsert_user(portal: Portal, record: dict[str, Any], is_admin: bool | None = None) -> PortalUser:
    """Create or update one user from a ``user.get`` record (caller commits)."""
    user_id = int(record["ID"])
    return _apply(portal, find_user(portal, user_id), user_id, record, is_admin)


def _apply(portal: Portal, row: PortalUser | None, user_id: int, record: dict[str, Any],
           is_admin: bool | None = None) -> PortalUser:
    if row is None:
        row = PortalUser(portal_id=portal.id, user_id=user_id)
        db.session.add(row)
    row.name = _display_name(record)
    row.extension = (str(record.get("UF_PHONE_INNER") or "").strip() or None)
    row.active = _active(record.get("ACTIVE", True))
    if is_admin is not None:
        row.is_admin = is_admin
    return row


def sync_users(portal: Portal, records: Iterable[dict[str, Any]]) -> int:
    """Upsert every user in ``records``; returns how many were seen (caller commits)."""
    known = {row.user_id: row for row in db.session.scalars(
        select(PortalUser).where(PortalUser.portal_id == portal.id))}  # one query, not one per user
    count = 0
    for record in records:
        user_id = int(record["ID"])
        known[user_id] = _apply(portal, known.get(user_id), user_id, record)
        count += 1
    return count


def portals_with_live_tokens(margin_seconds: int = 120) -> list[int]:
    """Active portals whose access token is still valid: a user sync will not refresh them."""
    horizon = utcnow() + timedelta(seconds=margin_seconds)
    return list(db.session.scalars(select(Portal.id).where(
        Portal.status == PortalStatus.ACTIVE.value, Portal.expires_at > horizon)))
