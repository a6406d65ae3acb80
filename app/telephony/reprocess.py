"""Past calls that are missing from Bitrix24, sent again (issue 23 point 5, protocol §8.11,
§8.13, §8.15, §8.16).

Two ways a past call reaches Bitrix24 late:

- ``flask calls reprocess`` (:func:`plan`, :func:`send`): a portal's calls that started in a
  period and are not in Bitrix24 as finished. The app's table answers first (a finish done
  means the call is there, and it is not looked up); the others are looked up in
  ``voximplant.statistic.get`` by ``EXTERNAL_CALL_ID`` (finished calls only; the portal's
  stored chain, the installer's admin token, so that nothing is filtered out; the direct
  path, since an operator waits; 50 ids per request, each answer paged). A call found there
  is marked done and not sent again. A missing one is sent as one ordered group under its
  call's ordering key, at bulk priority so that live cards keep flowing: ``register``
  (``SHOW=0``, the original ``CALL_START_DATE`` with its offset, the original owner, no
  show or hide at all) and ``finish`` (``ADD_TO_CHAT=0``, the call's status and duration)
  back to back, the finish referring to the register's ``CALL_ID`` so that both leave in one
  batch (a call that started over 30 days ago can be swept by Bitrix24's cleaner between
  two requests, §8.15); then its recording, if it has one, goes as after any finish
  (app/telephony/recording.py). A call registered earlier whose finish never got through is
  finished on its own ``CALL_ID`` (a new register would make a second call).
- a PBX re-sending old events (a ``start`` TELEPHONY_REPLAY_AGE late, handlers.py): no card,
  and before its register ``voximplant.statistic.get`` is asked by ``EXTERNAL_CALL_ID``
  (:func:`replay_checked`): a call found there is bound to that ``CALL_ID`` and never
  registered again; only a missing one is registered (``SHOW=0``, bulk priority).

Both fire the portal's automation rules (robots) for past calls, as Bitrix24 runs them on
every new registration and finish (§8.3, §8.16): the command warns and asks first.

The register resend rule (app/dispatcher/policy.py) allows a register to go again after an
unknown outcome only while its ``CALL_START_DATE`` is under 25 minutes old. A past call's
register is never resent: after a lost answer it ends ``unknown``, and the call is
``failed`` with that reason (``flask calls show``). It may then be open in Bitrix24, where no
method lists active calls; the statistics do not show it either (not finished). A
re-processing of such a call is listed with that warning. A reprocessed call's register and
finish share one batch, so after a lost answer either both ran (the statistics show it, and
the next run marks it done) or neither did.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from flask import current_app
from sqlalchemy import select

from app.dispatcher import Outcome, OutcomeKind, Priority, direct, ref, submit
from app.extensions import db
from app.telephony import handlers, machine, recording
from app.telephony.machine import State
from app.telephony.models import Call
from app.tenants.models import Portal, aware, utcnow

log = logging.getLogger(__name__)

REGISTERED = "telephony.reprocess_register"  # outcome handler tag of a reprocessed register
REPROCESS = "reprocess"  # calls.replay of a call this command sent
CHUNK = 50  # EXTERNAL_CALL_IDs per statistics request (Bitrix24 lists 50 rows a page)
MAX_PAGES = 1000  # a bound on one chunk's pages (50 ids cannot fill more than a few)
UNKNOWN_WARNING = ("its register's outcome was unknown before: it may be open (unfinished) in "
                   "Bitrix24, which no method lists; registering again may make a second call")
WARNING = ("Bitrix24 runs the portal's automation rules (robots) on every registered and "
           "finished call: they fire now for these past calls, as if they were new.")


class Action:
    """What re-processing does with a call (the words the command prints)."""

    SEND = "register+finish"
    FINISH = "finish"  # registered before; its finish never got through
    FOUND = "in Bitrix24"  # the statistics list it: marked done, nothing sent
    DONE = "done"  # the app's table: its finish was done
    SKIP = "skip"


@dataclass(frozen=True)
class Item:
    """One call of the period and what re-processing does with it."""

    row_id: int
    pbx_call_id: str
    started: datetime | None  # with the start's own offset
    phone: str | None
    owner: int | None
    status: str | None  # the PBX's end status (answered, no_answer, ...)
    action: str
    note: str = ""  # why it is skipped, the CALL_ID found, or a warning
    found_call_id: str | None = None


# ------------------------------------------------------------------ the plan


def parse_time(text: str) -> datetime:
    """An ISO 8601 time with an offset (a time without one is ambiguous: refused)."""
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{text!r} has no UTC offset (e.g. 2026-12-01T00:00:00+03:00)")
    return moment


def original_start(row: Call) -> datetime | None:
    """The call's start as the PBX gave it: stored in UTC, shown with its own offset."""
    started = aware(row.started_at)
    if started is None:
        return None
    return started.astimezone(timezone(timedelta(minutes=row.start_offset or 0)))


def plan(portal: Portal, since: datetime, until: datetime) -> list[Item]:
    """The portal's calls that started in [since, until], each with its action. Reads the
    statistics of the calls the app's table does not know as done; writes nothing."""
    rows = db.session.scalars(
        select(Call).where(Call.portal_id == portal.id,
                           Call.started_at >= since.astimezone(UTC),
                           Call.started_at <= until.astimezone(UTC))
        .order_by(Call.started_at, Call.id)).all()
    items = [Item(row.id, row.pbx_call_id, original_start(row), row.phone, row.owner_user_id,
                  row.end_status, *_judge(row)) for row in rows]
    db.session.commit()  # nothing written: no transaction stays open during the requests
    look_up = [i.pbx_call_id for i in items if i.action in (Action.SEND, Action.FINISH)]
    found = statistics(portal, look_up) if look_up else {}
    return [replace(i, action=Action.FOUND, note=f"CALL_ID {found[i.pbx_call_id]}",
                    found_call_id=found[i.pbx_call_id]) if i.pbx_call_id in found
            and i.action in (Action.SEND, Action.FINISH) else i for i in items]


def _judge(row: Call) -> tuple[str, str]:
    """What the app's table alone says of a call: (action, note)."""
    if row.finish_outcome == OutcomeKind.DONE.value:
        return Action.DONE, ""
    if row.state == State.SKIPPED.value:
        return Action.SKIP, f"skipped: {row.skip_reason}"
    if row.state == State.UNROUTABLE.value:
        return Action.SKIP, f"unroutable: {row.skip_reason}"
    if row.state in (State.RINGING.value, State.ANSWERED.value, State.INCOMPLETE.value):
        return Action.SKIP, f"still {row.state}: no end yet (the sweeper finishes it)"
    if row.ended_at is None or row.end_status is None:
        return Action.SKIP, "its end never reached the call (status unknown)"
    if row.owner_user_id is None or not row.phone or not row.direction:
        return Action.SKIP, "no owner or number to register"
    if row.b24_call_id is not None and not row.collision and row.register_error is None:
        return Action.FINISH, f"registered as {row.b24_call_id}, not finished"
    if row.register_error is not None and row.register_error.startswith("unknown outcome"):
        return Action.SEND, UNKNOWN_WARNING
    return Action.SEND, ""


def statistics(portal: Portal, external_ids: Sequence[str]) -> dict[str, str]:
    """EXTERNAL_CALL_ID -> CALL_ID of the finished calls in ``voximplant.statistic.get``, by
    the portal's stored chain over the direct path; 50 ids a request, every page read."""
    out: dict[str, str] = {}
    for first in range(0, len(external_ids), CHUNK):
        chunk = list(external_ids[first:first + CHUNK])
        start: Any = 0
        for _ in range(MAX_PAGES):
            body = _statistics_page(portal, {"FILTER": {"EXTERNAL_CALL_ID": chunk},
                                             "start": start})
            for found in body.get("result") or []:
                if isinstance(found, dict) and found.get("EXTERNAL_CALL_ID") and found.get(
                        "CALL_ID"):
                    out.setdefault(str(found["EXTERNAL_CALL_ID"]), str(found["CALL_ID"]))
            start = body.get("next")
            if start in (None, "", 0):
                break
    return out


def _statistics_page(portal: Portal, params: Mapping[str, Any]) -> dict[str, Any]:
    """One page of the statistics, the whole body (its ``next`` included)."""
    return direct.send(portal, lambda snap: direct.rest_client().call(
        snap.client_endpoint, handlers.STATISTICS, params, snap.access_token or ""))


# ------------------------------------------------------------------ sending


def send(portal: Portal, items: Iterable[Item]) -> dict[str, int]:
    """Act on the plan, one call per transaction: mark found calls done, send the missing
    ones. How many calls got each action."""
    counts: dict[str, int] = {}
    for item in items:
        if item.action in (Action.SKIP, Action.DONE):
            continue
        row = handlers.locked(Call.id == item.row_id)
        if row is None or row.finish_outcome == OutcomeKind.DONE.value:
            db.session.rollback()
            continue  # gone, or done meanwhile (a late outcome)
        if item.found_call_id is not None:
            mark_found(row, item.found_call_id, "flask calls reprocess")
        elif item.action == Action.FINISH:
            _send_finish_only(portal, row)
        else:
            _send_call(portal, row)
        db.session.commit()
        counts[item.action] = counts.get(item.action, 0) + 1
    return counts


def mark_found(row: Call, call_id: str, by: str) -> None:
    """The call is in Bitrix24's statistics (finished): bind its CALL_ID, its finish done."""
    row.b24_call_id, row.collision = call_id, False
    row.register_error = None
    if row.state == State.FAILED.value:
        row.state = State.ENDED.value if row.ended_at is not None else State.RINGING.value
    row.finish_params = None
    row.finish_outcome, row.finish_error = OutcomeKind.DONE.value, None
    row.finish_steps = [*(row.finish_steps or ()), {
        "at": utcnow().isoformat(timespec="seconds"), "command": None,
        "method": handlers.STATISTICS, "outcome": OutcomeKind.DONE.value,
        "reason": f"found by EXTERNAL_CALL_ID ({by})"}]
    _recording_again(row)
    recording.when_ready(row)


def _recording_again(row: Call) -> None:
    """A recording skipped because the call never got to Bitrix24 waits for its finish again."""
    if row.record_url and row.record_state == recording.RecordState.SKIPPED.value:
        row.record_state, row.record_error = recording.RecordState.WAITING.value, None
        row.record_attempts = 0


def _send_call(portal: Portal, row: Call) -> None:
    """register and finish back to back under the call's key (one batch), bulk priority."""
    finish = finish_params(portal, row)
    row.replay = REPROCESS
    row.b24_call_id, row.collision, row.refused_user_id = None, False, None
    row.register_error, row.finish_error, row.finish_outcome = None, None, None
    row.finish_params, row.shown = None, []
    row.state = State.ENDED.value
    key = f"call:{row.id}"
    row.register_command_id = submit(
        row.portal_id, machine.REGISTER, register_params(portal, row), key=key,
        priority=Priority.BULK, handler=REGISTERED, context={"call": row.id})
    finish["CALL_ID"] = ref(row.register_command_id, "CALL_ID")
    row.finish_command_id = submit(
        row.portal_id, machine.FINISH, finish, key=key, priority=Priority.BULK,
        handler=handlers.FINISHED, context={"call": row.id})
    _recording_again(row)


def _send_finish_only(portal: Portal, row: Call) -> None:
    """A call registered before whose finish never got through: finish its CALL_ID."""
    assert row.b24_call_id is not None
    finish = finish_params(portal, row)
    finish["CALL_ID"] = row.b24_call_id
    row.replay = row.replay or REPROCESS
    row.finish_params, row.finish_error, row.finish_outcome = None, None, None
    row.state = State.ENDED.value
    row.finish_command_id = submit(
        row.portal_id, machine.FINISH, finish, key=f"call:{row.id}", priority=Priority.BULK,
        handler=handlers.FINISHED, context={"call": row.id})
    _recording_again(row)


def register_params(portal: Portal, row: Call) -> dict[str, Any]:
    """The call's register as the machine sends it (machine._register_params), with its
    original start and owner, and ``SHOW=0``."""
    started = original_start(row)
    assert started is not None
    cfg = current_app.config
    params: dict[str, Any] = {
        "USER_ID": row.owner_user_id,
        "PHONE_NUMBER": row.phone,
        "CALL_START_DATE": started.isoformat(timespec="seconds"),
        "TYPE": 2 if row.direction == "in" else 1,
        "LINE_NUMBER": row.line,
        "EXTERNAL_CALL_ID": row.pbx_call_id,
        "CRM_CREATE": 1 if portal.settings and portal.settings.crm_create else 0,
        "CRM_SOURCE": cfg["TELEPHONY_CRM_SOURCE"] or None,
        "SHOW": 0,
    }
    if row.crm_entity_type and row.crm_entity_id:
        params["CRM_ENTITY_TYPE"], params["CRM_ENTITY_ID"] = row.crm_entity_type, row.crm_entity_id
    return {k: v for k, v in params.items() if v is not None}


def finish_params(portal: Portal, row: Call) -> dict[str, Any]:
    """The call's finish, from the machine itself (status code, duration, finisher), as
    a replay: ``ADD_TO_CHAT=0``. The PBX's ``sip_code`` is not kept: the status maps."""
    call = handlers.state_of(row)
    live = replace(call, state=State.ANSWERED if call.answered_at else State.RINGING,
                   shown=(), seen=(), pending=(), parked=False, replay=True)
    ended = aware(row.ended_at)
    assert ended is not None
    end = {"event": "end", "call_id": row.pbx_call_id, "at": ended.isoformat(),
           "status": row.end_status, "duration": row.duration or 0}
    _, commands = machine.apply(live, end, handlers.policy_for(portal))
    [finish] = [c for c in commands if c.method == machine.FINISH]
    return dict(finish.params)


# ------------------------------------------------------------------ outcomes


def registered(outcome: Outcome) -> None:
    """A reprocessed register's outcome: the CALL_ID bound (its finish is already queued
    behind it), or the call failed with the reason. No fallback user here: the finish in the
    same batch refers to this register and is dead-lettered with it; the call shows why."""
    row = handlers.locked(Call.id == int(outcome.context["call"]))
    if row is None or outcome.command_id != row.register_command_id:
        return
    if outcome.ok:
        if row.b24_call_id is None:
            handlers._bind(row, outcome.result if isinstance(outcome.result, dict) else {})
    else:
        row.register_error = outcome.reason or outcome.kind.value
    if row.register_error is not None:
        row.state = State.FAILED.value
        log.warning("call %s (reprocessed) failed: %s", row.id, row.register_error)
    recording.when_ready(row)


def replay_checked(outcome: Outcome) -> None:
    """The statistics check of a replayed start (handlers.send): a call Bitrix24 lists by
    its EXTERNAL_CALL_ID is bound to that CALL_ID and not registered again; a missing one is
    registered now (``SHOW=0``, bulk). When the check fails the call is not registered (a
    guess could make a second call): it fails, visibly, and ``flask calls reprocess`` can
    send it later."""
    row = handlers.locked(Call.id == int(outcome.context["call"]))
    if row is None or row.register_command_id is not None or row.b24_call_id is not None:
        return
    found = outcome.result if outcome.ok and isinstance(outcome.result, list) else []
    match = [r for r in found if isinstance(r, dict)
             and str(r.get("EXTERNAL_CALL_ID")) == row.pbx_call_id and r.get("CALL_ID")]
    if not outcome.ok:
        row.state = State.FAILED.value
        row.register_error = ("replayed call not registered: voximplant.statistic.get failed "
                              f"({outcome.reason}); flask calls reprocess sends it later")
        log.warning("call %s: %s", row.id, row.register_error)
        if row.finish_params is not None:
            row.finish_outcome = OutcomeKind.DEAD.value
            row.finish_error = f"not finished: {row.register_error}"
            row.finish_params = None
    elif match:
        mark_found(row, str(match[0]["CALL_ID"]), "replayed start")
        log.info("call %s: a replayed call is in Bitrix24 already as %s", row.id,
                 row.b24_call_id)
    else:
        row.register_command_id = submit(
            row.portal_id, machine.REGISTER, dict(outcome.context["register"]),
            key=f"call:{row.id}", priority=Priority.BULK, handler=handlers.REGISTERED,
            context={"call": row.id})
    recording.when_ready(row)


OUTCOME_HANDLERS = {REGISTERED: registered, handlers.REPLAY_CHECKED: replay_checked}
