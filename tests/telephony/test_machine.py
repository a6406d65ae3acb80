"""The call state machine (pure): protocol §8.11's mapping, its traps, and properties over
any order of events."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.telephony.machine import (
    CALL_ID,
    FINISH,
    HIDE,
    REGISTER,
    SHOW,
    SWEPT,
    Call,
    Command,
    Policy,
    State,
    apply,
    normalise_phone,
    park,
    retry,
)

EXT = {"101": 1, "102": 2, "103": 3, "104": 4}
POLICY = Policy(extensions=EXT, fallback_user=9, default_country="DE", crm_create=True,
                crm_source="CALL")


def ev(kind: str, second: int, **fields: Any) -> dict[str, Any]:
    return {"call_id": "pbx-1", "event": kind, "at": f"2026-11-22T16:40:{second:02d}+03:00",
            **fields}


START = ev("start", 0, direction="in", phone="030 1234567", extensions=["101", "102", "103"],
           line="+4930555")


def run(events: list[dict[str, Any]], policy: Policy = POLICY) -> tuple[Call, list[Command]]:
    call, out = Call(), []
    for event in events:
        call, commands = apply(call, event, policy)
        out += commands
    return call, out


def steps(commands: list[Command]) -> list[tuple[str, Any]]:
    short = {REGISTER: "register", SHOW: "show", HIDE: "hide", FINISH: "finish"}
    return [(short[c.method], c.params.get("USER_ID")) for c in commands]


def test_start_registers_without_the_card_then_shows_it_to_every_ringing_user():
    call, commands = run([START])
    register, show = commands
    assert register.method == REGISTER and register.params == {
        "USER_ID": 1, "PHONE_NUMBER": "+49301234567",
        "CALL_START_DATE": "2026-11-22T16:40:00+03:00", "TYPE": 2, "LINE_NUMBER": "+4930555",
        "EXTERNAL_CALL_ID": "pbx-1", "CRM_CREATE": 1, "CRM_SOURCE": "CALL", "SHOW": 0}
    assert show.params == {"CALL_ID": CALL_ID, "USER_ID": [1, 2, 3]}
    assert (call.state, call.owner, call.ringing, call.shown) == (State.RINGING, 1, (1, 2, 3),
                                                                   (1, 2, 3))


def test_the_start_date_keeps_its_offset_to_the_second_and_utc_stays_utc():
    _, [register, _] = run([{**START, "at": "2026-11-22T13:40:00.734Z"}])
    assert register.params["CALL_START_DATE"] == "2026-11-22T13:40:00+00:00"


def test_outgoing_is_type_1_and_crm_flags_are_0_or_1_never_y_or_n():
    _, [register, show] = run([{**START, "direction": "out", "extensions": ["104"]}],
                              Policy(extensions=EXT))
    assert register.params["TYPE"] == 1 and register.params["USER_ID"] == 4
    assert register.params["CRM_CREATE"] == 0 and register.params["SHOW"] == 0
    assert "CRM_SOURCE" not in register.params, "no source set: left out, not sent as \"\""
    assert show.params["USER_ID"] == [4]


def test_no_parameter_is_ever_none_or_empty():
    bare = {k: v for k, v in START.items() if k != "line"}
    _, commands = run([bare, ev("answer", 5, extension="999"), ev("end", 9, status="answered",
                                                                  duration=3)],
                      Policy(extensions=EXT))
    for command in commands:
        assert all(v not in (None, "") for v in command.params.values()), command


def test_unmapped_ringing_falls_back_to_the_fallback_user_whose_card_is_not_shown():
    call, commands = run([{**START, "extensions": ["555"]}])
    assert steps(commands) == [("register", 9)]
    assert call.owner == 9 and call.shown == ()


def test_no_mapped_user_and_no_fallback_is_unroutable_and_sends_nothing():
    call, commands = run([{**START, "extensions": ["555"]}, ev("end", 3, status="no_answer",
                                                               duration=0)],
                         Policy(extensions=EXT))
    assert commands == [] and call.state is State.UNROUTABLE and call.skip_reason


def test_anonymous_and_internal_calls_are_skipped_by_default():
    for phone in ("anonymous", "Unknown", "", "102"):
        call, commands = run([{**START, "phone": phone}, ev("end", 3, status="answered",
                                                            duration=4)])
        assert commands == [] and call.state is State.SKIPPED, phone


def test_internal_and_anonymous_calls_register_when_the_policy_says_so():
    policy = Policy(extensions=EXT, internal="register", anonymous="register",
                    anonymous_number="0000")
    _, [internal, _] = run([{**START, "phone": "104"}], policy)
    assert internal.params["PHONE_NUMBER"] == "104"
    _, [anonymous, _] = run([{**START, "phone": "anonymous"}], policy)
    assert anonymous.params["PHONE_NUMBER"] == "0000"


def test_answer_hides_the_others_and_shows_the_answerer_only_if_not_shown():
    call, commands = run([START, ev("answer", 5, extension="102")])
    assert steps(commands[2:]) == [("hide", [1, 3])]
    assert (call.answerer, call.handler, call.shown, call.hidden) == (2, 2, (2,), (1, 3))
    call, commands = run([{**START, "extensions": ["101"]}, ev("answer", 5, extension="104")])
    assert steps(commands[2:]) == [("hide", [1]), ("show", 4)]


def test_transfer_shows_the_new_handler_then_hides_the_previous_one():
    call, commands = run([START, ev("answer", 5, extension="102"),
                          ev("transfer", 20, from_extension="102", to_extension="104")])
    assert steps(commands[3:]) == [("show", 4), ("hide", [2])]
    assert call.handler == 4 and call.shown == (4,)


def test_answered_end_hides_the_rest_and_the_last_handler_finishes_with_200():
    call, commands = run([START, ev("answer", 5, extension="102"),
                          ev("transfer", 20, from_extension="102", to_extension="104"),
                          ev("end", 50, status="answered", duration=29.2)])
    assert steps(commands) == [("register", 1), ("show", [1, 2, 3]), ("hide", [1, 3]),
                               ("show", 4), ("hide", [2]), ("finish", 4)]
    assert commands[-1].params == {"CALL_ID": CALL_ID, "USER_ID": 4, "DURATION": 30,
                                   "STATUS_CODE": "200", "ADD_TO_CHAT": 1}
    assert call.state is State.ENDED and call.shown == ()


def test_an_answered_call_of_zero_seconds_still_lasts_one():
    _, commands = run([START, ev("answer", 1, extension="101"),
                       ev("end", 1, status="answered", duration=0)])
    assert commands[-1].params["DURATION"] == 1, "DURATION 0 makes it unsuccessful (§8.5)"


def test_every_unanswered_incoming_call_is_a_304_missed_call_with_the_detail():
    for status, reason in (("no_answer", "no answer"), ("busy", "busy"),
                           ("cancelled", "caller hung up"), ("failed", "failed")):
        _, commands = run([START, ev("end", 9, status=status, duration=0)])
        assert steps(commands[2:]) == [("hide", [2, 3]), ("finish", 1)], status
        assert commands[-1].params["STATUS_CODE"] == "304"
        assert commands[-1].params["FAILED_REASON"] == reason
        assert commands[-1].params["DURATION"] == 0


def test_outgoing_unanswered_codes_and_a_sip_code_override():
    out = {**START, "direction": "out", "extensions": ["104"]}
    codes = {s: run([out, ev("end", 9, status=s, duration=0)])[1][-1].params["STATUS_CODE"]
             for s in ("no_answer", "busy", "cancelled", "failed")}
    assert codes == {"no_answer": "480", "busy": "486", "cancelled": "603-S", "failed": "503"}
    _, commands = run([out, ev("end", 9, status="failed", duration=0, sip_code=404)])
    assert commands[-1].params["STATUS_CODE"] == "404"


def test_end_is_absorbing_and_duplicates_change_nothing():
    events = [START, ev("answer", 5, extension="102"), ev("end", 9, status="answered",
                                                           duration=4)]
    call, commands = run(events)
    for late in (START, ev("answer", 30, extension="101"),
                 ev("transfer", 31, from_extension="102", to_extension="101"),
                 ev("end", 40, status="busy", duration=0)):
        again, more = apply(call, late, POLICY)
        assert (again, more) == (call, []), late["event"]
    ringing, _ = run([START, ev("answer", 5, extension="102")])
    assert apply(ringing, ev("answer", 8, extension="103"), POLICY) == (ringing, [])
    assert apply(ringing, {**START, "at": "2026-11-22T16:41:00+03:00"}, POLICY) == (ringing, [])


def test_events_before_their_start_wait_for_it_and_are_applied_in_order():
    late_start = [ev("end", 50, status="answered", duration=30),
                  ev("answer", 5, extension="102"), START]
    call, commands = run(late_start[:2])
    assert commands == [] and call.state is State.INCOMPLETE and len(call.pending) == 2
    call, commands = run(late_start)
    assert steps(commands) == [("register", 1), ("show", [1, 2, 3]), ("hide", [1, 3]),
                               ("finish", 2)]
    assert call.state is State.ENDED and call.pending == ()


def test_phone_numbers_become_e164_with_the_default_country():
    assert normalise_phone("+7 (495) 123-45-67", None) == "+74951234567"
    assert normalise_phone("8 495 123 45 67", "RU") == "+74951234567"
    assert normalise_phone("030/1234567", "DE") == "+49301234567"
    assert normalise_phone("0301234567", None) == "0301234567", "no country: kept as dialled"
    assert normalise_phone("anonymous", "DE") is None


def test_a_hunting_queue_shows_each_ringing_phone_its_card_and_hides_it_when_it_stops():
    queue = {**START, "extensions": ["600"]}  # the queue's own number: nobody's phone
    call, commands = run([queue, ev("ring", 1, extension="101"),
                          ev("ring_end", 16, extension="101"),
                          ev("ring", 16, extension="102"), ev("answer", 20, extension="102"),
                          ev("ring_end", 20, extension="102"),
                          ev("end", 59, status="answered", duration=39)])
    assert steps(commands) == [("register", 9), ("show", 1), ("hide", [1]), ("show", 2),
                               ("finish", 2)]
    assert call.ringing == (1, 2) and call.shown == ()


def test_a_ring_after_the_answer_or_for_an_unmapped_phone_shows_nothing():
    call, commands = run([START, ev("answer", 5, extension="102"), ev("ring", 6, extension="104"),
                          ev("ring", 7, extension="555"), ev("ring_end", 8, extension="103")])
    assert steps(commands[2:]) == [("hide", [1, 3])]
    assert call.shown == (2,)


def test_a_ring_end_that_overtook_its_ring_keeps_the_card_from_showing_later():
    _, commands = run([START, ev("ring_end", 9, extension="104"), ev("ring", 8, extension="104")])
    assert steps(commands) == [("register", 1), ("show", [1, 2, 3])]


@pytest.mark.parametrize("first, again", [
    (ev("answer", 5, extension="102"), ev("answer", 9, extension="103")),
    (ev("ring", 5, extension="104"), ev("ring", 30, extension="104")),
    (ev("ring_end", 5, extension="101"), ev("ring_end", 30, extension="101")),
    (ev("transfer", 9, from_extension="102", to_extension="104"),
     ev("transfer", 40, from_extension="102", to_extension="104")),
], ids=["answer", "ring", "ring_end", "transfer"])
def test_a_duplicate_of_every_kind_changes_nothing_even_with_a_later_at(first, again):
    call, _ = run([START, ev("answer", 4, extension="102")] if first["event"] == "transfer"
                  else [START])
    call, _ = apply(call, first, POLICY)
    assert apply(call, again, POLICY) == (call, []), again["event"]


def test_a_transfer_repeated_after_the_call_moved_on_does_not_pull_it_back():
    call, commands = run([START, ev("answer", 4, extension="102"),
                          ev("transfer", 9, from_extension="102", to_extension="104"),
                          ev("transfer", 20, from_extension="104", to_extension="103"),
                          ev("transfer", 21, from_extension="102", to_extension="104"),  # again
                          ev("end", 50, status="answered", duration=30)])
    assert steps(commands[3:]) == [("show", 4), ("hide", [2]), ("show", 3), ("hide", [4]),
                                   ("finish", 3)]


def test_the_sweepers_end_of_a_call_nobody_answered_is_a_304_missed_call_without_time():
    call, commands = run([START, ev("end", 59, status=SWEPT, duration=0)])
    assert steps(commands[2:]) == [("hide", [2, 3]), ("finish", 1)]
    assert commands[-1].params == {"CALL_ID": CALL_ID, "USER_ID": 1, "DURATION": 0,
                                   "STATUS_CODE": "304", "FAILED_REASON": "no end from the PBX",
                                   "ADD_TO_CHAT": 1}
    assert call.state is State.ENDED and call.end_status == SWEPT


def test_the_sweepers_end_of_an_answered_call_is_other_by_the_last_handler_without_200():
    call, commands = run([START, ev("answer", 5, extension="102"),
                          ev("transfer", 9, from_extension="102", to_extension="104"),
                          ev("end", 59, status=SWEPT, duration=0)])
    assert steps(commands[-1:]) == [("finish", 4)]
    finish = commands[-1].params
    assert (finish["STATUS_CODE"], finish["DURATION"]) == ("OTHER", 0), "the talk time is unknown"
    assert finish["FAILED_REASON"] == "no end from the PBX"
    _, [*_, outgoing] = run([{**START, "direction": "out"}, ev("end", 59, status=SWEPT,
                                                               duration=0)])
    assert outgoing.params["STATUS_CODE"] == "OTHER"


def test_a_parked_call_registers_on_its_late_start_and_its_events_wait_for_retry():
    early = [ev("answer", 5, extension="102"), ev("end", 50, status="answered", duration=30)]
    call, _ = run(early)
    call = park(call)
    call, commands = apply(call, START, POLICY)
    assert steps(commands) == [("register", 1)], "registered, but no card: the call is over"
    assert call.state is State.RINGING and len(call.pending) == 2 and call.parked
    call, commands = retry(call, POLICY)
    assert steps(commands) == [("show", 2), ("finish", 2)]
    assert commands[-1].params["STATUS_CODE"] == "200" and commands[-1].params["DURATION"] == 30
    assert call.state is State.ENDED and call.pending == () and not call.parked


def test_a_parked_answer_alone_still_shows_the_card_on_the_late_start():
    call, _ = run([ev("answer", 5, extension="102")])
    call, commands = apply(park(call), START, POLICY)
    assert steps(commands) == [("register", 1), ("show", [1, 2, 3])]


def test_retry_without_a_start_registers_nothing():
    call, _ = run([ev("end", 50, status="answered", duration=30)])
    assert retry(park(call), POLICY) == (park(call), [])


def test_the_start_keeps_caller_name_and_origin_id_and_record_is_left_to_the_handlers():
    call, _ = run([{**START, "caller_name": "ACME", "origin_id": "externalCall.9"}])
    assert (call.caller_name, call.origin_id) == ("ACME", "externalCall.9")
    record = ev("record", 60, url="https://pbx/r.mp3")
    assert apply(call, record, POLICY) == (call, [])
    early, _ = run([record])
    assert early == Call(), "not the machine's: the record handler keeps it"


# ------------------------------------------------------------------ properties

EXTENSIONS = st.sampled_from(["101", "102", "103", "104", "555"])
SECOND = st.integers(min_value=0, max_value=59)


@st.composite
def call_events(draw: Any) -> list[dict[str, Any]]:
    """A call's events in any order, with duplicates, transfers and unmapped extensions."""
    start = ev("start", draw(SECOND), direction=draw(st.sampled_from(["in", "out"])),
               phone="+4930123456", extensions=draw(st.lists(EXTENSIONS, min_size=1,
                                                             max_size=4)))
    events = [start]
    if draw(st.booleans()):
        events.append(ev("answer", draw(SECOND), extension=draw(EXTENSIONS)))
    for _ in range(draw(st.integers(0, 3))):
        events.append(ev("transfer", draw(SECOND), from_extension=draw(EXTENSIONS),
                         to_extension=draw(EXTENSIONS)))
    if draw(st.booleans()):
        events.append(ev("end", draw(SECOND), duration=draw(st.integers(0, 600)),
                         status=draw(st.sampled_from(["answered", "busy", "no_answer",
                                                      "cancelled", "failed"]))))
    events += draw(st.lists(st.sampled_from(events), max_size=3))  # duplicates
    return draw(st.permutations(events))


def _replay(commands: list[Command]) -> list[str]:
    """Play the commands on a card model (§8.4: finish hides for its own user); the faults."""
    cards: set[int] = set()
    faults: list[str] = []
    registered = finished = False
    for c in commands:
        users = c.params.get("USER_ID")
        users = set(users) if isinstance(users, list) else {users}
        if finished:
            faults.append(f"{c.method} after finish")
        if c.method == REGISTER:
            faults += ["second register"] if registered else []
            registered = True
        elif not registered:
            faults.append(f"{c.method} before register")
        if c.method == SHOW:
            cards |= users
        elif c.method == HIDE:
            cards -= users
        elif c.method == FINISH:
            faults += [f"card left open for {sorted(cards - users)}"] if cards - users else []
            finished = True
    return faults


@settings(max_examples=400, deadline=None)
@given(call_events())
def test_any_order_gives_one_register_one_finish_and_no_card_left_open(events):
    call, commands = run(events)
    assert _replay(commands) == []
    methods = [c.method for c in commands]
    assert methods.count(REGISTER) == 1, "every call has a mapped user or the fallback"
    has_end = any(e["event"] == "end" for e in events)
    assert methods.count(FINISH) == (1 if has_end else 0)
    assert call.state is (State.ENDED if has_end else call.state)
    for c in commands:
        assert all(v not in (None, "") for v in c.params.values())


@settings(max_examples=200, deadline=None)
@given(call_events())
def test_a_missed_incoming_call_is_always_304_and_an_answered_one_200_and_at_least_1s(events):
    _, commands = run(events)
    ends = [e for e in events if e["event"] == "end"]
    start = next(e for e in events if e["event"] == "start")
    if not ends:
        return
    first_end = min(ends, key=lambda e: events.index(e))
    finish = commands[-1].params
    if first_end["status"] == "answered":
        assert finish["STATUS_CODE"] == "200" and finish["DURATION"] >= 1
    elif start["direction"] == "in":
        assert finish["STATUS_CODE"] == "304" and finish["DURATION"] == 0


def test_an_absurd_duration_is_held_to_what_the_table_can_store():
    _, commands = run([START, ev("end", 9, status="answered", duration=1e308)])
    assert commands[-1].params["DURATION"] == 2**31 - 1


def later(event: dict[str, Any], second: int) -> dict[str, Any]:
    """The same event again, sent later."""
    return {**event, "at": f"2026-11-22T16:41:{second:02d}+03:00"}


@st.composite
def hunting_events(draw: Any) -> list[dict[str, Any]]:
    """A call's events with a hunting queue's rings, in any order of arrival, with duplicates
    (some of them sent again with a later ``at``)."""
    start = ev("start", draw(SECOND), direction=draw(st.sampled_from(["in", "out"])),
               phone="+4930123456", extensions=draw(st.lists(EXTENSIONS, min_size=1,
                                                             max_size=3)))
    events = [start]
    for _ in range(draw(st.integers(0, 4))):
        events.append(ev(draw(st.sampled_from(["ring", "ring_end"])), draw(SECOND),
                         extension=draw(EXTENSIONS)))
    if draw(st.booleans()):
        events.append(ev("answer", draw(SECOND), extension=draw(EXTENSIONS)))
    for _ in range(draw(st.integers(0, 2))):
        events.append(ev("transfer", draw(SECOND), from_extension=draw(EXTENSIONS),
                         to_extension=draw(EXTENSIONS)))
    if draw(st.booleans()):
        status = draw(st.sampled_from(["answered", "busy", "no_answer", "cancelled", SWEPT]))
        events.append(ev("end", draw(SECOND), status=status,
                         duration=draw(st.integers(0, 600)) if status != SWEPT else 0))
    copies = draw(st.lists(st.tuples(st.sampled_from(events), st.none() | SECOND), max_size=4))
    events += [event if second is None else later(event, second) for event, second in copies]
    return draw(st.permutations(events))


def _cards(commands: list[Command]) -> tuple[list[str], set[int] | None, Any]:
    """Replay on a card model: the faults, the cards open at the finish, its USER_ID."""
    cards: set[int] = set()
    faults: list[str] = []
    at_finish: set[int] | None = None
    finisher = None
    for c in commands:
        users = c.params.get("USER_ID")
        users = set(users) if isinstance(users, list) else {users}
        if at_finish is not None:
            faults.append(f"{c.method} after the finish")
        if c.method == SHOW:
            cards |= users
        elif c.method == HIDE:
            cards -= users
        elif c.method == FINISH:
            at_finish, finisher = set(cards), c.params["USER_ID"]
            cards -= users
    return faults, at_finish, finisher


@settings(max_examples=500, deadline=None)
@given(hunting_events())
def test_any_arrival_of_a_queue_calls_events_keeps_the_card_rules(events):
    call, commands = run(events)
    faults, at_finish, finisher = _cards(commands)
    assert faults == [], "nothing shows or hides after the finish"
    assert [c.method for c in commands].count(FINISH) <= 1, "finished at most once"
    assert [c.method for c in commands].count(REGISTER) == 1
    if at_finish is None:
        return
    assert at_finish <= {finisher}, "every shown user but the finisher is hidden first"
    with_someone = call.end_status == "answered" or (call.end_status == SWEPT
                                                     and call.answered_at is not None)
    if with_someone and call.handler is not None:
        assert finisher == call.handler and finisher in at_finish, \
            "the finisher of an answered call holds the card until the finish"


@settings(max_examples=300, deadline=None)
@given(hunting_events(), SECOND)
def test_any_event_sent_again_later_changes_nothing(events, second):
    call, _ = run(events)
    for event in events:
        if event["event"] == "transfer" and call.state is not State.ENDED \
                and EXT.get(event["from_extension"]) == call.handler:
            continue  # the call came back to the one passing it on: a real transfer again
        assert apply(call, later(event, second), POLICY) == (call, []), event["event"]


def test_a_call_passed_back_and_forth_is_transferred_each_time():
    call, commands = run([START, ev("answer", 4, extension="102"),
                          ev("transfer", 9, from_extension="102", to_extension="104"),
                          ev("transfer", 20, from_extension="104", to_extension="102"),
                          ev("transfer", 30, from_extension="102", to_extension="104"),
                          ev("end", 50, status="answered", duration=30)])
    assert steps(commands[3:]) == [("show", 4), ("hide", [2]), ("show", 2), ("hide", [4]),
                                   ("show", 4), ("hide", [2]), ("finish", 4)]
