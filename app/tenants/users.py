"""Portal users and the extension map: which Bitrix24 user answers which inner number.

Filled from ``user.get`` (``UF_PHONE_INNER``) by the installation use case
(app/installation/user_sync.py: at install, on ONUSERADD and by the periodic user sync;
Bitrix24's REST events have no user update). Telephony reads it through
:func:`user_for_extension` and :func:`extension_map`.

Bitrix24 keeps only 1-4 digits in ``UF_PHONE_INNER`` (protocol §8.10), so a PBX with 5-digit
or alphanumeric extensions, or a shared phone, needs the portal's own overrides
(:class:`ExtensionOverride`, set with ``flask calls extensions``). They live here, on the
floor, because the merged map is what every reader wants (telephony's machine, the settings
page, the call-card widget): an override wins over ``UF_PHONE_INNER``, and one naming a user
who is inactive or unknown to the map is ignored, so a card is never shown to, nor a call
registered for, a user Bitrix24 rejects.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    """The active user answering ``extension`` on ``portal`` (an override first), if any."""
    user_id = extension_map(portal).get(normalise_extension(extension))
    return find_user(portal, user_id) if user_id is not None else None


class ExtensionOverride(Model):
    """An extension the PBX uses, answered by a Bitrix24 user the portal's ``UF_PHONE_INNER``
    cannot name (5+ digits, letters, a shared phone): set by an operator, wins over user.get."""

    __tablename__ = "extension_overrides"
    __table_args__ = (UniqueConstraint("portal_id", "extension",
                                       name="uq_extension_overrides_portal_extension"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    portal_id: Mapped[int] = mapped_column(ForeignKey("portals.id", ondelete="CASCADE"))
    extension: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[int] = mapped_column(Integer)
    note: Mapped[str] = mapped_column(String(255), default="")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                 onupdate=utcnow)

    def __repr__(self) -> str:
        return f"<ExtensionOverride {self.portal_id}:{self.extension} -> {self.user_id}>"


@dataclass(frozen=True)
class OverrideState:
    """One override and whether the map uses it (``problem``: why not, or None)."""

    override: ExtensionOverride
    problem: str | None


def normalise_extension(value: object) -> str:
    """An extension as the map keys it: the text the PBX sends, without surrounding spaces."""
    return str(value if value is not None else "").strip()


def overrides(portal: Portal) -> list[OverrideState]:
    """The portal's overrides by extension, each with why it is ignored (if it is)."""
    rows = db.session.scalars(select(ExtensionOverride).where(
        ExtensionOverride.portal_id == portal.id).order_by(ExtensionOverride.extension)).all()
    users = {u.user_id: u for u in db.session.scalars(select(PortalUser).where(
        PortalUser.portal_id == portal.id, PortalUser.user_id.in_({r.user_id for r in rows})))}
    out = []
    for row in rows:
        user = users.get(row.user_id)
        problem = (f"user {row.user_id} is unknown (not in the last user sync)" if user is None
                   else f"user {row.user_id} is inactive" if not user.active else None)
        out.append(OverrideState(row, problem))
    return out


def set_override(portal: Portal, extension: str, user_id: int, note: str = ""
                 ) -> ExtensionOverride:
    """Create or replace the override of ``extension`` (caller commits)."""
    extension = normalise_extension(extension)
    if not extension:
        raise ValueError("an extension is required")
    row = db.session.scalars(select(ExtensionOverride).where(
        ExtensionOverride.portal_id == portal.id,
        ExtensionOverride.extension == extension)).first()
    if row is None:
        row = ExtensionOverride(portal_id=portal.id, extension=extension)
        db.session.add(row)
    row.user_id, row.note = int(user_id), note[:255]
    db.session.flush()
    return row


def unset_override(portal: Portal, extension: str) -> bool:
    """Remove the override of ``extension``; whether there was one (caller commits)."""
    row = db.session.scalars(select(ExtensionOverride).where(
        ExtensionOverride.portal_id == portal.id,
        ExtensionOverride.extension == normalise_extension(extension))).first()
    if row is None:
        return False
    db.session.delete(row)
    db.session.flush()
    return True


def extension_map(portal: Portal) -> dict[str, int]:
    """``{extension: user_id}``: the portal's active users' inner numbers, then the overrides
    naming an active user on top (an override of an inactive or unknown user is ignored)."""
    rows = db.session.execute(select(PortalUser.extension, PortalUser.user_id).where(
        PortalUser.portal_id == portal.id, PortalUser.active.is_(True),
        PortalUser.extension.is_not(None)).order_by(PortalUser.user_id.desc()))
    mapped = {ext: user_id for ext, user_id in rows if ext}  # columns: no ORM objects to build
    active = select(PortalUser.user_id).where(PortalUser.portal_id == portal.id,
                                              PortalUser.active.is_(True))
    for ext, user_id in db.session.execute(select(
            ExtensionOverride.extension, ExtensionOverride.user_id).where(
            ExtensionOverride.portal_id == portal.id, ExtensionOverride.user_id.in_(active))):
        mapped[ext] = user_id
    return mapped
