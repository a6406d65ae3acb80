"""Portal users and the extension map: which Bitrix24 user answers which inner number.

Filled from ``user.get`` (``UF_PHONE_INNER``) by the installation use case
(app/installation/user_sync.py: at install, on ONUSERADD and by the periodic user sync;
Bitrix24's REST events have no user update). Telephony reads it through
:func:`user_for_extension` and :func:`extension_map`.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, ForeignKey, Integer, String, UniqueConstraint, select
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import Model, db
from app.tenants.models import Portal, utcnow


class PortalUser(Model):
    """One Bitrix24 user of one portal, with the inner phone number they answer."""

    __tablename__ = "portal_users"
    __table_args__ = (UniqueConstraint("portal_id", "user_id", name="uq_portal_users_portal_user"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    portal_id: Mapped[int] = mapped_column(ForeignKey("portals.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(255), default="")
    extension: Mapped[str | None] = mapped_column(String(32), index=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                 onupdate=utcnow)

    def __repr__(self) -> str:
        return f"<PortalUser {self.portal_id}:{self.user_id} ext={self.extension}>"


def find_user(portal: Portal, user_id: int) -> PortalUser | None:
    """The portal's row for Bitrix24 user ``user_id``, if the app has one."""
    return db.session.scalars(select(PortalUser).where(
        PortalUser.portal_id == portal.id, PortalUser.user_id == user_id)).first()


def user_for_extension(portal: Portal, extension: str) -> PortalUser | None:
    """The active user answering ``extension`` on ``portal``, if any."""
    return db.session.scalars(select(PortalUser).where(
        PortalUser.portal_id == portal.id, PortalUser.extension == extension,
        PortalUser.active.is_(True)).order_by(PortalUser.user_id)).first()


def extension_map(portal: Portal) -> dict[str, int]:
    """``{extension: user_id}`` for the portal's active users with an inner number."""
    rows = db.session.scalars(select(PortalUser).where(
        PortalUser.portal_id == portal.id, PortalUser.active.is_(True),
        PortalUser.extension.is_not(None)).order_by(PortalUser.user_id.desc()))
    return {row.extension: row.user_id for row in rows if row.extension}
