"""PBX event handlers and the outcome handlers of a call's commands.

A PBX event reaches :func:`on_call_event` in a worker, one at a time per call (the inbox's
per-key claim: the key is the PBX ``call_id``). It loads the call's row (creating it at the
call's first event), applies the state machine and submits the commands in the inbox row's
transaction, under the ordering key ``call:<id>``: register, show and hide real-time,
finish normal.

``finish`` waits for register's answer: the register's outcome handler stores the Bitrix24
``CALL_ID`` and checks that no other PBX call of the portal is bound to it (Bitrix24's
dedup can hand two overlapping calls one ``CALL_ID``, protocol §8.3); a collision is
flagged and never finished from here, so a Bitrix24 call is never finished twice.
Whichever of the two comes second (the end, or register's outcome) submits the finish.

A ``start`` TELEPHONY_REPLAY_AGE old or more is a replay of a past call (``calls.replay``
"pbx"): the machine shows no card for it and finishes it with ``ADD_TO_CHAT=0``, and its
register waits for ``voximplant.statistic.get`` by ``EXTERNAL_CALL_ID``
(app/telephony/reprocess.py): a call Bitrix24 lists already is bound, not registered again.

When things go wrong (protocol §8.3, §8.13):

- a register refused for its user goes once more with the portal's fallback user; any other
  failure fails the call (state ``failed``), and its later commands, which refer to the dead
  register, are dead-lettered by the dispatcher instead of waiting;
- a finish whose answer was lost is sent again (``TELEPHONY_FINISH_RESENDS``), and a "Call is
  not found" after such a loss is confirmed with ``voximplant.statistic.get``; each step is
  kept in the row's ``finish_steps``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import redis
from flask import current_app
from sqlalchemy import select, update

from app.dispatcher import Outcome, OutcomeKind, Priority, ref, submit
from app.extensions import db
from app.telephony import click, machine, options, recording, routing
from app.telephony.extensions import ask_sync_for_unmapped
from app.telephony.models import Call
from app.tenants.models import Portal, aware, utcnow
from app.tenants.status import ensure_callable
from app.tenants.users import extension_map

log = logging.getLogger(__name__)

REGISTERED = "telephony.register"  # outcome handler tags this package owns
FINISHED = "telephony.finish"
FINISH_CONFIRMED = "telephony.finish_confirmed"
REPLAY_CHECKED = "telephony.replay_checked"  # its handler is app/telephony/reprocess.py's
REPLAY_PBX = "pbx"  # calls.replay of a start that came TELEPHONY_REPLAY_AGE late
STATISTICS = "voximplant.statistic.get"  # finished calls only (protocol §8.13)
# Bitrix24's texts, matched by prefix (§8.1): a register refused for its user (§8.3), and a
# finish of a call that is not active, never registered or finished already (§8.5).
USER_REFUSED = ("User is not found or is not active", "USER_ID or USER_PHONE_INNER should be set")
CALL_NOT_FOUND = "Call is not found"
PRIORITY = {machine.REGISTER: Priority.REALTIME, machine.SHOW: Priority.REALTIME,
            machine.HIDE: Priority.REALTIME, machine.FINISH: Priority.NORMAL}
COLLISION = "not finished: its CALL_ID is bound to another PBX call of the portal (collision)"


def on_call_event(portal: Portal | None, event: dict[str, Any]) -> None:
    """Apply one PBX event to its call and submit the commands it gives (caller commits)."""
    if portal is None:  # PBX events come with the portal their API key named
        raise ValueError("a PBX call event without a portal")
    ensure_callable(portal)  # a held portal's events wait, parked as held
    row = _load(portal, str(event["call_id"]))
    if row.state == machine.State.INCOMPLETE.value and row.b24_call_id is None:
        joined = click.join(portal, event)
        if joined is not None:
            row.b24_call_id = joined  # a click's call: registered already
    if event.get("event") == "end" and event.get("voicemail") is True:
        row.record_voicemail = True  # the recording that follows is a voicemail
    policy = policy_for(portal, event)
    before = state_of(row)
    if _replayed(before, event):
        before = replace(before, replay=True)  # a past call: no card, statistics first
    after, commands = machine.apply(before, event, policy)
    store(row, after)
    send(row, commands)
    recording.when_ready(row)  # a waiting recording of a call that will never finish: skipped
    # an unknown extension: refresh the map, rate-limited
    ask_sync_for_unmapped(portal, event, policy.extensions)


def _replayed(call: machine.Call, event: Mapping[str, Any]) -> bool:
    """Whether a call's start is a replay: its ``at`` is TELEPHONY_REPLAY_AGE old or more
    now (a PBX re-sending its events after its link was down, protocol §8.11)."""
    if event.get("event") != "start" or call.state is not machine.State.INCOMPLETE:
        return False
    age = (utcnow() - machine.when(event)).total_seconds()
    return age >= float(current_app.config["TELEPHONY_REPLAY_AGE"])


def locked(*where: Any) -> Call | None:
    """The call's row under its write lock (see :func:`_locked`), for the sweeper and
    ``flask calls retry``: a PBX event of the same call waits for their commit."""
    return _locked(*where)


def policy_for(portal: Portal, event: Mapping[str, Any] | None = None) -> machine.Policy:
    """The machine's policy: the portal's extension map and settings, its call options (each
    the app's TELEPHONY_* setting where the portal has none), and for a start the CRM match
    routing cached for its number."""
    settings = portal.settings
    extensions = extension_map(portal)
    return machine.Policy(
        extensions=extensions,
        fallback_user=settings.default_user_id if settings else None,
        default_country=options.default_country(settings),
        crm_create=bool(settings.crm_create) if settings else False,
        crm_source=str(options.option(settings, "crm_source") or "") or None,
        add_to_chat=bool(options.option(settings, "add_to_chat")),
        anonymous=str(options.option(settings, "anonymous_calls")),
        anonymous_number=str(options.option(settings, "anonymous_number") or "") or None,
        internal=str(options.option(settings, "internal_calls")),
        crm_match=_routed(portal, event, extensions))


def _routed(portal: Portal, event: Mapping[str, Any] | None,
            extensions: Mapping[str, int]) -> machine.CrmMatch | None:
    """Routing's cached CRM match for a start's number; the cache only: a start never waits
    for Bitrix24 (a miss leaves the CRM binding to register's own phone search)."""
    if event is None or event.get("event") != "start":
        return None
    raw = str(event.get("phone") or "")
    phone = routing.phone_key(raw, options.default_country(portal.settings))
    if phone is None or raw.strip() in extensions:  # anonymous, or an internal call
        return None
    try:
        found = routing.cached(portal.id, phone)
    except redis.RedisError as exc:
        log.warning("call of portal %s: routing cache unavailable: %s", portal.id, exc)
        return None
    return found.hint() if found is not None else None


def _locked(*where: Any) -> Call | None:
    """The call's row, read after taking its write lock (None when there is none).

    The register's outcome handler and a PBX event handler of the same call may run at
    once, and each reads the row, then writes what follows from it. An UPDATE first makes
    the second wait for the first's commit and then read what it wrote: on PostgreSQL it
    locks the row, on SQLite it takes the database's write lock, where a SELECT alone
    would read without a transaction and a later write would rest on a stale read.
    """
    return db.session.scalars(  # one statement: the UPDATE returns the row it locked
        update(Call).where(*where).values(updated_at=utcnow()).returning(Call)
        .execution_options(synchronize_session=False, populate_existing=True)).one_or_none()


def _load(portal: Portal, pbx_call_id: str) -> Call:
    """The call's row, locked; new at its first event (one call's events come one at a
    time, so nobody else creates it meanwhile)."""
    row = _locked(Call.portal_id == portal.id, Call.pbx_call_id == pbx_call_id)
    if row is None:
        row = Call(portal_id=portal.id, pbx_call_id=pbx_call_id,
                   state=machine.State.INCOMPLETE.value, ringing=[], shown=[], hidden=[],
                   pending=[], collision=False)
        db.session.add(row)
        db.session.flush()  # its id names the commands' ordering key
    return row


def state_of(row: Call) -> machine.Call:
    """The machine's view of a stored call."""
    return machine.Call(
        state=machine.State(row.state), pbx_call_id=row.pbx_call_id, direction=row.direction,
        phone=row.phone, line=row.line, owner=row.owner_user_id,
        ringing=tuple(row.ringing or ()), shown=tuple(row.shown or ()),
        hidden=tuple(row.hidden or ()), answerer=row.answerer_user_id,
        handler=row.handler_user_id, started_at=aware(row.started_at),
        answered_at=aware(row.answered_at), ended_at=aware(row.ended_at),
        end_status=row.end_status, duration=row.duration, pending=tuple(row.pending or ()),
        skip_reason=row.skip_reason, seen=tuple(row.seen or ()),
        parked=row.parked_at is not None and bool(row.pending),
        caller_name=row.caller_name, origin_id=row.origin_id, replay=row.replay is not None)


def store(row: Call, call: machine.Call) -> None:
    """Write the machine's state back to the row."""
    row.state = call.state.value
    row.direction, row.phone, row.line = call.direction, call.phone, call.line
    row.owner_user_id = call.owner
    if row.started_at is None and call.started_at is not None:
        offset = call.started_at.utcoffset()  # kept: started_at is stored in UTC
        row.start_offset = int(offset.total_seconds() // 60) if offset is not None else None
    if call.replay and row.replay is None:
        row.replay = REPLAY_PBX
    row.ringing, row.shown, row.hidden = list(call.ringing), list(call.shown), list(call.hidden)
    row.answerer_user_id, row.handler_user_id = call.answerer, call.handler
    row.started_at, row.answered_at, row.ended_at = (_utc(call.started_at),
                                                     _utc(call.answered_at),
                                                     _utc(call.ended_at))
    row.end_status, row.duration = call.end_status, call.duration
    row.pending = [dict(e) for e in call.pending]
    row.skip_reason = call.skip_reason
    row.seen = list(call.seen)
    if not call.parked:
        row.parked_at = None  # applied (retry), or never parked
    elif row.parked_at is None:
        row.parked_at = utcnow()
    row.caller_name, row.origin_id = call.caller_name, call.origin_id


def _utc(moment: datetime | None) -> datetime | None:
    """In UTC: SQLite keeps no offset, and aware() reads a stored time back as UTC."""
    return moment.astimezone(UTC) if moment else None


def send(row: Call, commands: list[machine.Command]) -> None:
    """Submit the machine's commands for the call, in order (finish may wait, see above)."""
    for command in commands:
        if command.method == machine.FINISH:  # waits for the CALL_ID (a replay's, too)
            row.finish_params = dict(command.params)
            _finish_when_ready(row)
            continue
        params = _with_call_id(row, command.params)
        if command.method == machine.REGISTER and row.b24_call_id is not None:
            continue  # a click-to-call: Bitrix24 registered it, never again (§8.8)
        if command.method == machine.REGISTER and row.replay is not None:
            # A past call: is it in Bitrix24 already (finished from elsewhere, or by this app
            # before it lost the row)? reprocess.replay_checked registers it only if not.
            submit(row.portal_id, STATISTICS, {"FILTER": {"EXTERNAL_CALL_ID": row.pbx_call_id}},
                   key=_key(row), priority=Priority.BULK, handler=REPLAY_CHECKED,
                   context={"call": row.id, "register": params})
            continue
        if command.method == machine.REGISTER:
            row.register_command_id = submit(
                row.portal_id, command.method, params, key=_key(row),
                priority=PRIORITY[command.method], handler=REGISTERED, context={"call": row.id})
        else:
            submit(row.portal_id, command.method, params, key=_key(row),
                   priority=PRIORITY.get(command.method, Priority.REALTIME))


def _key(row: Call) -> str:
    return f"call:{row.id}"


def _with_call_id(row: Call, params: Mapping[str, Any]) -> dict[str, Any]:
    """Params with the call's CALL_ID: known, else a reference to its register's answer."""
    if machine.CALL_ID not in params.values():
        return dict(params)
    if row.b24_call_id is not None:
        call_id: str = row.b24_call_id
    else:
        assert row.register_command_id is not None, "a command before the call's register"
        call_id = ref(row.register_command_id, "CALL_ID")
    return {k: call_id if v == machine.CALL_ID else v for k, v in params.items()}


def _finish_when_ready(row: Call) -> None:
    """Submit the waiting finish once register's CALL_ID is known and not a collision; a
    call whose register failed for good is never finished (its finish is dead, with why)."""
    if row.finish_params is None or row.finish_command_id is not None:
        return
    if row.finish_outcome == OutcomeKind.DONE.value:
        row.finish_params = None  # a replayed call found finished in Bitrix24 already
        return
    if row.register_error is not None:
        row.finish_outcome = OutcomeKind.DEAD.value
        row.finish_error = f"not finished: register failed: {row.register_error}"
    elif row.collision:
        row.finish_error = COLLISION
    elif row.b24_call_id is None:
        return  # register's outcome submits it
    else:
        params = _with_call_id(row, row.finish_params)
        if row.refused_user_id is not None and _user(params) == row.refused_user_id:
            # Bitrix24 refuses him on finish too: the fallback user finishes, and the card
            # the machine counted on finish to hide for him is hidden first (§8.4).
            params["USER_ID"] = row.owner_user_id
            submit(row.portal_id, machine.HIDE,
                   {"CALL_ID": row.b24_call_id, "USER_ID": [row.refused_user_id]},
                   key=_key(row), priority=PRIORITY[machine.HIDE])
        _send_finish(row, params)
    row.finish_params = None


def _send_finish(row: Call, params: Mapping[str, Any]) -> None:
    row.finish_command_id = submit(
        row.portal_id, machine.FINISH, dict(params), key=_key(row),
        priority=PRIORITY[machine.FINISH], handler=FINISHED, context={"call": row.id})


def _user(params: Mapping[str, Any]) -> int | None:
    value = str(params.get("USER_ID") or "")
    return int(value) if value.isdigit() else None


def _description(outcome: Outcome) -> str:
    """Bitrix24's error text (texts differ between builds: match a prefix, protocol §8.1)."""
    return str((outcome.error or {}).get("error_description") or "").strip()


def _outcome_call(outcome: Outcome, current: str | None = None) -> Call | None:
    """The outcome's call, locked; None when it is gone, or when ``current`` names the
    column of the call's command of this kind and a later command has replaced this one."""
    row = _locked(Call.id == int(outcome.context["call"]))
    if row is None:
        log.warning("command %s: call %s is gone", outcome.command_id, outcome.context["call"])
    elif current is not None and outcome.command_id != getattr(row, current):
        log.info("call %s: %s was replaced by %s", row.id, outcome.command_id,
                 getattr(row, current))
        return None
    return row


def registered(outcome: Outcome) -> None:
    """register's outcome: the CALL_ID (or a collision), the CRM binding, then the finish.

    A register Bitrix24 refused for its user (inactive, unknown) is sent once more with the
    portal's fallback user (see :func:`_register_fallback`); any other failure, or a lost
    answer the dispatcher would not resend (policy.resend_refusal), fails the call: state
    ``failed``, the reason kept, never finished. Its later commands refer to the dead
    register, so the dispatcher dead-letters them instead of keeping them queued.
    """
    row = _outcome_call(outcome, "register_command_id")
    if row is None:
        return
    if outcome.ok:
        if row.b24_call_id is None:
            _bind(row, outcome.result if isinstance(outcome.result, dict) else {})
    elif not _register_fallback(row, outcome):
        row.register_error = outcome.reason or outcome.kind.value
    if row.register_error is not None:
        row.state = machine.State.FAILED.value
        log.warning("call %s failed: %s", row.id, row.register_error)
    _finish_when_ready(row)
    recording.when_ready(row)  # a collision or a failed register: no recording


def _register_fallback(row: Call, outcome: Outcome) -> bool:
    """Register the call again, once, with the portal's fallback user, when Bitrix24 refused
    its owner (protocol §8.3): same params (same EXTERNAL_CALL_ID, SHOW=0) but USER_ID. The
    card goes to whoever has it now on the new CALL_ID. False when that does not apply: not
    a refused user, no fallback user, the owner is the fallback already, or tried once."""
    if outcome.kind is not OutcomeKind.DEAD or not _description(outcome).startswith(
            USER_REFUSED):
        return False
    portal = db.session.get(Portal, row.portal_id)
    fallback = portal.settings.default_user_id if portal and portal.settings else None
    if fallback is None or fallback == row.owner_user_id or row.refused_user_id is not None:
        return False
    row.refused_user_id, row.owner_user_id = row.owner_user_id, fallback
    row.register_command_id = submit(
        row.portal_id, machine.REGISTER, {**outcome.params, "USER_ID": fallback, "SHOW": 0},
        key=_key(row), priority=PRIORITY[machine.REGISTER], handler=REGISTERED,
        context={"call": row.id})
    if row.shown:
        submit(row.portal_id, machine.SHOW,
               {"CALL_ID": ref(row.register_command_id, "CALL_ID"), "USER_ID": list(row.shown)},
               key=_key(row), priority=PRIORITY[machine.SHOW])
    log.warning("call %s: Bitrix24 refused user %s (%s); registered again with the fallback "
                "user %s", row.id, row.refused_user_id, _description(outcome), fallback)
    return True


def _bind(row: Call, result: Mapping[str, Any]) -> None:
    call_id = str(result.get("CALL_ID") or "") or None
    if call_id is None:
        row.register_error = f"register answered without a CALL_ID: {dict(result)!r}"[:2000]
        return
    other = db.session.scalar(select(Call.id).where(
        Call.portal_id == row.portal_id, Call.b24_call_id == call_id, Call.id != row.id))
    row.b24_call_id = call_id
    if other is not None:
        row.collision = True
        log.warning("call %s: CALL_ID %s is bound to call %s already (Bitrix24 dedup)",
                    row.id, call_id, other)
    row.lead_error = str(result["LEAD_CREATION_ERROR"]) if result.get(
        "LEAD_CREATION_ERROR") else None  # the call is registered all the same (§8.3)
    entity_id = str(result.get("CRM_ENTITY_ID") or "")
    if result.get("CRM_ENTITY_TYPE") and entity_id.isdigit():
        row.crm_entity_type, row.crm_entity_id = str(result["CRM_ENTITY_TYPE"]), int(entity_id)


def finished(outcome: Outcome) -> None:
    """finish's outcome, kept on the call (done, dead with the reason, or unknown), each
    step in ``finish_steps``.

    A finish whose answer was lost may have run: it is sent again, up to
    ``TELEPHONY_FINISH_RESENDS`` times. Bitrix24 answers a finish of a call it finished
    already with "Call is not found" (protocol §8.5, §8.13): after an unknown outcome that
    answer is checked with ``voximplant.statistic.get`` (:func:`finish_confirmed`), which
    lists finished calls only. Without an earlier unknown outcome it is a real error.
    """
    row = _outcome_call(outcome, "finish_command_id")
    if row is None:
        return
    _step(row, outcome)
    if outcome.ok:
        row.finish_outcome, row.finish_error = OutcomeKind.DONE.value, None
    elif outcome.kind is OutcomeKind.UNKNOWN:
        _resend_finish(row, outcome)
    elif _description(outcome).startswith(CALL_NOT_FOUND) and _lost_before(row):
        submit(row.portal_id, STATISTICS, {"FILTER": {"CALL_ID": row.b24_call_id}},
               key=_key(row), priority=PRIORITY[machine.FINISH], handler=FINISH_CONFIRMED,
               context={"call": row.id, "finish": outcome.command_id})
    else:
        row.finish_outcome = OutcomeKind.DEAD.value
        row.finish_error = outcome.reason or outcome.kind.value
    recording.when_ready(row)  # a recording that waited for this finish goes, or not


def _resend_finish(row: Call, outcome: Outcome) -> None:
    lost = _lost_before(row)
    allowed = int(current_app.config["TELEPHONY_FINISH_RESENDS"])
    if lost > allowed:
        row.finish_outcome = OutcomeKind.UNKNOWN.value
        row.finish_error = (f"{outcome.reason or 'unknown outcome'} (sent {lost} times, "
                            f"TELEPHONY_FINISH_RESENDS={allowed})")
        return
    row.finish_outcome, row.finish_error = None, None
    _send_finish(row, outcome.params)


def _lost_before(row: Call) -> int:
    """How many finishes of the call ended with an unknown outcome."""
    return sum(1 for s in row.finish_steps or ()
               if s["method"] == machine.FINISH and s["outcome"] == OutcomeKind.UNKNOWN.value)


def finish_confirmed(outcome: Outcome) -> None:
    """The statistics check of a finish answered "Call is not found" after an unknown
    outcome: a statistics row for the CALL_ID means an earlier finish ran (done); none
    means the call was never finished here (dead)."""
    row = _outcome_call(outcome)
    if row is None:
        return
    if outcome.context.get("finish") != row.finish_command_id or row.finish_outcome:
        return  # a later finish took over
    _step(row, outcome)
    found = outcome.result if isinstance(outcome.result, list) else []
    if not outcome.ok:
        row.finish_outcome = OutcomeKind.UNKNOWN.value
        row.finish_error = ("a finish's outcome is unknown, and voximplant.statistic.get "
                            f"failed: {outcome.reason}")
    elif any(isinstance(r, dict) and str(r.get("CALL_ID")) == row.b24_call_id for r in found):
        row.finish_outcome, row.finish_error = OutcomeKind.DONE.value, None
    else:
        row.finish_outcome = OutcomeKind.DEAD.value
        row.finish_error = ("Call is not found after a finish with an unknown outcome, and "
                            "voximplant.statistic.get has no row for the call")
    recording.when_ready(row)


def _step(row: Call, outcome: Outcome) -> None:
    moment = outcome.completed_at or utcnow()
    row.finish_steps = [*(row.finish_steps or ()), {
        "at": moment.isoformat(timespec="seconds"), "command": outcome.command_id,
        "method": outcome.method.lower(), "outcome": outcome.kind.value,
        "reason": outcome.reason}]



def on_record(portal: Portal | None, event: dict[str, Any]) -> None:
    """A ``record`` event: kept on its call until the finish is done (see recording.py)."""
    if portal is None:
        raise ValueError("a PBX call event without a portal")
    ensure_callable(portal)
    recording.keep(_load(portal, str(event["call_id"])), event)


def record_attached(outcome: Outcome) -> None:
    """attachRecord's outcome (base64 path), kept on the call."""
    row = _outcome_call(outcome)
    if row is not None:
        recording.attached(row, outcome)


HANDLERS = {**{kind: on_call_event for kind in ("start", "ring", "ring_end", "answer",
                                                "transfer", "end")},
            "record": on_record}
OUTCOME_HANDLERS = {REGISTERED: registered, FINISHED: finished,
                    FINISH_CONFIRMED: finish_confirmed, recording.ATTACHED: record_attached}
