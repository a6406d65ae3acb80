"""One call's whole story, for the call pages (placements/calls) and the CALL_CARD widget.

Finding a call: by phone (normalised as the machine registers it, app/telephony/machine.py),
by the PBX's call id, or by the Bitrix24 ``CALL_ID``; always within one portal. Its story:
the call row, its PBX events (the inbox rows keyed by the PBX call id, app/ingress/ordering.py),
the commands sent for it (the outbox commands keyed ``call:<id>``, app/telephony/handlers.py)
with their outcomes and times, and the notes ``flask calls show`` prints (cli.notes).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from app.dispatcher import outbox
from app.extensions import db
from app.ingress import inbox
from app.telephony import cli, machine, options
from app.telephony.models import Call
from app.tenants.models import PortalSettings

FOUND_LIMIT = 50


@dataclass(frozen=True)
class Story:
    """A call, its PBX events, the commands sent for it, and what is worth knowing."""

    call: Call
    events: list[inbox.KeyedEvent]
    commands: list[outbox.CommandRecord]
    notes: list[str]


def command_key(call: Call) -> str:
    """The ordering key the call's commands carry (handlers, recording and reprocess)."""
    return f"call:{call.id}"


def phone_forms(raw: str, country: str | None) -> list[str]:
    """The forms a typed number may be stored in: E.164 as the machine makes it (also of the
    digits typed without their ``+``), its dialable characters, and the text as typed (an
    internal extension, an anonymous stand-in)."""
    dialable = "".join(ch for ch in raw if ch.isdigit() or ch in "+#*")
    forms = [machine.normalise_phone(raw, country), dialable, raw.strip()]
    if dialable.isdigit():
        forms.append(machine.normalise_phone("+" + dialable, None))
    return list(dict.fromkeys(f for f in forms if f))


def find(portal_id: int, text: str, limit: int = FOUND_LIMIT) -> list[Call]:
    """A portal's calls whose phone, PBX call id or Bitrix24 CALL_ID is ``text``, newest first.

    Three queries, so that each id uses its index (uq_calls_portal_pbx_call,
    ix_calls_portal_b24_call_id); the phone has no index of its own: that one walks the
    portal's calls newest first (ix_calls_portal_started_at) and stops at ``limit``.
    """
    text = text.strip()
    if not text:
        return []
    mine = Call.portal_id == portal_id
    wheres = [Call.pbx_call_id == text, Call.b24_call_id == text]
    if any(ch.isdigit() for ch in text):
        settings = db.session.scalar(select(PortalSettings)
                                     .where(PortalSettings.portal_id == portal_id))
        wheres.append(Call.phone.in_(phone_forms(text, options.default_country(settings))))
    found: dict[int, Call] = {}
    for where in wheres:
        query = (select(Call).where(mine, where)
                 .order_by(Call.started_at.desc(), Call.id.desc()).limit(limit))
        found.update((call.id, call) for call in db.session.scalars(query))
    return sorted(found.values(), key=lambda call: call.id, reverse=True)[:limit]


def call_of(portal_id: int, call_id: int) -> Call | None:
    """The portal's call with this row id; None when there is none, or it is another's."""
    call = db.session.get(Call, call_id)
    return call if call is not None and call.portal_id == portal_id else None


def by_b24_call_id(portal_id: int, b24_call_id: str) -> Call | None:
    """The portal's call registered as this Bitrix24 CALL_ID (index ix_calls_portal_b24_call_id);
    the newest, should a collision have bound it twice."""
    if not b24_call_id:
        return None
    query = (select(Call).where(Call.portal_id == portal_id, Call.b24_call_id == b24_call_id)
             .order_by(Call.id.desc()).limit(1))
    return db.session.scalars(query).first()


def story(call: Call) -> Story:
    """The call's whole story: its PBX events, its commands, and its notes."""
    return Story(call, inbox.events_for_key(call.portal_id, call.pbx_call_id),
                 outbox.commands_for_key(call.portal_id, command_key(call)), cli.notes(call))
