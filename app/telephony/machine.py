"""The call state machine (pure: no database, no clock, no I/O).

``apply(call, event, policy)`` takes a call's state and one PBX event (app/ingress/pbx.py's
schema) and returns the new state and the Bitrix24 commands to send, in order (protocol
§8.11). Per kind of event:

- ``start``: ``register`` (``SHOW=0``, the owner, the start's time with its offset, the
  number in E.164, ``TYPE``, line, ``EXTERNAL_CALL_ID``, ``CRM_CREATE``/``CRM_SOURCE``),
  then one ``show`` to every ringing mapped user. The owner is the CRM responsible routing
  found for the number when his phone rings, else the first ringing mapped user, else the
  fallback user; the fallback's card is not shown unless his phone rings. Routing's CRM
  record, when there is one, goes to register as ``CRM_ENTITY_TYPE``/``CRM_ENTITY_ID``.
  Anonymous and internal calls follow their policy (skip, or register).
- ``answer``: ``hide`` for everyone else who has the card, then ``show`` to the answerer if
  he has not got it.
- ``transfer``: ``show`` to the new handler, then ``hide`` for the previous one.
- ``end``: ``hide`` for everyone who has the card except the finisher, then ``finish``
  (which hides it for the finisher only, §8.4). The finisher is the last handler of an
  answered call, else the owner. Status: answered → 200 with ``DURATION`` rounded up and
  at least 1; an unanswered incoming call → 304 (the only missed call, §8.5) with the
  detail in ``FAILED_REASON``; outgoing → 480/486/603-S/503; ``sip_code`` overrides.
- ``ring`` / ``ring_end`` (a queue that hunts): ``show`` to the ringing extension's user if
  he has not got the card; ``hide`` for him when his phone stops, unless he answered.
  Only while nobody has answered: after the answer the others' cards are gone already.
- a call marked ``replay`` (a PBX re-sending a past call, see handlers.py) shows no card
  at all (no ``show`` on start, ring, answer or transfer) and finishes with
  ``ADD_TO_CHAT=0``: the conversation is over, only the CRM record is missing.
- ``end`` with the status :data:`SWEPT` comes from the sweeper (app/telephony/sweeper.py),
  never from the PBX: no end came in time. It finishes with ``DURATION`` 0 (the talk time is
  unknown), ``FAILED_REASON`` "no end from the PBX", 304 for an unanswered incoming call
  and ``OTHER`` otherwise, the last handler finishing an answered one.

``end`` is absorbing. A duplicate, the same kind of event again even with a later ``at``,
changes nothing: a second start, answer or end; a transfer applied before (same from and
to), unless the call has come back to the one passing it on (a call passed back and forth
is transferred each time); a ring or ring_end of an extension that rang (stopped) already.
``seen`` keeps what was applied. An event before the start is kept in ``pending`` (state
``incomplete``): nothing can be registered without the start's number and direction; the
start applies them after itself, ordered by (``at``, rank, arrival). Once the call is
``parked`` (it waited longer than TELEPHONY_START_WAIT), a late start still registers the
call, but the waiting events stay set aside until :func:`retry` (``flask calls retry``, or
the sweeper) applies them; a start that follows a parked ``end`` shows no card. ``record``
is not the machine's: it changes nothing here and the handlers take it.

Commands carry ``CALL_ID`` as :data:`CALL_ID`, which the caller replaces by the registered
call's id (or a reference to the register command). Parameters whose value is None are
left out, never sent as "".
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import phonenumbers

CALL_ID = "$call"  # stands for the Bitrix24 CALL_ID in a command's params
RANK = {"start": 0, "ring": 1, "ring_end": 2, "answer": 3, "transfer": 4, "end": 5, "record": 6}
KINDS = ("start", "ring", "ring_end", "answer", "transfer", "end")  # what the machine applies
REGISTER = "telephony.externalcall.register"
SHOW = "telephony.externalcall.show"
HIDE = "telephony.externalcall.hide"
FINISH = "telephony.externalcall.finish"
SWEPT = "swept"  # the sweeper's end status: no end came from the PBX in time
FAILED_REASONS = {"no_answer": "no answer", "busy": "busy", "cancelled": "caller hung up",
                  "failed": "failed", SWEPT: "no end from the PBX"}
MAX_DURATION = 2**31 - 1  # seconds: what the calls table (and Bitrix24's int) can hold
OUTGOING_CODES = {"no_answer": "480", "busy": "486", "cancelled": "603-S", "failed": "503"}


class State(enum.StrEnum):
    """Where a call stands."""

    INCOMPLETE = "incomplete"  # events came before the start; they wait for it
    RINGING = "ringing"        # registered, nobody answered yet
    ANSWERED = "answered"
    ENDED = "ended"            # absorbing
    SKIPPED = "skipped"        # anonymous or internal, by policy: nothing sent
    UNROUTABLE = "unroutable"  # no ringing extension is mapped and no fallback user is set
    FAILED = "failed"          # Bitrix24 refused the register (or it was lost): see the row


QUIET = frozenset({State.ENDED, State.SKIPPED, State.UNROUTABLE,
                   State.FAILED})  # later events do nothing


@dataclass(frozen=True)
class CrmMatch:
    """The CRM record routing found for the caller's number (app/telephony/routing.py)."""

    responsible: int | None = None  # its responsible user, the owner when his phone rings
    entity_type: str | None = None  # CONTACT | COMPANY | LEAD
    entity_id: int | None = None


@dataclass(frozen=True)
class Policy:
    """What the machine needs to know about the portal and the settings."""

    extensions: Mapping[str, int] = field(default_factory=dict)  # extension -> user id
    fallback_user: int | None = None
    default_country: str | None = None  # ISO 3166 alpha-2, for numbers without a +
    crm_create: bool = False
    crm_source: str | None = None
    add_to_chat: bool = True
    anonymous: str = "skip"  # skip | register
    anonymous_number: str | None = None  # what an anonymous call is registered as
    internal: str = "skip"  # skip | register
    crm_match: CrmMatch | None = None  # routing's cached match for a start's number


@dataclass(frozen=True)
class Command:
    """One Bitrix24 command; params may hold :data:`CALL_ID`."""

    method: str
    params: Mapping[str, Any]


@dataclass(frozen=True)
class Call:
    """A call's state as the machine sees it (app/telephony/models.py stores it)."""

    state: State = State.INCOMPLETE
    pbx_call_id: str = ""
    direction: str | None = None
    phone: str | None = None
    line: str | None = None
    owner: int | None = None
    ringing: tuple[int, ...] = ()
    shown: tuple[int, ...] = ()
    hidden: tuple[int, ...] = ()
    answerer: int | None = None
    handler: int | None = None
    started_at: datetime | None = None
    answered_at: datetime | None = None
    ended_at: datetime | None = None
    end_status: str | None = None
    duration: int | None = None
    pending: tuple[Mapping[str, Any], ...] = ()
    skip_reason: str | None = None
    seen: tuple[str, ...] = ()  # the applied events' identities (see identity())
    parked: bool = False  # pending events waited too long for the start: retry() applies them
    caller_name: str | None = None
    origin_id: str | None = None  # the CALL_ID of a call the app originated (click-to-call)
    # A PBX replay of a past call (its start came TELEPHONY_REPLAY_AGE late, or re-processing):
    # no card is shown to anyone, and the finish posts no chat message.
    replay: bool = False


def apply(call: Call, event: Mapping[str, Any], policy: Policy) -> tuple[Call, list[Command]]:
    """The call after ``event``, and the commands to send for it, in order."""
    kind = event.get("event")
    if call.state in QUIET or kind not in KINDS:
        return call, []
    if kind == "start":
        return _start(call, event, policy)
    if call.state is State.INCOMPLETE:
        return replace(call, pending=(*call.pending, dict(event))), []
    key = identity(event)
    if _duplicate(call, key, event, policy):
        return call, []
    after, commands = _STEPS[str(kind)](call, event, policy)
    return replace(after, seen=(*after.seen, key)), commands


def identity(event: Mapping[str, Any]) -> str:
    """What makes two events of a call duplicates: the kind, and for a transfer who passed
    it to whom, for a ring or ring_end its extension."""
    kind = str(event.get("event"))
    if kind == "transfer":
        return (f"transfer:{str(event.get('from_extension') or '').strip()}"
                f">{str(event.get('to_extension') or '').strip()}")
    if kind in ("ring", "ring_end"):
        return f"{kind}:{str(event.get('extension') or '').strip()}"
    return kind


def _duplicate(call: Call, key: str, event: Mapping[str, Any], policy: Policy) -> bool:
    """Whether the event repeats one applied before. A transfer that was applied before is
    real again only when the call has come back to the one passing it on (A to B, B to A,
    A to B again: three transfers); from anyone else it is a late copy."""
    if key not in call.seen:
        return False
    if key.startswith("transfer:"):
        passer = users_of([str(event.get("from_extension") or "")], policy)
        return not passer or call.handler is None or passer[0] != call.handler
    return True


def retry(call: Call, policy: Policy) -> tuple[Call, list[Command]]:
    """Apply the events that wait (parked ones included) once the start has come; a call
    still without its start is left as it is (nothing registers without it)."""
    if call.state is State.INCOMPLETE or not call.pending:
        return call, []
    after, commands = replace(call, pending=(), parked=False), []
    for early in ordered(call.pending):
        after, more = apply(after, early, policy)
        commands += more
    return after, commands


def park(call: Call) -> Call:
    """Set the events that wait for the start aside: a late start no longer applies them."""
    return replace(call, parked=True) if call.state is State.INCOMPLETE else call


def ordered(events: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Events by (``at``, rank of their kind, arrival)."""
    indexed = list(enumerate(events))
    indexed.sort(key=lambda pair: (when(pair[1]), RANK.get(str(pair[1].get("event")), 9),
                                   pair[0]))
    return [event for _, event in indexed]


def when(event: Mapping[str, Any]) -> datetime:
    """An event's ``at`` (ISO 8601 with an offset, checked at intake)."""
    return datetime.fromisoformat(str(event["at"]))


def normalise_phone(raw: str, country: str | None) -> str | None:
    """The number in E.164 when it parses as a possible number, else its dialable characters
    (digits, ``+#*``); None when nothing is left (an anonymous caller)."""
    kept = "".join(ch for ch in raw if ch.isdigit() or ch in "+#*")
    if not any(ch.isdigit() for ch in kept):
        return None
    try:
        number = phonenumbers.parse(kept, (country or "").upper() or None)
    except phonenumbers.NumberParseException:
        return kept
    if not phonenumbers.is_possible_number(number):
        return kept
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def users_of(extensions: Sequence[str], policy: Policy) -> tuple[int, ...]:
    """The mapped users of these extensions, once each, in order; unmapped ones dropped."""
    out: list[int] = []
    for ext in extensions:
        user = policy.extensions.get(str(ext).strip())
        if user is not None and user not in out:
            out.append(user)
    return tuple(out)


# ------------------------------------------------------------------ start


def _start(call: Call, event: Mapping[str, Any], policy: Policy) -> tuple[Call, list[Command]]:
    if call.state is not State.INCOMPLETE:
        return call, []  # a second start
    extensions = event.get("extensions") or []
    if isinstance(extensions, str):
        extensions = [extensions]
    started = replace(call, pbx_call_id=str(event.get("call_id") or call.pbx_call_id),
                      direction=event.get("direction"), line=_line(event.get("line")),
                      started_at=when(event), ringing=users_of(extensions, policy),
                      caller_name=_optional(event.get("caller_name")),
                      origin_id=_optional(event.get("origin_id")), seen=("start",))
    skip, phone = _number(str(event.get("phone") or ""), policy)
    if skip:
        return replace(started, state=State.SKIPPED, skip_reason=skip, pending=()), []
    owner = _owner(started.ringing, policy)
    if owner is None:
        return replace(started, state=State.UNROUTABLE, phone=phone, pending=(),
                       skip_reason="no ringing extension is mapped to a user and no "
                                   "fallback user is set"), []
    over = call.parked and any(e.get("event") == "end" for e in call.pending)
    # no card for a call known to be over, nor for a replayed past call
    shown = () if over or call.replay else started.ringing
    started = replace(started, state=State.RINGING, phone=phone, owner=owner, shown=shown)
    commands = [Command(REGISTER, _register_params(started, event, policy))]
    if shown:
        commands.append(Command(SHOW, {"CALL_ID": CALL_ID, "USER_ID": list(shown)}))
    if call.parked:
        return started, commands  # the set-aside events wait for retry()
    for early in ordered(call.pending):
        started, more = apply(started, early, policy)
        commands += more
    return replace(started, pending=()), commands


def _optional(raw: Any) -> str | None:
    text = str(raw).strip() if raw is not None else ""
    return text or None


def _owner(ringing: tuple[int, ...], policy: Policy) -> int | None:
    """The CRM responsible if his phone rings, else the first ringing, else the fallback."""
    responsible = policy.crm_match.responsible if policy.crm_match else None
    if responsible is not None and responsible in ringing:
        return responsible
    return ringing[0] if ringing else policy.fallback_user


def _line(raw: Any) -> str | None:
    text = str(raw or "").strip()[:50]  # Bitrix24 trims a line number and cuts it to 50
    return text or None


def _number(raw: str, policy: Policy) -> tuple[str | None, str | None]:
    """(why the call is skipped, or None; the number to register)."""
    if raw.strip() in policy.extensions:
        if policy.internal != "register":
            return "internal call (TELEPHONY_INTERNAL_CALLS=skip)", None
        return None, raw.strip()  # Bitrix24 makes it an internal call: no CRM
    phone = normalise_phone(raw, policy.default_country)
    if phone is None:
        if policy.anonymous != "register" or not policy.anonymous_number:
            return "anonymous caller (TELEPHONY_ANONYMOUS_CALLS=skip)", None
        return None, policy.anonymous_number
    return None, phone


def _register_params(call: Call, event: Mapping[str, Any], policy: Policy) -> dict[str, Any]:
    assert call.started_at is not None
    params = {
        "USER_ID": call.owner,
        "PHONE_NUMBER": call.phone,
        "CALL_START_DATE": call.started_at.isoformat(timespec="seconds"),
        "TYPE": 2 if call.direction == "in" else 1,
        "LINE_NUMBER": call.line,
        "EXTERNAL_CALL_ID": call.pbx_call_id,
        "CRM_CREATE": 1 if policy.crm_create else 0,
        "CRM_SOURCE": policy.crm_source or None,
        "SHOW": 0,
    }
    match = policy.crm_match
    if match and match.entity_type and match.entity_id:
        params["CRM_ENTITY_TYPE"], params["CRM_ENTITY_ID"] = match.entity_type, match.entity_id
    return {k: v for k, v in params.items() if v is not None}


# ------------------------------------------------------------------ answer, transfer


def _answer(call: Call, event: Mapping[str, Any], policy: Policy) -> tuple[Call, list[Command]]:
    if call.answered_at is not None or call.state is not State.RINGING:
        return call, []  # a second answer
    user = users_of([str(event.get("extension") or "")], policy)
    answerer = user[0] if user else None
    others = [u for u in call.shown if u != answerer]
    commands = _hide(others)
    after = _without(call, others)
    if answerer is not None and answerer not in after.shown and not call.replay:
        commands.append(_show(answerer))
        after = _with(after, answerer)
    return replace(after, state=State.ANSWERED, answerer=answerer, handler=answerer,
                   answered_at=when(event)), commands


def _transfer(call: Call, event: Mapping[str, Any],
              policy: Policy) -> tuple[Call, list[Command]]:
    found = users_of([str(event.get("to_extension") or "")], policy)
    target = found[0] if found else None
    if target is not None and target == call.handler:
        return call, []  # a repeated transfer
    previous = call.handler
    if previous is None:
        before = users_of([str(event.get("from_extension") or "")], policy)
        previous = before[0] if before else None
    commands: list[Command] = []
    after = call
    if target is not None and target not in after.shown and not call.replay:
        commands.append(_show(target))
        after = _with(after, target)
    if previous is not None and previous != target and previous in after.shown:
        commands += _hide([previous])
        after = _without(after, [previous])
    return replace(after, handler=target), commands


def _ring(call: Call, event: Mapping[str, Any], policy: Policy) -> tuple[Call, list[Command]]:
    extension = str(event.get("extension") or "").strip()
    found = users_of([extension], policy)
    if call.state is not State.RINGING or not found or f"ring_end:{extension}" in call.seen:
        return call, []  # answered already, not a mapped user, or his phone stopped already
    user = found[0]
    after = call if user in call.ringing else replace(call, ringing=(*call.ringing, user))
    if user in after.shown or call.replay:
        return after, []
    return _with(after, user), [_show(user)]


def _ring_end(call: Call, event: Mapping[str, Any],
              policy: Policy) -> tuple[Call, list[Command]]:
    found = users_of([str(event.get("extension") or "")], policy)
    if not found or found[0] in (call.answerer, call.handler) or found[0] not in call.shown:
        return call, []  # not mapped, he took the call (the card is his), or he has no card
    return _without(call, found), _hide(found)


def _show(user: int) -> Command:
    return Command(SHOW, {"CALL_ID": CALL_ID, "USER_ID": user})


def _hide(users: Sequence[int]) -> list[Command]:
    return [Command(HIDE, {"CALL_ID": CALL_ID, "USER_ID": list(users)})] if users else []


def _with(call: Call, user: int) -> Call:
    return replace(call, shown=(*call.shown, user))


def _without(call: Call, users: Sequence[int]) -> Call:
    gone = set(users)
    return replace(call, shown=tuple(u for u in call.shown if u not in gone),
                   hidden=(*call.hidden, *(u for u in users if u not in call.hidden)))


# ------------------------------------------------------------------ end


def _end(call: Call, event: Mapping[str, Any], policy: Policy) -> tuple[Call, list[Command]]:
    status = str(event.get("status") or "failed")
    answered = status == "answered"
    with_someone = answered or (status == SWEPT and call.answered_at is not None)
    finisher = (call.handler or call.answerer or call.owner) if with_someone else call.owner
    others = [u for u in call.shown if u != finisher]
    after = _without(call, others)
    talked = min(float(event.get("duration") or 0), MAX_DURATION)  # intake bounds it below only
    duration = max(1, math.ceil(talked)) if answered else 0
    finish: dict[str, Any] = {
        "CALL_ID": CALL_ID,
        "USER_ID": finisher,
        "DURATION": duration,
        "STATUS_CODE": _status_code(call, status, event.get("sip_code")),
        "FAILED_REASON": None if answered else FAILED_REASONS.get(status, status),
        "ADD_TO_CHAT": 1 if policy.add_to_chat and not call.replay else 0,
    }
    if finisher in after.shown:  # finish hides the card for its own user (§8.4)
        after = _without(after, [finisher])
    after = replace(after, state=State.ENDED, ended_at=when(event), end_status=status,
                    duration=duration)
    return after, [*_hide(others),
                   Command(FINISH, {k: v for k, v in finish.items() if v is not None})]


def _status_code(call: Call, status: str, sip_code: Any) -> str:
    if sip_code not in (None, ""):
        return str(sip_code)
    if status == "answered":
        return "200"
    if status == SWEPT and call.answered_at is not None:
        return "OTHER"  # answered, so not missed; the talk time is unknown (no 200)
    if call.direction == "in":
        return "304"  # the only code that makes a missed call (§8.5)
    return OUTGOING_CODES.get(status, "OTHER")


_STEPS = {"ring": _ring, "ring_end": _ring_end, "answer": _answer, "transfer": _transfer,
          "end": _end}
