"""bench.pbx_day's checker: the sandbox's command log, per EXTERNAL_CALL_ID, against the day.

Input: the day that was replayed (bench.pbx_day_gen), the ``at`` each start was posted with,
and the sandbox's ``call_history`` (sandbox/callhistory.py: the telephony commands the
portal executed, grouped by EXTERNAL_CALL_ID, in execution order). Each check counts the
calls that break it; a check whose feature the app does not have yet (recordings) simply
counts violations like any other, it never raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bench.pbx_day_gen import Day, DayCall

OUTGOING = {"no_answer": "480", "busy": "486", "cancelled": "603-S", "failed": "503"}


@dataclass
class Check:
    """One rule of the acceptance list: how many calls it was applied to, which broke it."""

    name: str
    checked: int = 0
    bad: list[str] = field(default_factory=list)  # EXTERNAL_CALL_IDs, with a short why
    note: str = ""
    repeats: int = 0  # only the recordings check: calls whose file was attached again

    def fail(self, call_id: str, why: str) -> None:
        self.bad.append(f"{call_id}: {why}")


def expected_status(call: DayCall) -> str:
    """The finish's STATUS_CODE the mapping asks for (issue 22 point 3)."""
    if call.sip_code:
        return str(call.sip_code)
    if call.status == "answered":
        return "200"
    return "304" if call.direction == "in" else OUTGOING[call.status]


def expected_finisher(call: DayCall, users: dict[str, int], owner: int | None) -> int | None:
    """The last handler's user for an answered call, else the register's owner."""
    if call.status == "answered" and call.handler is not None:
        return users.get(call.handler, owner)
    return owner


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def check(day: Day, sent_at: dict[str, str], history: dict[str, Any]) -> list[Check]:
    """Every acceptance check of the day against the sandbox's call history.

    ``sent_at``: call_id -> the ``at`` its start was posted with (the replay may move the
    day onto the wall clock)."""
    rows = history.get("calls", {})
    registered = Check("registered once")
    finished = Check("finished once")
    hidden = Check("cards hidden before the finish (but the finisher's)")
    after = Check("no show/hide after the finish")
    finisher = Check("finisher is the last handler (unanswered: the owner)")
    status = Check("STATUS_CODE follows the mapping")
    duration = Check("DURATION = talk rounded up, >= 1 (answered)")
    start = Check("CALL_START_DATE within 1 s of the start's at")
    records = Check("one recording per answered call, none otherwise")
    shown = Check("every ringing mapped user was shown the card",
                  note="a hunting queue's ring events are being built (issue 22 point 3)"
                  if any(c.rings for c in day.calls) else "")
    collisions = Check("no CALL_ID bound to two PBX calls")
    strays = Check("no commands for calls the day does not have")
    known = {c.call_id for c in day.calls}
    for key in rows:
        if key not in known:
            strays.fail(key, "not a call of this day")
    strays.checked = len(rows)
    for call in day.calls:
        row = rows.get(call.call_id)
        for c in (registered, finished, hidden, after, finisher, status, start, records, shown):
            c.checked += 1
        if row is None:
            for c in (registered, finished):
                c.fail(call.call_id, "no command in the log")
            continue
        _one(call, row, day, sent_at, registered, finished, hidden, after, finisher, status,
             duration, start, records, shown)
    collisions.checked = sum(len(r.get("call_ids", [])) for r in rows.values())
    for call_id, keys in (history.get("collisions") or {}).items():
        collisions.fail(call_id, f"bound to {', '.join(keys)}")
    return [registered, finished, hidden, after, finisher, status, duration, start, shown,
            collisions, records, strays]


def _one(call: DayCall, row: dict[str, Any], day: Day, sent_at: dict[str, str],
         registered: Check, finished: Check, hidden: Check, after: Check, finisher: Check,
         status: Check, duration: Check, start: Check, records: Check, shown: Check) -> None:
    cid = call.call_id
    if row.get("registered") != 1:
        registered.fail(cid, f"registered {row.get('registered')} times")
    if row.get("finished") != 1:
        finished.fail(cid, f"finished {row.get('finished')} times")
    if row.get("open_at_finish"):
        hidden.fail(cid, f"left open for users {row['open_at_finish']}")
    if row.get("after_finish"):
        after.fail(cid, f"{len(row['after_finish'])} show/hide after the finish")
    owner = next((r.get("owner") for r in row.get("registers", []) if r.get("owner")), None)
    ringing = {day.extensions[e] for e in call.rung if e in day.extensions}
    if ringing - set(row.get("shown_users") or ()):
        shown.fail(cid, f"never shown to {sorted(ringing - set(row['shown_users'] or ()))}")
    if row.get("finished"):
        want = expected_finisher(call, day.extensions, owner)
        if row.get("finisher") != want:
            finisher.fail(cid, f"finisher {row.get('finisher')}, expected {want}")
        if call.status != "answered" and owner is not None and owner not in ringing | {None}:
            finisher.fail(cid, f"owner {owner} is not among the ringing users {sorted(ringing)}")
        if str(row.get("status_code")) != expected_status(call):
            status.fail(cid, f"STATUS_CODE {row.get('status_code')}, "
                             f"expected {expected_status(call)}")
        if call.status == "answered":
            duration.checked += 1
            want_d = max(1, math.ceil(call.duration))
            if row.get("duration") is None or int(row["duration"]) != want_d:
                duration.fail(cid, f"DURATION {row.get('duration')}, expected {want_d}")
    at = sent_at.get(cid)
    if row.get("call_start") is None or at is None:
        start.fail(cid, "no CALL_START_DATE")
    elif abs(float(row["call_start"]) - _epoch(at)) > 1.0:
        start.fail(cid, f"CALL_START_DATE {row.get('call_start_date')} vs at {at}")
    want_records = 1 if call.status == "answered" and call.recording else 0
    got = int(row.get("records", 0) or 0)
    # A re-attach replaces the call's file (protocol §8.13): an attachRecord sent again after
    # its answer was lost still leaves one recording. Counted in the check's note.
    if (got == 0) if want_records else (got != 0):
        records.fail(cid, f"{got} recordings attached, expected {want_records}")
    elif got > 1:
        records.repeats += 1
        records.note = (f"{records.repeats} calls had theirs attached again (a resend after a "
                        "lost answer replaces the file, protocol §8.13)")


def table(checks: list[Check], examples: int = 2) -> str:
    """The checks as a text table: calls checked, violations, a few examples."""
    lines = [f"{'check':<58} {'checked':>8} {'violations':>10}"]
    for c in checks:
        mark = "ok " if not c.bad else "BAD"
        lines.append(f"{mark} {c.name:<54} {c.checked:>8} {len(c.bad):>10}")
        for example in c.bad[:examples]:
            lines.append(f"      e.g. {example[:110]}")
        if c.bad and c.note:
            lines.append(f"      ({c.note})")
    return "\n".join(lines)


def card_latencies(day: Day, accepted: dict[str, float], history: dict[str, Any]
                   ) -> tuple[list[tuple[float, float]], int]:
    """Per call whose start was accepted: (seconds into the day, seconds from its start's 202
    to the moment the sandbox had executed both its register and the show to its ringing
    users); and how many such calls never got there (no register, or a ringing user never
    shown the card), which the quantiles count as infinitely late.

    The sandbox's log times are when each command finished executing on the portal (a
    batch's commands execute one after the other, each with its share of the request's
    latency), i.e. when the card appeared; the app learns it when the batch's answer
    arrives, a loopback hop later."""
    rows = history.get("calls", {})
    out: list[tuple[float, float]] = []
    missing = 0
    for call in day.calls:
        row, t0 = rows.get(call.call_id), accepted.get(call.call_id)
        if t0 is None:
            continue
        regs = [r for r in (row or {}).get("registers", []) if r.get("created")]
        if row is None or not regs:
            missing += 1
            continue
        ringing = {day.extensions[e] for e in call.extensions if e in day.extensions}
        done = float(regs[0]["at"])
        for card in row.get("cards", []):
            if not ringing:
                break
            if card["action"] == "show" and card.get("accepted"):
                ringing -= set(card["users"])
                done = max(done, float(card["at"]))
        if ringing:
            missing += 1
            continue
        out.append((call.start, done - t0))
    return out, missing


def quantiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/max (nearest rank), n."""
    if not values:
        return {"n": 0, "p50": math.nan, "p95": math.nan, "p99": math.nan, "max": math.nan}
    ordered = sorted(values)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]

    return {"n": len(ordered), "p50": q(0.5), "p95": q(0.95), "p99": q(0.99),
            "max": ordered[-1]}


# ------------------------------------------------------------------ faults and operating time

OPERATING = "OPERATION_TIME_LIMIT"


def outcomes(day: Day, history: dict[str, Any], posted: int, stored: int,
             inbox: dict[str, int]) -> dict[str, Any]:
    """Issue 22's faults point, from the sandbox's log and the app's inbox: duplicate calls
    (a second call created for one EXTERNAL_CALL_ID: the sandbox's register dedup did not
    catch a re-sent register), calls left unfinished (no successful finish), lost events
    (posted but not stored, or stored and not done once the app settled); and how the app
    got through unknown outcomes: registers answered by the dedup (a re-sent register that
    created nothing), finishes refused after one succeeded ("Call is not found")."""
    rows = history.get("calls", {})
    duplicates, unfinished = [], []
    dedup_hits = refused_finishes = 0
    for call in day.calls:
        row = rows.get(call.call_id)
        if row is None:
            unfinished.append(call.call_id)
            continue
        if row.get("registered", 0) > 1:
            duplicates.append(call.call_id)
        if not row.get("finished"):
            unfinished.append(call.call_id)
        dedup_hits += sum(1 for r in row.get("registers", []) if r.get("created") is False)
        refused_finishes += sum(1 for f in row.get("finishes", []) if not f.get("ok"))
    not_done = {k: v for k, v in inbox.items() if k != "done"}
    return {"duplicate_calls": duplicates, "unfinished": unfinished,
            "events_posted": posted, "events_stored": stored,
            "events_not_stored": max(0, posted - stored),
            "inbox_not_done": not_done,
            "lost_events": max(0, posted - stored) + sum(not_done.values()),
            "registers_deduplicated": dedup_hits, "finishes_refused": refused_finishes}


def dead_letter_reasons(dead: list[tuple[int, str, str]]) -> dict[str, int]:
    """Dead outbox commands by ``method: reason``: OPERATION_TIME_LIMIT wherever the reason
    names it, else the reason up to its first colon (``unknown outcome``, an error code)."""
    out: dict[str, int] = {}
    for _, method, reason in dead:
        kind = OPERATING if OPERATING in reason else (reason.split(":", 1)[0][:60] or "?")
        key = f"{method}: {kind}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def operating_dead(reasons: dict[str, int]) -> int:
    """How many dead letters are OPERATION_TIME_LIMIT's."""
    return sum(n for k, n in reasons.items() if k.endswith(": " + OPERATING))


def fault_targets(writes: list[dict[str, Any]], by_kind: dict[str, int]) -> int:
    """About how many REST requests called register or finish (what the faults' rates apply
    to): those the portal executed with one of them (``writes``: its log's register and
    finish entries; a batch counts once), and those a fault stopped before they ran (every
    kind in ``by_kind`` but executed_504)."""
    batches = {e["batch_id"] for e in writes if e.get("batch_id")}
    singles = sum(1 for e in writes if not e.get("batch_id"))
    return len(batches) + singles + sum(n for k, n in by_kind.items() if k != "executed_504")


def registers_behind_finishes(writes: list[dict[str, Any]]) -> dict[str, Any]:
    """Registers the portal executed in a batch after finishes of the same batch (a batch's
    commands run one after the other: each finish's cost delays the cards behind it):
    how many, of how many registers, and the most finishes ahead of one."""
    seen: dict[str, int] = {}  # batch_id -> finishes executed so far
    registers = behind = most = 0
    for e in writes:  # in execution order
        batch = e.get("batch_id")
        if e["method"].endswith(".finish"):
            if batch:
                seen[batch] = seen.get(batch, 0) + 1
            continue
        registers += 1
        ahead = seen.get(batch, 0) if batch else 0
        if ahead:
            behind += 1
            most = max(most, ahead)
    return {"registers": registers, "behind_finishes": behind, "most_finishes_ahead": most}
