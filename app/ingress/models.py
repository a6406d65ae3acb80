"""The inbox (every accepted event, until a worker has handled it) and PBX API keys."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import Model
from app.tenants.models import utcnow


class InboxStatus(enum.StrEnum):
    """Where an inbox row stands; done and dead are final, unhandled and held are parked.

    A parked row waits without spending attempts; the sweeper queues it again once it
    can go somewhere: an ``unhandled`` row when a handler for its (source, event_type)
    is registered, a ``held`` row when its portal's status is callable again. The
    status column is a plain string (no CHECK constraint, no enum type), so adding a
    status needs no migration.
    """

    RECEIVED = "received"      # stored, not yet handed to the broker
    QUEUED = "queued"          # a message for it is (or should be) in the broker
    PROCESSING = "processing"  # a worker claimed it
    DONE = "done"
    UNHANDLED = "unhandled"    # parked: no handler for this event type (yet)
    HELD = "held"              # parked: the portal's status holds its calls (PortalUnavailable)
    DEAD = "dead"              # failed for good; last_error says why
    # Kept, not processed: its portal awaits its application_token (app/ingress/provisional.py).
    PROVISIONAL = "provisional"
    # Written by earlier versions for rows without a handler; the sweeper treats such
    # rows like unhandled ones, so those events are not lost either.
    LEGACY_SKIPPED = "skipped"


PENDING = (InboxStatus.RECEIVED.value, InboxStatus.QUEUED.value)
PARKED = (InboxStatus.UNHANDLED.value, InboxStatus.HELD.value)
FINAL = (InboxStatus.DONE.value, InboxStatus.DEAD.value)


class InboxEvent(Model):
    """One incoming event, stored before it is acknowledged."""

    __tablename__ = "inbox_events"
    __table_args__ = (
        UniqueConstraint("member_id", "source", "dedupe_key", name="uq_inbox_events_dedupe"),
        Index("ix_inbox_events_status_received_at", "status", "received_at"),
        # The claim's check for an earlier unfinished row of the key (app/ingress/ordering.py);
        # only keyed rows are in it.
        Index("ix_inbox_events_order_key", "portal_id", "order_key", "id",
              postgresql_where=text("order_key IS NOT NULL"),
              sqlite_where=text("order_key IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    portal_id: Mapped[int | None] = mapped_column(ForeignKey("portals.id", ondelete="SET NULL"),
                                                  index=True)
    member_id: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(8))  # b24 | pbx
    event_type: Mapped[str] = mapped_column(String(64))
    dedupe_key: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    unverified: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16), default=InboxStatus.RECEIVED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Rows of one (portal, key) are handled one at a time, in id order (a PBX call's call_id).
    order_key: Mapped[str | None] = mapped_column(String(256))

    def __repr__(self) -> str:
        return f"<InboxEvent {self.id} {self.source}:{self.event_type} {self.status}>"


class PortalApiKey(Model):
    """The PBX's key for one portal, stored as a SHA-256 digest (the key is random)."""

    __tablename__ = "portal_api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    portal_id: Mapped[int] = mapped_column(ForeignKey("portals.id", ondelete="CASCADE"),
                                           unique=True, index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(12))  # shown to admins to tell keys apart
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
