"""bench.pbx_day's day of calls: the generator and the CSV reader (no stack, no network).

What the replay relies on: every call has a unique id, one start and one end; every event
passes intake's own validator (app/ingress/pbx.py); the share of calls whose start is
posted late is the one asked for, and otherwise a call's start is posted first; the same
seed gives the same day; a customer's CSV with the documented columns becomes the same
events as the day it was written from.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.ingress.pbx import EVENTS, validate_event
from bench import pbx_day_gen as gen
from bench.pbx_day_check import expected_status

RANK = {"start": 0, "answer": 1, "transfer": 2, "end": 3, "record": 4}


def _by_call(day: gen.Day) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for _, _, event in gen.all_events(day):
        out.setdefault(event["call_id"], []).append(event)
    return out


def _assert_well_formed(day: gen.Day) -> dict[str, list[dict]]:
    ids = [c.call_id for c in day.calls]
    assert len(ids) == len(set(ids))
    per_call = _by_call(day)
    assert set(per_call) == set(ids)
    for call in day.calls:
        events = per_call[call.call_id]
        kinds = Counter(e["event"] for e in events)
        assert kinds["start"] == 1 and kinds["end"] == 1, call.call_id
        assert kinds["answer"] == (call.status == "answered")
        assert kinds["record"] == (1 if call.recording else 0)
        for event in events:
            assert validate_event(event)["event"] == event["event"]
        later = [e for e in events if e["event"] != "start"]  # all but a held-up start
        assert [RANK[e["event"]] for e in later] == sorted(RANK[e["event"]] for e in later)
        assert [e["at"] for e in later] == sorted(e["at"] for e in later)
    return per_call


def test_a_generated_day_is_well_formed_and_realistic() -> None:
    day = gen.generate(calls=3000, seed=7)
    per_call = _assert_well_formed(day)
    calls = day.calls
    statuses = Counter(c.status for c in calls)
    assert {"answered", "no_answer", "busy", "cancelled"} <= set(statuses)
    assert 0.6 < sum(c.direction == "in" for c in calls) / len(calls) < 0.8
    incoming = [c for c in calls if c.direction == "in"]
    assert all(2 <= len(c.extensions) <= 6 for c in incoming)  # ring groups
    assert all(len(c.extensions) == 1 for c in calls if c.direction == "out")
    assert {len(c.transfers) for c in calls} == {0, 1, 2, 3}
    assert all(not c.recording for c in calls if c.status != "answered")
    assert any(c.sip_code for c in calls if c.direction == "out")
    # busy hours: more calls start between 10:00 and 12:00 than between 00:00 and 06:00
    assert sum(36000 <= c.start < 43200 for c in calls) > 10 * sum(c.start < 21600 for c in calls)
    # overlapping calls between the same numbers
    by_phone: dict[str, list[gen.DayCall]] = {}
    for c in incoming:
        by_phone.setdefault(c.phone, []).append(c)
    overlapping = sum(1 for group in by_phone.values() for a in group for b in group
                      if a.call_id < b.call_id and a.start < b.start < a.end)
    assert overlapping >= 20
    assert len(per_call) == 3000


def test_the_late_starts_are_the_share_asked_for() -> None:
    day = gen.generate(calls=4000, seed=3, out_of_order=0.05)
    per_call = _by_call(day)
    late = [cid for cid, events in per_call.items() if events[0]["event"] != "start"]
    assert 0.04 < len(late) / 4000 < 0.06
    assert {c.call_id for c in day.calls if c.late_start} == set(late)
    for cid in late:  # posted after its next event, with its own at unchanged (earlier)
        events = per_call[cid]
        start = next(e for e in events if e["event"] == "start")
        assert start["at"] < events[0]["at"]


@settings(max_examples=25, deadline=None)
@given(calls=st.integers(1, 60), seed=st.integers(0, 10**6), late=st.sampled_from([0.0, 1.0]))
def test_any_seed_gives_a_reproducible_well_formed_day(calls: int, seed: int,
                                                       late: float) -> None:
    day = gen.generate(calls=calls, seed=seed, out_of_order=late, extensions=8)
    per_call = _assert_well_formed(day)
    firsts = {events[0]["event"] for events in per_call.values()}
    assert firsts == {"start"} if late == 0.0 else firsts <= {"answer", "end"}
    again = gen.generate(calls=calls, seed=seed, out_of_order=late, extensions=8)
    assert gen.all_events(again) == gen.all_events(day)


def test_a_hunting_queue_rings_one_phone_after_another() -> None:
    day = gen.generate(calls=600, seed=5, hunt=0.5)
    hunting = [c for c in day.calls if c.rings]
    assert len(hunting) > 100
    per_call = _by_call(day)
    for call in hunting:
        events = per_call[call.call_id]
        assert events[0]["event"] == "start" or call.late_start
        ringing = list(call.extensions)  # the phones ringing now, as the events say
        for e in sorted(events, key=lambda e: (e["at"], e["event"] != "ring_end")):
            if e["event"] == "ring_end":
                ringing.remove(e["extension"])
            elif e["event"] == "ring":
                ringing.append(e["extension"])
            elif e["event"] == "answer":
                assert ringing == [e["extension"]]  # who answers is the one ringing
        assert len(ringing) == 1 and call.rung[-1] == ringing[0]
        known = {"start", "answer", "transfer", "end", "record"}
        for e in events:  # intake's validator, for the kinds this tree's intake knows
            if e["event"] in known or e["event"] in EVENTS:
                assert validate_event(e)["event"] == e["event"]


def test_different_seeds_give_different_days() -> None:
    a, b = gen.generate(calls=50, seed=1), gen.generate(calls=50, seed=2)
    assert [c.start for c in a.calls] != [c.start for c in b.calls]


def test_a_written_day_reads_back_as_the_same_events(tmp_path: Path) -> None:
    day = gen.generate(calls=400, seed=11, out_of_order=0.0)
    path = tmp_path / "day.csv"
    gen.write_csv(day, path, served_from="http://127.0.0.1:8099")
    back = gen.read_csv(path, extensions=day.extensions, recordings_url="http://127.0.0.1:7/")
    _assert_well_formed(back)
    assert [c.recording and c.recording.replace(":7/", ":8099/") for c in back.calls] == [
        c.recording for c in day.calls]  # the bench's own recordings travel as "yes"

    def kinds(d: gen.Day) -> list[tuple]:
        return [(e["call_id"], e["event"], e["at"], e.get("extension"), e.get("to_extension"),
                 e.get("status"), e.get("url")) for _, _, e in gen.all_events(d)
                if e["event"] != "record"]  # a record's time is drawn per call, not stored

    assert kinds(back) == kinds(day)


CUSTOMER = "\n".join([
    "call_id,start,answer,end,direction,phone,extensions,answered_by,transfers,status,"
    "duration,recording,note",
    "a1,2026-12-07T09:00:00,2026-12-07T09:00:08,2026-12-07T09:03:00,in,+74951112233,"
    "101;102;103,102,,answered,,yes,first",
    "a2,2026-12-07T09:01:00+03:00,2026-12-07T09:01:05+03:00,2026-12-07T09:05:00+03:00,in,"
    "84951112233,101;104,101,104;105@2026-12-07T09:04:00+03:00,answered,200.5,"
    "https://pbx.example.com/r/a2.wav,",
    "a3,2026-12-07T09:02:00,,2026-12-07T09:02:30,in,+74951112233,101;102,,,no_answer,,,",
    "a4,2026-12-07T09:03:00,,2026-12-07T09:03:09,out,+74957778899,103,,,busy,,,",
    "",
])


def test_a_customer_csv_with_the_documented_columns(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text(CUSTOMER)
    day = gen.read_csv(path, tz_hours=3, recordings_url="http://127.0.0.1:9/")
    per_call = _assert_well_formed(day)
    assert day.extensions == {"101": 1, "102": 2, "103": 3, "104": 4, "105": 5}
    a1 = per_call["a1"]
    assert a1[0]["at"].startswith("2026-12-07T09:00:00") and a1[0]["at"].endswith("+03:00")
    assert a1[0]["extensions"] == ["101", "102", "103"]
    end = next(e for e in a1 if e["event"] == "end")
    assert end["duration"] == 172.0  # from answer to end, the duration column being empty
    assert next(e for e in a1 if e["event"] == "record")["url"] == "http://127.0.0.1:9/rec/a1.mp3"
    a2 = per_call["a2"]
    transfers = [(e["from_extension"], e["to_extension"], e["at"][11:19])
                 for e in a2 if e["event"] == "transfer"]
    assert transfers == [("101", "104", "09:02:23"), ("104", "105", "09:04:00")]
    assert next(e for e in a2 if e["event"] == "record")["url"].endswith("/r/a2.wav")
    assert [e["event"] for e in per_call["a3"]] == ["start", "end"]
    a4 = day.calls[3]
    assert (a4.direction, a4.status, expected_status(a4)) == ("out", "busy", "486")
    assert expected_status(day.calls[2]) == "304"


@pytest.mark.parametrize(("change", "message"), [
    ({"call_id": "a1"}, "row 3, column call_id"),
    ({"status": "lost"}, "row 3, column status"),
    ({"start": "yesterday"}, "row 3, column start"),
    ({"answer": "", "answered_by": ""}, "row 3: an answered call needs"),
    ({"end": "2026-12-07T08:00:00+03:00"}, "row 3: times must run"),
])
def test_a_bad_csv_row_is_named(tmp_path: Path, change: dict[str, str], message: str) -> None:
    rows = list(csv.DictReader(CUSTOMER.splitlines()))
    rows[1].update(change)
    with pytest.raises(gen.CsvError, match=message):
        gen.read_rows(rows)
