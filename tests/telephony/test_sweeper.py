"""The calls' sweeper: a call whose end never comes is finished through the state machine
(the others' cards hidden first, a stated status, at most once, racing a real end safely);
events whose start never comes are parked, visible, and retried by ``flask calls retry``.
The last test runs the periodic actor in a real worker against the sandbox portal."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from app.dispatcher import OutcomeKind
from app.extensions import db
from app.ingress import auth
from app.ingress.models import InboxEvent
from app.telephony import handlers, sweeper
from app.telephony.models import Call
from app.tenants.models import Portal, utcnow
from tests.conftest import wait_for
from tests.ingress.conftest import make_portal
from tests.telephony.conftest import (
    dispatching_worker,
    employees,
    map_extensions,
    pbx,
    poster,
    sandbox_line,
)
from tests.telephony.test_end_to_end import USERS, card_log, cards_left_open, finished, stat
from tests.telephony.test_handlers import START, commands, feed, settle
from tests.tenants.conftest import CLIENT_ID, CLIENT_SECRET, oauth_app  # noqa: F401 - fixture

FINISH = "telephony.externalcall.finish"
HIDE = "telephony.externalcall.hide"


@pytest.fixture
def portal(app: Any) -> Any:
    portal = make_portal()
    map_extensions(portal, {"101": 1, "102": 2, "103": 3})
    return portal


def hours_later(hours: float) -> Any:
    return utcnow() + timedelta(hours=hours)


def methods(call: Call) -> list[str]:
    return [c.method.rsplit(".", 1)[1] for c in commands(call)]


def _calls(app: Any, *args: str) -> Any:
    result = app.test_cli_runner().invoke(args=["calls", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_a_ringing_call_without_an_end_is_finished_as_a_304_after_the_timeout(app, portal):
    call = feed(portal, pbx("c1", "start", 0, **START))
    settle(commands(call)[0], OutcomeKind.DONE, {"CALL_ID": "externalCall.1"})
    assert sweeper.sweep(hours_later(3.9)).finished == 0, "not yet: 4 hours by default"
    assert sweeper.sweep(hours_later(4.1)).finished == 1
    db.session.expire_all()
    *_, hide, finish = commands(call)
    assert (hide.method, hide.params["USER_ID"]) == (HIDE, [2]), "the others' cards first"
    assert finish.method == FINISH and finish.params == {
        "CALL_ID": "externalCall.1", "USER_ID": 1, "DURATION": 0, "STATUS_CODE": "304",
        "FAILED_REASON": "no end from the PBX", "ADD_TO_CHAT": 1}
    assert (call.state, call.end_status) == ("ended", "swept")
    assert sweeper.sweep(hours_later(5)).finished == 0, "finished once"
    call = feed(portal, pbx("c1", "end", 30, status="no_answer", duration=0))
    assert methods(call).count("finish") == 1, "a late real end is a duplicate"
    assert call.end_status == "swept"


def test_an_answered_call_without_an_end_is_finished_by_its_handler_with_other(app, portal):
    call = feed(portal, pbx("c1", "start", 0, **START), pbx("c1", "answer", 3, extension="102"))
    sweeper.sweep(hours_later(5))
    register = commands(call)[0]
    settle(register, OutcomeKind.DONE, {"CALL_ID": "externalCall.2"})
    *_, finish = commands(call)
    assert (finish.params["USER_ID"], finish.params["STATUS_CODE"],
            finish.params["DURATION"]) == (2, "OTHER", 0), "no made-up talk time, no 200"


def test_a_real_end_racing_the_sweep_wins_and_the_call_is_finished_once(app, portal):
    call = feed(portal, pbx("c1", "start", 0, **START))
    register = commands(call)[0]
    locked, go = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def real_end() -> None:  # the PBX's end: the call's row locked, then a pause
        with app.app_context():
            try:
                here = db.session.get(Portal, portal.id)
                handlers.on_call_event(here, {**pbx("c1", "end", 30, status="busy",
                                                    duration=0), "inbox_id": 1})
                locked.set()
                go.wait(10)
                db.session.commit()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                locked.set()

    swept: list[Any] = []

    def sweep() -> None:
        with app.app_context():
            try:
                swept.append(sweeper.sweep(hours_later(5)))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    first = threading.Thread(target=real_end)
    first.start()
    assert locked.wait(10)
    second = threading.Thread(target=sweep)
    second.start()
    time.sleep(0.5)  # the sweep now waits for the call's lock
    go.set()
    first.join(20)
    second.join(20)
    assert errors == [] and swept[0].finished == 0
    settle(register, OutcomeKind.DONE, {"CALL_ID": "externalCall.3"})
    db.session.expire_all()
    finishes = [c for c in commands(call) if c.method == FINISH]
    assert len(finishes) == 1 and finishes[0].params["FAILED_REASON"] == "busy"
    assert call.end_status == "busy"


def test_a_call_with_an_event_still_in_the_inbox_is_left_for_it(app, portal):
    call = feed(portal, pbx("c1", "start", 0, **START))
    waiting = InboxEvent(portal_id=portal.id, member_id=portal.member_id, source="pbx",
                         event_type="end", dedupe_key="x" * 64, payload={}, status="queued",
                         order_key="c1")
    db.session.add(waiting)
    db.session.commit()
    assert sweeper.sweep(hours_later(5)).left == 1
    waiting.status = "done"
    db.session.commit()
    assert sweeper.sweep(hours_later(5)).finished == 1
    assert "finish" in methods(call) or call.finish_params is not None


def test_a_held_portals_calls_wait_for_it(app, portal):
    call = feed(portal, pbx("c1", "start", 0, **START))
    portal.status = "auth_failed"
    db.session.commit()
    assert sweeper.sweep(hours_later(5)).finished == 0
    db.session.expire_all()
    assert call.state == "ringing"


def test_events_without_their_start_are_parked_shown_and_retried_once_it_comes(app, portal):
    call = feed(portal, pbx("c1", "answer", 5, extension="102"),
                pbx("c1", "end", 50, status="answered", duration=40))
    assert sweeper.sweep(utcnow() + timedelta(minutes=9)).parked == 0, "10 minutes by default"
    assert sweeper.sweep(utcnow() + timedelta(minutes=11)).parked == 1
    shown = _calls(app, "show", "--state", "incomplete")
    assert "parked: 2 event(s) waited 6" in shown and "s for its start" in shown
    assert "2 event(s) still wait for the start" in _calls(app, "retry", "c1")
    call = feed(portal, pbx("c1", "start", 0, **START))  # the late start
    assert methods(call) == ["register"], "registered with the start's number; no card"
    assert call.state == "ringing" and len(call.pending) == 2
    assert f"flask calls retry {call.id}" in _calls(app, "show")
    settle(commands(call)[0], OutcomeKind.DONE, {"CALL_ID": "externalCall.4"})
    out = _calls(app, "retry", "--member-id", portal.member_id)
    assert "applied 2 event(s)" in out
    db.session.expire_all()
    assert methods(call) == ["register", "show", "finish"]
    assert commands(call)[-1].params["STATUS_CODE"] == "200"
    assert (call.state, call.pending, call.parked_at) == ("ended", [], None)
    assert "no parked calls" in _calls(app, "retry", "--member-id", portal.member_id)


def test_the_sweep_applies_a_parked_calls_events_before_ending_it(app, portal):
    feed(portal, pbx("c1", "answer", 5, extension="102"))
    sweeper.sweep(utcnow() + timedelta(minutes=11))
    call = feed(portal, pbx("c1", "start", 0, **START))
    sweeper.sweep(hours_later(5))
    settle(commands(call)[0], OutcomeKind.DONE, {"CALL_ID": "externalCall.5"})
    db.session.expire_all()
    assert methods(call) == ["register", "show", "hide", "finish"]
    assert commands(call)[-1].params["USER_ID"] == 2, "the answerer, from the parked answer"


@pytest.fixture
def swept_line(oauth_app: Any, sandbox: Any, client: Any,  # noqa: F811 - the imported fixture
               start_worker: Any, redis_client: Any) -> dict[str, Any]:
    """test_end_to_end's sandbox line, with a worker whose sweep runs every second and
    finishes calls 3 s after their first event."""
    portal, info = sandbox_line(sandbox, employees(USERS), USERS)
    key = auth.issue_api_key(portal)
    dispatching_worker(start_worker, redis_client, TELEPHONY_SWEEP_INTERVAL="1",
                       TELEPHONY_END_TIMEOUT="3")
    return {"member_id": info["member_id"], "portal_id": portal.id,
            "post": poster(client, key)}


def _handled(portal_id: int, pbx_call_id: str, kind: str) -> bool:
    db.session.expire_all()
    return db.session.scalar(select(InboxEvent.status).where(
        InboxEvent.portal_id == portal_id, InboxEvent.order_key == pbx_call_id,
        InboxEvent.event_type == kind)) == "done"


@pytest.mark.timeout(180)
def test_the_periodic_sweep_finishes_a_call_on_the_portal_and_a_late_end_changes_nothing(
        swept_line, sandbox):
    swept_line["post"](pbx("lost-1", "start", 0, direction="in", phone="+4930999777",
                           extensions=["101", "102"]))
    call = wait_for(lambda: finished(swept_line["portal_id"], "lost-1"), timeout=60)
    assert (call.end_status, call.finish_outcome) == ("swept", "done")
    log = card_log(sandbox, swept_line["member_id"], "lost-1")
    assert log == [("register", 1), ("show", [1, 2]), ("hide", [2]), ("finish", 1)]
    assert cards_left_open(log) == set()
    found = stat(sandbox, swept_line["member_id"], "lost-1")
    assert (found["CALL_FAILED_CODE"], found["CALL_FAILED_REASON"], found["CALL_STATUS"]) == (
        "304", "no end from the PBX", 0)
    assert sandbox.calls(swept_line["member_id"])["active"] == []
    swept_line["post"](pbx("lost-1", "end", 40, status="answered", duration=35))
    wait_for(lambda: _handled(swept_line["portal_id"], "lost-1", "end"), timeout=60)
    assert card_log(sandbox, swept_line["member_id"], "lost-1") == log, "a duplicate now"
