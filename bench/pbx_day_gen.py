"""A day of PBX calls for bench.pbx_day: generated from a seed, or read from a customer's CSV.

Both give a list of :class:`DayCall`; :func:`events` turns one into the PBX events of
app/ingress/PBX_EVENTS.md, each with the moment it is posted (``send``, seconds since the
day's start), which is its ``at`` except for the calls whose start is posted late.

The generated day (:func:`generate`)
------------------------------------
``calls`` calls over 24 hours with an office profile (:data:`HOURLY`: quiet nights, a
morning peak at 10-12, a lunch dip, a second peak at 14-17), among ``extensions`` users
(extension 101 is user 1, 102 user 2, ...):

* incoming (70 %) to a ring group of 2-6 extensions; answered 72 %, no answer 14 %,
  cancelled by the caller 10 %, busy 3 %, failed 1 %;
* outgoing (30 %) from one extension; answered 60 %, no answer 20 %, busy 10 %, cancelled
  8 %, failed 2 %; a fifth of the unanswered ones carry the PBX's own ``sip_code``;
* answered calls get 0-3 transfers (80/13/5/2 %) and a ``record`` event a few seconds
  after the end, with a URL under ``recordings_url``;
* ``overlap`` of the incoming calls come from the number of a call that is still going on,
  to the same ring group (a caller who rings again; Bitrix24's dedup traps, §8.3);
* ``out_of_order`` of the calls have their start posted after a later event of theirs
  (the answer, else the end): a PBX webhook that was held up;
* ``hunt`` (0 by default) of the incoming calls go to a queue of 2-4 phones that rings one
  after another: the start names the first, then a ``ring_end`` and a ``ring`` every 8-15 s
  (optional events of PBX_EVENTS.md that an older intake refuses).

Same seed, same day: every draw comes from one ``random.Random(seed)``.

The CSV (:func:`read_csv`)
--------------------------
One row per call, a header row first, these columns (extra columns are ignored):

============  ============================================================================
column        meaning
============  ============================================================================
call_id       the PBX's id of the call, unique in the file
start         when it started ringing: ISO 8601, with an offset (without one, ``tz``)
answer        when it was answered (empty when it was not)
end           when it ended
direction     ``in`` or ``out``
phone         the outside number
extensions    the extensions that rang, ``;``-separated (``101;102;103``)
answered_by   the extension that answered (empty when nobody did)
transfers     the extensions the call was passed to, in order, ``;``-separated; an item
              may carry its time as ``105@2026-12-07T10:01:30+03:00`` (else spread evenly)
status        ``answered``, ``busy``, ``no_answer``, ``cancelled`` or ``failed``
duration      seconds talked (empty: from answer to end)
recording     a recording's URL; ``yes``/``1`` for one served by the bench; empty for none
sip_code      optional: the call's final SIP code, sent in the end event
============  ============================================================================
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

DAY = 86400.0
# Share of a day's calls started in each hour (an office's PBX; weights, not normalised).
HOURLY = [0.2, 0.1, 0.1, 0.1, 0.1, 0.2, 0.5, 1.5, 4.5, 8.0, 10.0, 10.5,
          9.0, 7.5, 9.5, 10.0, 9.5, 7.5, 4.5, 2.5, 1.5, 1.0, 0.6, 0.3]
IN_OUTCOMES = [("answered", 72), ("no_answer", 14), ("cancelled", 10), ("busy", 3),
               ("failed", 1)]
OUT_OUTCOMES = [("answered", 60), ("no_answer", 20), ("busy", 10), ("cancelled", 8),
                ("failed", 2)]
TRANSFERS = [(0, 80), (1, 13), (2, 5), (3, 2)]
PBX_SIP = {"no_answer": "408", "busy": "486", "cancelled": "487", "failed": "404"}
RECORD_AFTER = (2.0, 15.0)  # seconds after the end the PBX posts the recording
LATE_START = (0.5, 3.0)  # seconds after the later event a held-up start is posted
STATUSES = ("answered", "busy", "no_answer", "cancelled", "failed")


@dataclass
class DayCall:
    """One call of the day; times are seconds since the day's start."""

    call_id: str
    start: float
    direction: str
    phone: str
    extensions: list[str]
    status: str
    end: float
    duration: float = 0.0
    answer: float | None = None
    answered_by: str | None = None
    transfers: list[tuple[float, str, str]] = field(default_factory=list)  # at, from, to
    recording: str | None = None
    line: str | None = None
    sip_code: str | None = None
    late_start: bool = False  # its start is posted after a later event of the call
    rings: list[tuple[float, str, str]] = field(default_factory=list)  # at, ring|ring_end, ext

    @property
    def rung(self) -> list[str]:
        """Every extension whose phone rang: the start's, then those a hunting queue tried."""
        return [*self.extensions, *(e for _, kind, e in self.rings
                                    if kind == "ring" and e not in self.extensions)]

    @property
    def handler(self) -> str | None:
        """The extension that had the call last (the finisher's), None when unanswered."""
        return self.transfers[-1][2] if self.transfers else self.answered_by


@dataclass
class Day:
    """The calls, the day's midnight (its ``at`` zone) and the users' extensions."""

    calls: list[DayCall]
    midnight: datetime
    extensions: dict[str, int]  # extension -> Bitrix24 user id

    def at(self, seconds: float) -> str:
        """An ``at`` value: the day's midnight plus ``seconds``, with its offset."""
        return (self.midnight + timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def _pick(rng: random.Random, table: list[tuple[Any, int]]) -> Any:
    return rng.choices([v for v, _ in table], [w for _, w in table])[0]


def _start_times(rng: random.Random, n: int) -> list[float]:
    hours = rng.choices(range(24), HOURLY, k=n)
    return sorted(h * 3600.0 + rng.random() * 3600.0 for h in hours)


def _phone(rng: random.Random) -> str:
    return f"+7{rng.choice(('495', '499', '812', '916', '926', '903'))}{rng.randrange(10**7):07d}"


def ring_groups(rng: random.Random, extensions: list[str], count: int = 12) -> list[list[str]]:
    """``count`` ring groups of 2-6 extensions each (an extension may be in several)."""
    return [rng.sample(extensions, min(len(extensions), rng.randint(2, 6))) for _ in range(count)]


def generate(calls: int = 18000, seed: int = 1, extensions: int = 60,
             recordings_url: str = "http://127.0.0.1:8099", out_of_order: float = 0.02,
             overlap: float = 0.03, date: str = "2026-12-07", offset_hours: int = 3,
             prefix: str = "day", hunt: float = 0.0) -> Day:
    """A seeded day of ``calls`` calls (see the module docstring); ``hunt`` of the incoming
    calls go to a queue that rings one phone after another (``ring``/``ring_end`` events,
    which only an intake that knows them accepts)."""
    rng = random.Random(seed)
    exts = [str(101 + i) for i in range(extensions)]
    groups = ring_groups(rng, exts)
    lines = [f"+7495{rng.randrange(10**7):07d}" for _ in range(3)]
    out: list[DayCall] = []
    live: list[DayCall] = []  # incoming calls, to find one still going on at a start
    for i, start in enumerate(_start_times(rng, calls)):
        call_id = f"{prefix}-{seed}-{i:06d}"
        live = [c for c in live if c.end > start]
        if rng.random() < 0.7:
            again = live and rng.random() < overlap / 0.7
            if again:
                prior = rng.choice(live)
                phone, group = prior.phone, list(prior.extensions)
            else:
                phone, group = _phone(rng), list(rng.choice(groups))
            if hunt and rng.random() < hunt:
                call = _hunting(rng, call_id, start, phone, rng.sample(exts, rng.randint(2, 4)))
            else:
                call = _incoming(rng, call_id, start, phone, group)
            live.append(call)
        else:
            call = _outgoing(rng, call_id, start, rng.choice(exts))
        call.line = rng.choice(lines)
        if call.status == "answered":
            call.transfers = _transfers(rng, call, exts)
            call.recording = f"{recordings_url.rstrip('/')}/rec/{call_id}.mp3"
        call.late_start = rng.random() < out_of_order
        out.append(call)
    midnight = datetime.fromisoformat(date).replace(tzinfo=timezone(timedelta(hours=offset_hours)))
    return Day(out, midnight, {e: i + 1 for i, e in enumerate(exts)})


def _talk(rng: random.Random) -> float:
    return round(min(3600.0, max(3.0, rng.lognormvariate(math.log(90), 0.9))), 1)


def _incoming(rng: random.Random, call_id: str, start: float, phone: str,
              group: list[str]) -> DayCall:
    status = _pick(rng, IN_OUTCOMES)
    call = DayCall(call_id, start, "in", phone, group, status, end=start)
    if status == "answered":
        call.answer = start + rng.uniform(2, 25)
        call.answered_by = rng.choice(group)
        call.duration = _talk(rng)
        call.end = call.answer + call.duration
    elif status == "busy":
        call.end = start + rng.uniform(0.2, 2)
    elif status == "failed":
        call.end = start + rng.uniform(0.2, 5)
    elif status == "cancelled":
        call.end = start + rng.uniform(2, 25)
    else:
        call.end = start + rng.uniform(25, 45)
    return call


def _hunting(rng: random.Random, call_id: str, start: float, phone: str,
             queue: list[str]) -> DayCall:
    """A queue that hunts: its first phone rings at the start, then every 8-15 s the
    ringing one stops and the next starts, until one answers, the caller gives up, or the
    queue runs out."""
    step = rng.uniform(8, 15)
    status = _pick(rng, [("answered", 75), ("no_answer", 12), ("cancelled", 13)])
    call = DayCall(call_id, start, "in", phone, [queue[0]], status, end=start)
    tried = rng.randrange(len(queue)) if status != "no_answer" else len(queue) - 1
    for k in range(1, tried + 1):
        at = round(start + k * step, 3)
        call.rings += [(at, "ring_end", queue[k - 1]), (at, "ring", queue[k])]
    moment = start + tried * step + rng.uniform(2, step - 1)
    if status == "answered":
        call.answer, call.answered_by = moment, queue[tried]
        call.duration = _talk(rng)
        call.end = call.answer + call.duration
    else:
        call.end = start + (tried + 1) * step if status == "no_answer" else moment
    return call


def _outgoing(rng: random.Random, call_id: str, start: float, ext: str) -> DayCall:
    status = _pick(rng, OUT_OUTCOMES)
    call = DayCall(call_id, start, "out", _phone(rng), [ext], status, end=start)
    if status == "answered":
        call.answer = start + rng.uniform(3, 20)
        call.answered_by = ext
        call.duration = _talk(rng)
        call.end = call.answer + call.duration
    else:
        call.end = start + rng.uniform(1, 40)
        if rng.random() < 0.2:
            call.sip_code = PBX_SIP[status]
    return call


def _transfers(rng: random.Random, call: DayCall, exts: list[str]) -> list[tuple[float, str, str]]:
    count = _pick(rng, TRANSFERS)
    assert call.answer is not None and call.answered_by is not None
    times = sorted(rng.uniform(call.answer + 1, call.end - 0.5) for _ in range(count)
                   ) if call.end - call.answer > 2 else []
    out, holder = [], call.answered_by
    for at in times:
        target = rng.choice([e for e in exts if e != holder])
        out.append((round(at, 3), holder, target))
        holder = target
    return out


def events(day: Day, call: DayCall, rng: random.Random | None = None
           ) -> list[tuple[float, dict[str, Any]]]:
    """The call's events in the order the PBX posts them, each with its post time (seconds
    since midnight). A late start is posted 0.5-3 s after the call's next event."""
    rng = rng or random.Random(call.call_id)
    start: dict[str, Any] = {"call_id": call.call_id, "event": "start", "at": day.at(call.start),
                             "direction": call.direction, "phone": call.phone,
                             "extensions": list(call.extensions)}
    if call.line:
        start["line"] = call.line
    out: list[tuple[float, dict[str, Any]]] = [(call.start, start)]
    if call.answer is not None:
        out.append((call.answer, {"call_id": call.call_id, "event": "answer",
                                  "at": day.at(call.answer), "extension": call.answered_by}))
    for at, src, dst in call.transfers:
        out.append((at, {"call_id": call.call_id, "event": "transfer", "at": day.at(at),
                         "from_extension": src, "to_extension": dst}))
    end: dict[str, Any] = {"call_id": call.call_id, "event": "end", "at": day.at(call.end),
                           "status": call.status, "duration": call.duration}
    if call.sip_code:
        end["sip_code"] = call.sip_code
    for at, kind, ext in call.rings:
        out.append((at, {"call_id": call.call_id, "event": kind, "at": day.at(at),
                         "extension": ext}))
    out.append((call.end, end))
    out.sort(key=lambda pair: pair[0])  # the queue's rings fall before the answer or end
    if call.recording:
        at = call.end + rng.uniform(*RECORD_AFTER)
        out.append((at, {"call_id": call.call_id, "event": "record", "at": day.at(at),
                         "url": call.recording}))
    if call.late_start:
        held = out[1][0] + rng.uniform(*LATE_START)
        out = [out[1], (held, start), *out[2:]]
        out.sort(key=lambda pair: pair[0])  # stable: a later event stays after the start
    return out


def all_events(day: Day) -> list[tuple[float, int, dict[str, Any]]]:
    """Every event of the day as (post time, serial, event), in posting order."""
    rows: list[tuple[float, int, dict[str, Any]]] = []
    for call in day.calls:
        for send, event in events(day, call):
            rows.append((send, len(rows), event))
    rows.sort(key=lambda r: (r[0], r[1]))
    return rows


# ------------------------------------------------------------------ CSV


class CsvError(ValueError):
    """A row of the call log that cannot be replayed; the message names row and column."""


def _time(text: str, tz: timezone, where: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CsvError(f"{where}: not an ISO 8601 time: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=tz)


def _list(text: str) -> list[str]:
    return [item.strip() for item in (text or "").split(";") if item.strip()]


def read_csv(path: Path | str, tz_hours: int = 3, recordings_url: str = "http://127.0.0.1:8099",
             extensions: dict[str, int] | None = None) -> Day:
    """A customer's call log (the columns in the module docstring) as a Day. Users are the
    extensions met in the file, numbered in sorted order, unless ``extensions`` maps them."""
    with Path(path).open(newline="", encoding="utf-8-sig") as handle:
        return read_rows(csv.DictReader(handle), tz_hours, recordings_url, extensions)


def read_rows(rows: Iterable[dict[str, str]], tz_hours: int = 3,
              recordings_url: str = "http://127.0.0.1:8099",
              extensions: dict[str, int] | None = None) -> Day:
    """The CSV's rows (as csv.DictReader gives them) as a Day."""
    tz = timezone(timedelta(hours=tz_hours))
    parsed: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    for n, row in enumerate(rows, start=2):
        parsed.append(_row(row, n, tz, seen))
    if not parsed:
        raise CsvError("the call log has no rows")
    first = min(p["start"] for _, p in parsed)
    midnight = first.replace(hour=0, minute=0, second=0, microsecond=0)
    calls = [_call(call_id, p, midnight, recordings_url) for call_id, p in parsed]
    calls.sort(key=lambda c: c.start)
    met = sorted({e for c in calls for e in [*c.extensions, *(t[2] for t in c.transfers)]
                  if e}, key=lambda e: (len(e), e))
    users = extensions or {e: i + 1 for i, e in enumerate(met)}
    return Day(calls, midnight, users)


def _row(row: dict[str, str], n: int, tz: timezone, seen: set[str]
         ) -> tuple[str, dict[str, Any]]:
    def col(name: str, required: bool = True) -> str:
        value = (row.get(name) or "").strip()
        if required and not value:
            raise CsvError(f"row {n}, column {name}: required")
        return value

    call_id = col("call_id")
    if call_id in seen:
        raise CsvError(f"row {n}, column call_id: {call_id!r} is not unique")
    seen.add(call_id)
    status, direction = col("status"), col("direction")
    if status not in STATUSES:
        raise CsvError(f"row {n}, column status: one of {', '.join(STATUSES)}")
    if direction not in ("in", "out"):
        raise CsvError(f"row {n}, column direction: in or out")
    start = _time(col("start"), tz, f"row {n}, column start")
    end = _time(col("end"), tz, f"row {n}, column end")
    answer = _time(col("answer", False), tz, f"row {n}, column answer") if col(
        "answer", False) else None
    if status == "answered" and (answer is None or not col("answered_by", False)):
        raise CsvError(f"row {n}: an answered call needs answer and answered_by")
    if end < start or (answer is not None and not start <= answer <= end):
        raise CsvError(f"row {n}: times must run start <= answer <= end")
    extensions = _list(col("extensions"))
    duration = col("duration", False)
    try:
        talked = float(duration) if duration else (
            (end - answer).total_seconds() if answer else 0.0)
    except ValueError:
        raise CsvError(f"row {n}, column duration: seconds, a number") from None
    return call_id, {"start": start, "end": end, "answer": answer, "direction": direction,
                     "phone": col("phone"), "extensions": extensions, "status": status,
                     "answered_by": col("answered_by", False) or None, "duration": talked,
                     "transfers": _list(col("transfers", False)),
                     "recording": col("recording", False),
                     "sip_code": col("sip_code", False) or None, "n": n, "tz": tz}


def _call(call_id: str, p: dict[str, Any], midnight: datetime, recordings_url: str) -> DayCall:
    def sec(moment: datetime) -> float:
        return (moment - midnight).total_seconds()

    call = DayCall(call_id, sec(p["start"]), p["direction"], p["phone"], p["extensions"],
                   p["status"], sec(p["end"]), duration=p["duration"],
                   answer=sec(p["answer"]) if p["answer"] else None,
                   answered_by=p["answered_by"], sip_code=p["sip_code"])
    items = p["transfers"]
    if items and call.answer is None:
        raise CsvError(f"row {p['n']}: transfers on a call nobody answered")
    holder = call.answered_by
    for i, item in enumerate(items):
        target, _, when = item.partition("@")
        assert call.answer is not None
        at = (sec(_time(when, p["tz"], f"row {p['n']}, column transfers")) if when else
              call.answer + (call.end - call.answer) * (i + 1) / (len(items) + 1))
        call.transfers.append((at, str(holder), target.strip()))
        holder = target.strip()
    rec = p["recording"]
    if rec.lower() in ("yes", "1", "true", "y"):
        call.recording = f"{recordings_url.rstrip('/')}/rec/{call_id}.mp3"
    elif rec:
        call.recording = rec
    return call


CSV_COLUMNS = ("call_id", "start", "answer", "end", "direction", "phone", "extensions",
               "answered_by", "transfers", "status", "duration", "recording", "sip_code")


def write_csv(day: Day, path: Path | str, served_from: str | None = None) -> None:
    """The day as a call log in the CSV format above (to edit, or to try --csv with);
    recordings under ``served_from`` (the bench's own server) are written as ``yes``."""
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS)
        writer.writeheader()
        for c in day.calls:
            writer.writerow({
                "call_id": c.call_id, "start": day.at(c.start),
                "answer": day.at(c.answer) if c.answer is not None else "",
                "end": day.at(c.end), "direction": c.direction, "phone": c.phone,
                "extensions": ";".join(c.extensions), "answered_by": c.answered_by or "",
                "transfers": ";".join(f"{dst}@{day.at(at)}" for at, _, dst in c.transfers),
                "status": c.status, "duration": c.duration,
                "recording": "yes" if served_from and (c.recording or "").startswith(
                    served_from) else c.recording or "",
                "sip_code": c.sip_code or ""})
