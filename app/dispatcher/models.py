"""The outbox: every REST command the app means to send, until it is done or dead."""

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
    SmallInteger,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import BigId, Model
from app.tenants.models import utcnow


class CommandStatus(enum.StrEnum):
    """Where a command stands; done and dead are final."""

    QUEUED = "queued"      # waiting for its portal's dispatcher (maybe until not_before)
    INFLIGHT = "inflight"  # leased by a dispatcher: in a batch on the wire
    DONE = "done"
    DEAD = "dead"          # failed for good, or its outcome is unknown; dead_reason says why


class Priority(enum.IntEnum):
    """Which ready work leaves first (lower first); bulk never takes the real-time slots.

    ``submit`` defaults to NORMAL. The portal's last slots (``Settings.realtime_slots``) and
    its bucket's reserve are kept from BULK only: NORMAL work may use them as REALTIME does,
    and only goes after the REALTIME work that is ready with it.
    """

    REALTIME = 0  # a person waits on it now: a call's register, show, hide
    NORMAL = 1    # must not wait behind bulk work, nobody watches it land: a call's finish
    BULK = 2      # nobody waits: upkeep, user sync, attachRecord


class OutboxCommand(Model):
    """One REST command for one portal."""

    __tablename__ = "outbox_commands"
    __table_args__ = (
        # The driver's hot query: a portal's queued commands, real-time first, then by id.
        # Its (portal_id, status) prefix also serves a portal's dead letters.
        Index("ix_outbox_commands_ready", "portal_id", "status", "priority", "id"),
        # The sweep: due queued commands and expired leases across all portals.
        Index("ix_outbox_commands_status_not_before", "status", "not_before"),
        Index("ix_outbox_commands_status_lease_until", "status", "lease_until"),
        # Ordering keys: the earliest unfinished command of a key.
        Index("ix_outbox_commands_portal_key", "portal_id", "key", "id"),
        # Outcomes still to settle (true from the start when there is no handler).
        Index("ix_outbox_commands_settled_status", "settled", "status"),
        # Retention: finished commands oldest first (app/dispatcher/retention.py).
        Index("ix_outbox_commands_status_completed_at", "status", "completed_at", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    portal_id: Mapped[int] = mapped_column(ForeignKey("portals.id", ondelete="CASCADE"),
                                           index=True)
    method: Mapped[str] = mapped_column(String(128))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    key: Mapped[str | None] = mapped_column(String(128))
    after_id: Mapped[int | None] = mapped_column(BigId)
    priority: Mapped[int] = mapped_column(SmallInteger, default=Priority.NORMAL.value)
    status: Mapped[str] = mapped_column(String(16), default=CommandStatus.QUEUED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_owner: Mapped[str | None] = mapped_column(String(96))
    batch_id: Mapped[str | None] = mapped_column(String(32))
    result: Mapped[Any | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {"error", "error_description"}
    dead_reason: Mapped[str | None] = mapped_column(Text)
    # How it ended (app.dispatcher.results.OutcomeKind: done, dead, unknown); None until then.
    outcome: Mapped[str | None] = mapped_column(String(8))
    # The submitter's outcome handler (a tag it registered) and what it attached for it.
    handler: Mapped[str | None] = mapped_column(String(128))
    context: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    settled: Mapped[bool] = mapped_column(Boolean, default=False)  # handled, or no handler
    settle_sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    submitted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    first_sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    def __repr__(self) -> str:
        return f"<OutboxCommand {self.id} {self.method} {self.status}>"
