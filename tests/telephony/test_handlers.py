"""The handlers in this process: a PBX event's commands land in the outbox in order, with
their keys and priorities; register's outcome binds the CALL_ID, flags a collision and lets
the finish go; finish's outcome is kept."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import select

from app.dispatcher import Outcome, OutcomeKind, Priority, ref
from app.dispatcher.models import OutboxCommand
from app.extensions import db
from app.telephony import handlers
from app.telephony.models import Call
from app.tenants.status import PortalUnavailable
from tests.ingress.conftest import make_portal
from tests.telephony.conftest import map_extensions, pbx

START = {"direction": "in", "phone": "+4930123456", "extensions": ["101", "102"],
         "line": "+4930555"}


@pytest.fixture
def portal(app: Any) -> Any:
    portal = make_portal()
    map_extensions(portal, {"101": 1, "102": 2, "103": 3})
    return portal


def feed(portal: Any, *events: dict[str, Any]) -> Call:
    """Handle the events as the inbox worker would (one commit each); the call's row."""
    for event in events:
        handlers.on_call_event(portal, {**event, "inbox_id": 1, "unverified": False})
        db.session.commit()
    db.session.expire_all()
    return db.session.scalars(select(Call).where(
        Call.pbx_call_id == events[0]["call_id"])).one()


def commands(call: Call) -> list[OutboxCommand]:
    db.session.expire_all()
    return list(db.session.scalars(select(OutboxCommand).where(
        OutboxCommand.key == f"call:{call.id}").order_by(OutboxCommand.id)))


def settle(command: OutboxCommand, kind: OutcomeKind, result: Any = None,
           reason: str | None = None) -> None:
    """Run the command's outcome handler as the settle actor would (one commit)."""
    fn = {handlers.REGISTERED: handlers.registered, handlers.FINISHED: handlers.finished}
    fn[command.handler or ""](Outcome(
        command_id=command.id, portal_id=command.portal_id, method=command.method,
        params=command.params, kind=kind, result=result, reason=reason,
        context=command.context or {}, key=command.key, handler=command.handler))
    db.session.commit()


def test_start_submits_register_then_show_realtime_on_the_calls_key(portal):
    call = feed(portal, pbx("c1", "start", 0, **START))
    register, show = commands(call)
    assert (register.method, register.priority, register.handler) == (
        "telephony.externalcall.register", Priority.REALTIME, handlers.REGISTERED)
    assert register.params["SHOW"] == 0 and register.context == {"call": call.id}
    assert show.params == {"CALL_ID": ref(register.id, "CALL_ID"), "USER_ID": [1, 2]}
    assert show.priority == Priority.REALTIME and show.handler is None
    assert (call.state, call.register_command_id, call.shown) == ("ringing", register.id, [1, 2])


def test_the_finish_waits_for_registers_call_id_then_goes_after_the_hides(portal):
    call = feed(portal, pbx("c1", "start", 0, **START), pbx("c1", "answer", 3, extension="102"),
                pbx("c1", "end", 40, status="answered", duration=36.5))
    register, _, hide = commands(call)  # the answerer finishes: nobody else to hide at the end
    assert (hide.method, hide.params["USER_ID"]) == ("telephony.externalcall.hide", [1])
    assert call.finish_command_id is None and call.finish_params is not None
    settle(register, OutcomeKind.DONE, {"CALL_ID": "externalCall.1", "CRM_ENTITY_TYPE": "",
                                        "CRM_ENTITY_ID": None})
    *_, finish = commands(call)
    assert finish.method == "telephony.externalcall.finish" and finish.priority == Priority.NORMAL
    assert finish.params == {"CALL_ID": "externalCall.1", "USER_ID": 2, "DURATION": 37,
                             "STATUS_CODE": "200", "ADD_TO_CHAT": 1}
    db.session.expire_all()
    assert (call.b24_call_id, call.finish_command_id, call.finish_params) == (
        "externalCall.1", finish.id, None)
    assert call.crm_entity_type is None, "an empty CRM_ENTITY_TYPE is no binding"
    settle(finish, OutcomeKind.DONE, {"ID": 7})
    db.session.expire_all()
    assert (call.finish_outcome, call.finish_error) == ("done", None)


def test_once_the_call_id_is_known_commands_carry_it_and_the_finish_goes_at_once(portal):
    call = feed(portal, pbx("c1", "start", 0, **START))
    settle(commands(call)[0], OutcomeKind.DONE, {"CALL_ID": "externalCall.9",
                                                 "CRM_ENTITY_TYPE": "CONTACT",
                                                 "CRM_ENTITY_ID": 797})
    call = feed(portal, pbx("c1", "end", 30, status="no_answer", duration=0))
    *_, hide, finish = commands(call)
    assert hide.params == {"CALL_ID": "externalCall.9", "USER_ID": [2]}
    assert finish.params["STATUS_CODE"] == "304" and finish.params["USER_ID"] == 1
    assert (call.crm_entity_type, call.crm_entity_id) == ("CONTACT", 797)


def test_a_lead_creation_error_is_kept_and_the_call_goes_on(portal):
    call = feed(portal, pbx("c1", "start", 0, **START),
                pbx("c1", "end", 30, status="busy", duration=0))
    settle(commands(call)[0], OutcomeKind.DONE, {
        "CALL_ID": "externalCall.2", "LEAD_CREATION_ERROR": "Lead creation is disabled for "
                                                            "local users"})
    db.session.expire_all()
    assert call.lead_error.startswith("Lead creation is disabled")
    assert call.register_error is None and call.finish_command_id is not None


def test_a_call_id_bound_to_another_pbx_call_is_a_collision_and_never_finished(portal):
    first = feed(portal, pbx("c1", "start", 0, **START))
    settle(commands(first)[0], OutcomeKind.DONE, {"CALL_ID": "externalCall.same"})
    second = feed(portal, pbx("c2", "start", 1, **START),
                  pbx("c2", "end", 9, status="answered", duration=5))
    settle(commands(second)[0], OutcomeKind.DONE, {"CALL_ID": "externalCall.same"})
    db.session.expire_all()
    assert second.collision and not first.collision
    assert second.finish_command_id is None and "collision" in second.finish_error
    assert "telephony.externalcall.finish" not in [c.method for c in commands(second)]
    first = feed(portal, pbx("c1", "end", 20, status="answered", duration=15))
    assert first.finish_command_id is not None, "the first call is finished as usual"


def test_a_dead_register_is_kept_and_nothing_is_finished(portal):
    call = feed(portal, pbx("c1", "start", 0, **START))
    settle(commands(call)[0], OutcomeKind.DEAD,
           reason="ERROR_CORE: User is not found or is not active")
    call = feed(portal, pbx("c1", "end", 9, status="answered", duration=5))
    assert call.register_error.endswith("not active")
    assert call.state == "failed", "no fallback user: the call failed, later events do nothing"
    assert call.finish_command_id is None and call.finish_params is None


def test_a_settle_run_twice_submits_one_finish(portal):
    call = feed(portal, pbx("c1", "start", 0, **START),
                pbx("c1", "end", 9, status="answered", duration=5))
    register = commands(call)[0]
    settle(register, OutcomeKind.DONE, {"CALL_ID": "externalCall.3"})
    settle(register, OutcomeKind.DONE, {"CALL_ID": "externalCall.3"})
    finishes = [c for c in commands(call) if c.method == "telephony.externalcall.finish"]
    assert len(finishes) == 1


def test_a_held_portals_events_wait(portal):
    portal.status = "auth_failed"
    db.session.commit()
    with pytest.raises(PortalUnavailable):
        handlers.on_call_event(portal, pbx("c1", "start", 0, **START))


def test_an_end_and_registers_outcome_at_the_same_moment_still_give_one_finish(app, portal):
    """The end's handler and register's outcome handler each read the call, then write what
    follows: whichever comes second must see the other's write (or the finish is lost)."""
    call = feed(portal, pbx("c1", "start", 0, **START))
    register = commands(call)[0]
    same_portal = SimpleNamespace(id=portal.id)  # not the test thread's session's object
    locked, go = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def end_handler() -> None:  # the end's part: the call locked, the finish put to wait
        with app.app_context():
            try:
                row = handlers._load(same_portal, "c1")  # type: ignore[arg-type]
                locked.set()
                row.finish_params = {"CALL_ID": "$call", "USER_ID": 1, "DURATION": 5,
                                     "STATUS_CODE": "200"}
                go.wait(10)
                db.session.commit()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                locked.set()

    def outcome_handler() -> None:
        with app.app_context():
            try:
                settle(register, OutcomeKind.DONE, {"CALL_ID": "externalCall.race"})
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    first = threading.Thread(target=end_handler)
    first.start()
    assert locked.wait(10)
    second = threading.Thread(target=outcome_handler)
    second.start()
    time.sleep(0.5)  # the outcome handler is now waiting for the call's lock
    go.set()
    first.join(20)
    second.join(20)
    assert errors == []
    finishes = [c for c in commands(call) if c.method == "telephony.externalcall.finish"]
    assert len(finishes) == 1 and finishes[0].params["CALL_ID"] == "externalCall.race"
