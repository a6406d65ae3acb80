"""The calls table: one row per PBX call of a portal, the state machine's memory.

Queries and the indexes that serve them:

- a PBX event's call, by (portal, PBX ``call_id``): the unique ``uq_calls_portal_pbx_call``;
- a register's answer checked for a collision, by (portal, Bitrix24 ``CALL_ID``):
  ``ix_calls_portal_b24_call_id``;
- the outcome handlers load a call by its primary key (they carry ``call.id`` in context);
- ``flask calls show --state``: the newest calls in a state, ``ix_calls_state_id``;
- the recordings' sweep, queued jobs that are due: ``ix_calls_record_due``.
- the sweeper (app/telephony/sweeper.py): live calls (ringing, answered) first heard of
  before a bound, and incomplete ones to park, by (state, created_at):
  ``ix_calls_state_created_at``.
- ``flask calls reprocess`` (app/telephony/reprocess.py): a portal's calls that started in a
  period, by (portal, started_at): ``ix_calls_portal_started_at``.
"""

from __future__ import annotations

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
)
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import BigId, Model
from app.tenants.models import utcnow


class Call(Model):
    """One PBX call and the Bitrix24 call it became (see app/telephony/machine.py)."""

    __tablename__ = "calls"
    __table_args__ = (
        UniqueConstraint("portal_id", "pbx_call_id", name="uq_calls_portal_pbx_call"),
        Index("ix_calls_portal_b24_call_id", "portal_id", "b24_call_id"),
        Index("ix_calls_state_id", "state", "id"),
        Index("ix_calls_record_due", "record_state", "record_next_at"),
        Index("ix_calls_state_created_at", "state", "created_at"),
        Index("ix_calls_portal_started_at", "portal_id", "started_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    portal_id: Mapped[int] = mapped_column(ForeignKey("portals.id", ondelete="CASCADE"))
    pbx_call_id: Mapped[str] = mapped_column(String(256))
    # machine.State: incomplete, ringing, answered, ended, skipped, unroutable, failed
    state: Mapped[str] = mapped_column(String(16))
    direction: Mapped[str | None] = mapped_column(String(3))  # in | out
    phone: Mapped[str | None] = mapped_column(String(64))  # as registered (E.164 when it parses)
    line: Mapped[str | None] = mapped_column(String(50))
    b24_call_id: Mapped[str | None] = mapped_column(String(128))
    owner_user_id: Mapped[int | None] = mapped_column(Integer)
    ringing: Mapped[list[int]] = mapped_column(JSON, default=list)  # mapped users that rang
    shown: Mapped[list[int]] = mapped_column(JSON, default=list)    # users with the card now
    hidden: Mapped[list[int]] = mapped_column(JSON, default=list)   # users we hid it for
    answerer_user_id: Mapped[int | None] = mapped_column(Integer)
    handler_user_id: Mapped[int | None] = mapped_column(Integer)  # the last handler
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    answered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    end_status: Mapped[str | None] = mapped_column(String(16))
    duration: Mapped[int | None] = mapped_column(Integer)
    # Events that came before their start, kept until it comes (state incomplete).
    pending: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    skip_reason: Mapped[str | None] = mapped_column(Text)  # skipped/unroutable: why
    # The applied events' identities (machine.identity): a duplicate changes nothing.
    seen: Mapped[list[str] | None] = mapped_column(JSON)
    # When the pending events were set aside, having waited TELEPHONY_START_WAIT for the start.
    parked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    caller_name: Mapped[str | None] = mapped_column(String(256))  # the start's, as sent
    # The start's origin_id: the Bitrix24 CALL_ID of a call the app originated (click-to-call).
    origin_id: Mapped[str | None] = mapped_column(String(256))
    # The start's UTC offset in minutes (started_at is kept in UTC): re-processing sends
    # CALL_START_DATE with the offset the PBX gave.
    start_offset: Mapped[int | None] = mapped_column(Integer)
    # Why the call is a replay of a past call (app/telephony/reprocess.py), or None for a live
    # one: "pbx" (its start came TELEPHONY_REPLAY_AGE late) or "reprocess" (flask calls
    # reprocess sent it). A replay shows no card and posts no chat message.
    replay: Mapped[str | None] = mapped_column(String(16))
    crm_entity_type: Mapped[str | None] = mapped_column(String(16))
    crm_entity_id: Mapped[int | None] = mapped_column(Integer)
    lead_error: Mapped[str | None] = mapped_column(Text)  # LEAD_CREATION_ERROR: not a failure
    # register's CALL_ID was already bound to another PBX call: never finished from here.
    collision: Mapped[bool] = mapped_column(Boolean, default=False)
    register_command_id: Mapped[int | None] = mapped_column(BigId)
    register_error: Mapped[str | None] = mapped_column(Text)
    # The owner Bitrix24 refused on register (inactive, unknown): the call was registered
    # again with the portal's fallback user, who also finishes in his place.
    refused_user_id: Mapped[int | None] = mapped_column(Integer)
    # finish waits for register's CALL_ID (checked for a collision first): its params meanwhile.
    finish_params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    finish_command_id: Mapped[int | None] = mapped_column(BigId)
    finish_outcome: Mapped[str | None] = mapped_column(String(8))  # done | dead | unknown
    finish_error: Mapped[str | None] = mapped_column(Text)  # why it is dead or unknown
    # The finish's way there, one entry per command: {"at", "command", "method", "outcome",
    # "reason"} (finish, its resends after unknown outcomes, the statistics check).
    finish_steps: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=list)
    # The PBX's recording (app/telephony/recording.py): its URL and voicemail flag from the
    # first record event; record_state: waiting (for the finish), queued (a download is due
    # at record_next_at), working (a worker has it until record_next_at), sent (attachRecord
    # queued), attached, failed or skipped (record_error says why).
    record_url: Mapped[str | None] = mapped_column(Text)
    record_voicemail: Mapped[bool] = mapped_column(Boolean, default=False)
    record_state: Mapped[str | None] = mapped_column(String(8))
    record_attempts: Mapped[int] = mapped_column(Integer, default=0)
    record_next_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    record_file_id: Mapped[int | None] = mapped_column(BigId)  # attachRecord's FILE_ID
    record_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                 onupdate=utcnow)

    def __repr__(self) -> str:
        return f"<Call {self.portal_id}:{self.pbx_call_id} {self.state}>"


class Originate(Model):
    """One originate request to the PBX: a click-to-call's (app/telephony/click.py) or a
    web-form callback's (app/telephony/callback.py, ``kind`` callback).

    Queries and their indexes: the click's originate in flight, and a PBX ``start``'s
    ``origin_id``, by (portal, Bitrix24 ``CALL_ID``): ``ix_originates_portal_call``; the
    sweep of taken originates the PBX never reported, by (state, sent_at):
    ``ix_originates_state_sent``.
    """

    __tablename__ = "originates"
    __table_args__ = (
        Index("ix_originates_portal_call", "portal_id", "b24_call_id", "id"),
        Index("ix_originates_state_sent", "state", "sent_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    portal_id: Mapped[int] = mapped_column(ForeignKey("portals.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(8), default="click",
                                      server_default="click")  # click | callback
    # the click's CALL_ID; a callback's once its register answered (None before)
    b24_call_id: Mapped[str | None] = mapped_column(String(128))
    user_id: Mapped[int | None] = mapped_column(Integer)  # who clicked; whom a callback rings
    extension: Mapped[str | None] = mapped_column(String(32))  # his phone; None: failed
    phone: Mapped[str] = mapped_column(String(64))  # PHONE_NUMBER_INTERNATIONAL
    dtmf: Mapped[str | None] = mapped_column(String(64))  # EXTENSION: dialled after answer
    line: Mapped[str | None] = mapped_column(String(50))
    is_mobile: Mapped[bool] = mapped_column(Boolean, default=False)
    # A callback's: the TEXT read to the employee and its VOICE, the form's CRM entity, the
    # register's EXTERNAL_CALL_ID (our own) and its outbox command.
    text: Mapped[str | None] = mapped_column(Text)
    voice: Mapped[str | None] = mapped_column(String(64))
    crm_entity_type: Mapped[str | None] = mapped_column(String(16))
    crm_entity_id: Mapped[int | None] = mapped_column(Integer)
    external_call_id: Mapped[str | None] = mapped_column(String(64))
    register_command_id: Mapped[int | None] = mapped_column(BigId)
    # choosing (a callback's employee being chosen) | register (a callback's register in
    # flight) | pending (being tried) | sent (the PBX took it) | joined (its call came)
    # | failed | refused (a click Bitrix24 did not confirm as its user's: nothing sent)
    state: Mapped[str] = mapped_column(String(8))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)  # the last failure, in words
    pbx_call_id: Mapped[str | None] = mapped_column(String(256))  # the PBX call it joined
    inbox_event_id: Mapped[int | None] = mapped_column(BigId)
    finish_command_id: Mapped[int | None] = mapped_column(BigId)  # a failed click's finish
    finish_outcome: Mapped[str | None] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                 onupdate=utcnow)

    def __repr__(self) -> str:
        return f"<Originate {self.portal_id}:{self.b24_call_id} {self.state}>"
