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
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

import redis
from flask import current_app
from sqlalchemy import CursorResult, select, update

from app.dispatcher import Outcome, Priority, ref, submit
from app.extensions import db
from app.telephony import machine, routing
from app.telephony.models import Call
from app.tenants.models import Portal, aware, utcnow
from app.tenants.status import ensure_callable
from app.tenants.users import extension_map

log = logging.getLogger(__name__)

REGISTERED = "telephony.register"  # outcome handler tags this package owns
FINISHED = "telephony.finish"
PRIORITY = {machine.REGISTER: Priority.REALTIME, machine.SHOW: Priority.REALTIME,
            machine.HIDE: Priority.REALTIME, machine.FINISH: Priority.NORMAL}
COLLISION = "not finished: its CALL_ID is bound to another PBX call of the portal (collision)"


def on_call_event(portal: Portal | None, event: dict[str, Any]) -> None:
    """Apply one PBX event to its call and submit the commands it gives (caller commits)."""
    if portal is None:  # PBX events come with the portal their API key named
        raise ValueError("a PBX call event without a portal")
    ensure_callable(portal)  # a held portal's events wait, parked as held
    row = _load(portal, str(event["call_id"]))
    after, commands = machine.apply(state_of(row), event, policy_for(portal, event))
    store(row, after)
    send(row, commands)


def policy_for(portal: Portal, event: Mapping[str, Any] | None = None) -> machine.Policy:
    """The machine's policy: the portal's extension map and settings, the app's settings,
    and for a start the CRM match routing cached for its number."""
    cfg = current_app.config
    settings = portal.settings
    extensions = extension_map(portal)
    return machine.Policy(
        extensions=extensions,
        fallback_user=settings.default_user_id if settings else None,
        default_country=cfg["TELEPHONY_DEFAULT_COUNTRY"] or None,
        crm_create=bool(settings.crm_create) if settings else False,
        crm_source=cfg["TELEPHONY_CRM_SOURCE"] or None,
        add_to_chat=bool(cfg["TELEPHONY_ADD_TO_CHAT"]),
        anonymous=cfg["TELEPHONY_ANONYMOUS_CALLS"],
        anonymous_number=cfg["TELEPHONY_ANONYMOUS_NUMBER"] or None,
        internal=cfg["TELEPHONY_INTERNAL_CALLS"],
        crm_match=_routed(portal, event, extensions))


def _routed(portal: Portal, event: Mapping[str, Any] | None,
            extensions: Mapping[str, int]) -> machine.CrmMatch | None:
    """Routing's cached CRM match for a start's number; the cache only: a start never waits
    for Bitrix24 (a miss leaves the CRM binding to register's own phone search)."""
    if event is None or event.get("event") != "start":
        return None
    raw = str(event.get("phone") or "")
    phone = routing.phone_key(raw)
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
    touched = cast(CursorResult, db.session.execute(  # a DML statement's result
        update(Call).where(*where).values(updated_at=utcnow())
        .execution_options(synchronize_session=False))).rowcount
    if not touched:
        return None
    return db.session.scalars(select(Call).where(*where)
                              .execution_options(populate_existing=True)).one()


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
        skip_reason=row.skip_reason)


def store(row: Call, call: machine.Call) -> None:
    """Write the machine's state back to the row."""
    row.state = call.state.value
    row.direction, row.phone, row.line = call.direction, call.phone, call.line
    row.owner_user_id = call.owner
    row.ringing, row.shown, row.hidden = list(call.ringing), list(call.shown), list(call.hidden)
    row.answerer_user_id, row.handler_user_id = call.answerer, call.handler
    row.started_at, row.answered_at, row.ended_at = (_utc(call.started_at),
                                                     _utc(call.answered_at),
                                                     _utc(call.ended_at))
    row.end_status, row.duration = call.end_status, call.duration
    row.pending = [dict(e) for e in call.pending]
    row.skip_reason = call.skip_reason


def _utc(moment: datetime | None) -> datetime | None:
    """In UTC: SQLite keeps no offset, and aware() reads a stored time back as UTC."""
    return moment.astimezone(UTC) if moment else None


def send(row: Call, commands: list[machine.Command]) -> None:
    """Submit the machine's commands for the call, in order (finish may wait, see above)."""
    for command in commands:
        params = _with_call_id(row, command.params)
        if command.method == machine.REGISTER:
            row.register_command_id = submit(
                row.portal_id, command.method, params, key=_key(row),
                priority=PRIORITY[command.method], handler=REGISTERED, context={"call": row.id})
        elif command.method == machine.FINISH:
            row.finish_params = dict(command.params)
            _finish_when_ready(row)
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
    """Submit the waiting finish once register's CALL_ID is known and not a collision."""
    if row.finish_params is None or row.finish_command_id is not None:
        return
    if row.register_error is not None:
        row.finish_error = f"not finished: register failed: {row.register_error}"
    elif row.collision:
        row.finish_error = COLLISION
    elif row.b24_call_id is None:
        return  # register's outcome submits it
    else:
        row.finish_command_id = submit(
            row.portal_id, machine.FINISH, _with_call_id(row, row.finish_params),
            key=_key(row), priority=PRIORITY[machine.FINISH], handler=FINISHED,
            context={"call": row.id})
    row.finish_params = None


def _outcome_call(outcome: Outcome) -> Call | None:
    row = _locked(Call.id == int(outcome.context["call"]))
    if row is None:
        log.warning("command %s: call %s is gone", outcome.command_id, outcome.context["call"])
    return row


def registered(outcome: Outcome) -> None:
    """register's outcome: the CALL_ID (or a collision), the CRM binding, then the finish."""
    row = _outcome_call(outcome)
    if row is None:
        return
    if not outcome.ok:
        row.register_error = outcome.reason or outcome.kind.value
    elif row.b24_call_id is None:
        _bind(row, outcome.result if isinstance(outcome.result, dict) else {})
    _finish_when_ready(row)


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
    """finish's outcome, kept on the call (done, dead with the reason, or unknown)."""
    row = _outcome_call(outcome)
    if row is None:
        return
    row.finish_outcome = outcome.kind.value
    row.finish_error = None if outcome.ok else outcome.reason


HANDLERS = {kind: on_call_event for kind in ("start", "answer", "transfer", "end")}
OUTCOME_HANDLERS = {REGISTERED: registered, FINISHED: finished}
