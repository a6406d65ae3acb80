"""Portal and per-portal settings."""

from __future__ import annotations

import enum
from datetime import datetime
from urllib.parse import urlsplit

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Integer, String, Text, select
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.crypto import EncryptedString
from app.extensions import Model, db
from app.tenants.clock import aware, utcnow

__all__ = ["Plan", "Portal", "PortalSettings", "PortalStatus", "aware", "utcnow"]


class PortalStatus(enum.StrEnum):
    """Where a portal stands; every non-active state holds its commands."""

    INSTALLING = "installing"          # install POST seen, setup not finished
    ACTIVE = "active"
    AUTH_FAILED = "auth_failed"        # refresh chain lost (invalid_grant): reopen the app
    PAYMENT_REQUIRED = "payment_required"
    ACCESS_DENIED = "access_denied"
    PORTAL_DELETED = "portal_deleted"
    UNINSTALLED = "uninstalled"
    DISABLED = "disabled"              # switched off by an operator
    BLOCKED = "blocked"                # OVERLOAD_LIMIT: Bitrix24 support blocked its REST access


class Plan(enum.StrEnum):
    """Bitrix24 plan family, which sets the REST rate limit."""

    STANDARD = "standard"
    ENTERPRISE = "enterprise"


PLAN_LIMITS: dict[str, tuple[float, int]] = {
    Plan.STANDARD.value: (2.0, 50),
    Plan.ENTERPRISE.value: (5.0, 250),
}


class Portal(Model):
    """One installation of the app into one Bitrix24 portal."""

    __tablename__ = "portals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    member_id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    domain: Mapped[str] = mapped_column(String(255))
    client_endpoint: Mapped[str] = mapped_column(String(512))
    server_endpoint: Mapped[str | None] = mapped_column(String(512))
    access_token: Mapped[str | None] = mapped_column(EncryptedString(1024))
    refresh_token: Mapped[str | None] = mapped_column(EncryptedString(1024))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    token_version: Mapped[int] = mapped_column(Integer, default=0)
    application_token: Mapped[str | None] = mapped_column(EncryptedString(1024))
    # A keyed hash of application_token, set with it (app/ingress/token_hash.py): intake
    # checks events against it without decrypting the token.
    application_token_hash: Mapped[str | None] = mapped_column(String(80))
    scope: Mapped[str | None] = mapped_column(String(512))
    app_status: Mapped[str | None] = mapped_column(String(4))
    plan: Mapped[str] = mapped_column(String(16), default=Plan.STANDARD.value)
    rate_per_second: Mapped[float] = mapped_column(default=2.0)
    rate_burst: Mapped[int] = mapped_column(Integer, default=50)
    status: Mapped[str] = mapped_column(String(32), default=PortalStatus.INSTALLING.value,
                                        index=True)
    status_reason: Mapped[str | None] = mapped_column(Text)
    language: Mapped[str | None] = mapped_column(String(8))
    installed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_refresh_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_activity_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set (committed) just before a refresh request leaves, cleared when its answer is stored:
    # still set afterwards means a refresher died mid-flight and the chain may be spent.
    refresh_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    auth_user_id: Mapped[int | None] = mapped_column(Integer)  # whose chain we hold
    # The last user sync (app/installation/upkeep.py): running, done or failed (with the reason);
    # users_sync_at is when it got there.
    users_sync_status: Mapped[str | None] = mapped_column(String(16))
    users_sync_error: Mapped[str | None] = mapped_column(Text)
    users_sync_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    status_changed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                 onupdate=utcnow)

    settings: Mapped[PortalSettings] = relationship(back_populates="portal", uselist=False,
                                                    cascade="all, delete-orphan")

    def set_plan(self, plan: Plan | str) -> None:
        """Switch plan and the rate limit that goes with it."""
        value = Plan(plan).value
        self.plan = value
        self.rate_per_second, self.rate_burst = PLAN_LIMITS[value]

    @classmethod
    def by_member_id(cls, member_id: str) -> Portal | None:
        """Look a portal up by its Bitrix24 member_id."""
        return db.session.scalars(select(cls).where(cls.member_id == member_id)).first()

    @property
    def origin(self) -> str:
        """``https://host`` of the portal itself (its REST endpoint without the path)."""
        parts = urlsplit(self.client_endpoint)
        return f"{parts.scheme}://{parts.netloc}"

    def __repr__(self) -> str:
        return f"<Portal {self.member_id} {self.domain} {self.status}>"


class PortalSettings(Model):
    """What the portal admin chooses on the settings page."""

    __tablename__ = "portal_settings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    portal_id: Mapped[int] = mapped_column(ForeignKey("portals.id", ondelete="CASCADE"),
                                           unique=True, index=True)
    event_mode: Mapped[str] = mapped_column(String(16), default="online")  # online | offline
    lines: Mapped[list] = mapped_column(JSON, default=list)  # [{"number": "...", "name": "..."}]
    default_user_id: Mapped[int | None] = mapped_column(Integer)
    crm_create: Mapped[bool] = mapped_column(Boolean, default=True)
    # Dispatcher limits (app/dispatcher/engine.py Settings.portal): K, batches in flight
    # (None: automatic, the app's rule) and sequential mode (K=1; None: DISPATCH_MODE).
    max_batches_in_flight: Mapped[int | None] = mapped_column(Integer)
    sequential: Mapped[bool | None] = mapped_column(Boolean)
    # Click-to-call: where the PBX takes originate requests, and the secret they are signed
    # with (app/telephony/click.py; set with `flask portals settings`).
    pbx_originate_url: Mapped[str | None] = mapped_column(String(1024))
    pbx_secret: Mapped[str | None] = mapped_column(EncryptedString(512))
    # Call options of this portal; None: the app's TELEPHONY_* default (app/config.py).
    crm_source: Mapped[str | None] = mapped_column(String(64))
    add_to_chat: Mapped[bool | None] = mapped_column(Boolean)
    anonymous_calls: Mapped[str | None] = mapped_column(String(16))  # skip | register
    anonymous_number: Mapped[str | None] = mapped_column(String(32))
    internal_calls: Mapped[str | None] = mapped_column(String(16))  # skip | register
    default_country: Mapped[str | None] = mapped_column(String(2))  # ISO 3166 alpha-2
    # Routing rules (app/telephony/routing.py): the CRM kinds in order, comma-separated
    # ("": never route), and whether a responsible not at work is skipped; None: the app's
    # TELEPHONY_ROUTE_PRIORITY / TELEPHONY_ROUTE_SKIP_ABSENT.
    route_priority: Mapped[str | None] = mapped_column(String(32))
    route_skip_absent: Mapped[bool | None] = mapped_column(Boolean)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                 onupdate=utcnow)

    portal: Mapped[Portal] = relationship(back_populates="settings")
