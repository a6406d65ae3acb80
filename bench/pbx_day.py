"""A day of PBX calls against the app and the sandbox portal, compressed in time (issue 22 point 7).

    .venv/bin/python -m bench.pbx_day --calls 200 --minutes 1 --latency 0.2  # smoke
    .venv/bin/python -m bench.pbx_day                       # 18,000 calls in 10 min at 2 s
    .venv/bin/python -m bench.pbx_day --latency 2,10 --scale 1,10  # the acceptance table
    .venv/bin/python -m bench.pbx_day --csv calls.csv       # a customer's day instead
    .venv/bin/python -m bench.pbx_day --write-csv day.csv   # the generated day, as a CSV
    .venv/bin/python -m bench.pbx_day --faults              # issue 22's faults point
    .venv/bin/python -m bench.pbx_day --calls 1250 --minutes 10 --bucket-scale 1 \
        --finish-cost 1 --drain-minutes 40                  # its operating-time point

1. The day: ``--calls`` calls generated from ``--seed`` (bench/pbx_day_gen.py: an office's
   hourly profile, ring groups of 2-6, 0-3 transfers, missed, busy, cancelled and outgoing
   calls, recordings served by this process, overlapping calls from one number, starts
   posted late), or a customer's call log with ``--csv`` (its columns: pbx_day_gen's
   docstring and the README). ``--scale N`` multiplies the calls per day.
2. The replay, per scale x latency x mode, each on a fresh sandbox portal: the day's posts
   spread over ``--minutes`` and sent to ``POST /api/v1/calls/events`` every ``--tick-ms``
   (the events due, in one request), with every ``at`` moved onto the wall clock the same
   way (``--day-at`` keeps the day's own times). Real processes: gunicorn, a Dramatiq worker,
   a dispatcher engine in DISPATCH_MODE=parallel or sequential, the sandbox at ``--latency``
   seconds per request (bench/pbx_day_stack.py). Then it waits until the inbox and the
   outbox are settled (at most ``--drain-minutes``).
3. The checks, from the sandbox's command log by EXTERNAL_CALL_ID (bench/pbx_day_check.py):
   a table per run with the violations of each; the exit status is 1 if any run has one.
4. Card latency: from the start's 202 to the moment the portal had executed the call's
   register and its show to every ringing user (the sandbox log's times): p50/p95/p99/max
   per scale and latency, parallel and sequential side by side, against the goal (p99 at
   most 1.3 x one round trip at 2 s, 1.1 x at 10 s). The web tier's, worker's, dispatcher's
   and this generator's CPU and RSS at the start and the end of each run. A chart of latency
   over the day for both modes per scale and latency: bench/out/pbx_day-<scale>x-<latency>s.svg.
   Everything also goes to bench/out/pbx_day-<time>.json (``--out`` another folder).
5. Issue 22's two scenarios, off by default: ``--faults [MIX]`` (bare: the issue's 5 % 5xx,
   2 % resets, 1 % 504s after execution on every request calling register or finish) adds
   the faults the sandbox injected and the point's results (duplicate calls, calls left
   unfinished, lost events); ``--finish-cost SECONDS`` keeps the portal's operating-time
   budget (Bitrix24's 480 s per method per 10 minutes, ``--operating-budget`` for a quick
   run) with every finish costing that much portal time, and adds the portal's
   OPERATION_TIME_LIMIT answers. Every run reports its dead letters by method and reason;
   one from OPERATION_TIME_LIMIT fails the run.
6. ``--screenshot PATH`` (PNG): the live dashboard (the TELEPHONY_ANALYTICS_MENU widget) in
   the sandbox portal's frame page, in Chromium, at 70 % of the replay, and once more at its
   end (``PATH``'s stem + ``-end``); per run when there are several (stem + the run). A
   process of its own, started from a thread (bench/pbx_day_shot.py): the JSON records
   what the page showed and what the shot cost. No Chromium: said, and the day runs without.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from bench import pbx_day_chart, pbx_day_check, pbx_day_gen, pbx_day_shot
from bench.pbx_day_gen import Day, DayCall

OUT = Path(__file__).resolve().parent / "out"
PG = "postgresql://postgres@127.0.0.1:5432/postgres"
# --faults: short names for the sandbox's fault kinds; issue 22's mix is "default".
FAULT_ALIASES = {"5xx": "http_500", "reset": "reset", "504_after": "executed_504"}
FAULT_KINDS = ("http_500", "html_502", "html_503", "html_504", "reset", "executed_504")
FAULT_NAMES = {"http_500": "5xx", "reset": "reset", "executed_504": "504 after execution"}
DEFAULT_FAULTS = "5xx:0.05,reset:0.02,504_after:0.01"
BITRIX_OPERATING_BUDGET = 480.0  # seconds per method per 10 minutes (protocol §6.2)
SHOT_AT = 0.7  # --screenshot: the share of the replay's time at which the first is taken


def parse_faults(text: str) -> dict[str, float]:
    """``--faults``: ``default`` (issue 22's mix, DEFAULT_FAULTS) or ``kind:rate,...`` with
    kinds 5xx, reset, 504_after (executed, then a 504) or any of FAULT_KINDS, rates in
    (0, 1]; returns sandbox kind -> rate, in the order given (the sandbox draws them in
    turn per request)."""
    spec = DEFAULT_FAULTS if text.strip() in ("", "default") else text
    out: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, raw = part.partition(":")
        kind = FAULT_ALIASES.get(name.strip(), name.strip())
        if not sep or kind not in FAULT_KINDS:
            raise argparse.ArgumentTypeError(
                f"{part!r}: want kind:rate, kind one of "
                f"{', '.join([*FAULT_ALIASES, *FAULT_KINDS[:-2]])}")
        try:
            rate = float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: the rate is not a number") from None
        if not 0.0 < rate <= 1.0:
            raise argparse.ArgumentTypeError(f"{part!r}: a rate is in (0, 1]")
        if kind in out:
            raise argparse.ArgumentTypeError(f"{part!r}: {kind} given twice")
        out[kind] = rate
    if not out:
        raise argparse.ArgumentTypeError("no fault given")
    return out


def fault_mix(faults: dict[str, float]) -> str:
    """The mix as a phrase: ``5xx 5 %, reset 2 %, 504 after execution 1 %``."""
    return ", ".join(f"{FAULT_NAMES.get(k, k)} {100 * r:g} %" for k, r in faults.items())


def goal_factor(latency: float) -> float:
    """The p99 goal as a multiple of one round trip: 1.3 at 2 s and below, 1.1 at 10 s and
    above, linear between (issue 22's acceptance names only 2 s and 10 s)."""
    if latency <= 2:
        return 1.3
    if latency >= 10:
        return 1.1
    return 1.3 - 0.2 * (latency - 2) / 8


def _floats(text: str) -> list[float]:
    return [float(p) for p in text.split(",") if p.strip()]


def build_day(args: argparse.Namespace, scale: int, recordings: str) -> Day:
    """The generated day (or the CSV's) at ``scale`` times its calls."""
    if not args.csv:
        return pbx_day_gen.generate(
            calls=args.calls * scale, seed=args.seed, extensions=args.extensions,
            recordings_url=recordings, out_of_order=args.out_of_order, overlap=args.overlap,
            prefix=f"day{scale}x", hunt=args.hunt)
    day = pbx_day_gen.read_csv(args.csv, args.csv_tz, recordings)
    if scale > 1:
        copies = []
        for k in range(1, scale):
            for c in day.calls:
                shift = k * 0.37
                copies.append(DayCall(
                    f"{c.call_id}#{k}", c.start + shift, c.direction, c.phone, c.extensions,
                    c.status, c.end + shift, c.duration,
                    None if c.answer is None else c.answer + shift, c.answered_by,
                    [(t + shift, a, b) for t, a, b in c.transfers],
                    c.recording and c.recording.replace(c.call_id, f"{c.call_id}-{k}"),
                    c.line, c.sip_code, c.late_start))
        day.calls = sorted(day.calls + copies, key=lambda c: c.start)
    return day


def uniqueness(day: Day, rows: list[tuple[float, int, dict[str, Any]]]) -> list[str]:
    """What is not unique in the day: call ids, or events (same JSON twice)."""
    problems = []
    ids = [c.call_id for c in day.calls]
    if len(set(ids)) != len(ids):
        problems.append(f"{len(ids) - len(set(ids))} call_ids repeat")
    bodies = {json.dumps(e, sort_keys=True) for _, _, e in rows}
    if len(bodies) != len(rows):
        problems.append(f"{len(rows) - len(bodies)} events repeat")
    return problems


def describe(day: Day, rows: list[tuple[float, int, dict[str, Any]]]) -> str:
    """One paragraph on the day: calls by kind, events, the late starts."""
    calls = day.calls
    inc = [c for c in calls if c.direction == "in"]
    by_status: dict[str, int] = {}
    for c in calls:
        by_status[f"{c.direction}:{c.status}"] = by_status.get(f"{c.direction}:{c.status}", 0) + 1
    transfers = sum(len(c.transfers) for c in calls)
    late = sum(c.late_start for c in calls)
    peak = max(sum(1 for c in calls if int(c.start // 3600) == h) for h in range(24))
    return (f"day: {len(calls)} calls ({len(inc)} incoming), {len(rows)} events, "
            f"{transfers} transfers, {sum(bool(c.recording) for c in calls)} recordings, "
            f"{late} starts posted late, busiest hour {peak} calls; "
            + ", ".join(f"{k} {v}" for k, v in sorted(by_status.items())))


def run_one(stack: Any, args: argparse.Namespace, day: Day, scale: int, latency: float,
            mode: str) -> dict[str, Any]:
    """One replay of the day: returns everything the report and the JSON need."""
    from bench import pbx_day_stack as st

    rows = pbx_day_gen.all_events(day)
    compression = st.compression(rows, args.minutes)
    bucket = compression if args.bucket_scale == "auto" else float(args.bucket_scale)
    scenario = st.Scenario(faults=args.faults or {}, finish_cost=args.finish_cost,
                           operating_budget=args.operating_budget)
    budget = args.operating_budget or BITRIX_OPERATING_BUDGET
    portal, member, key = stack.portal(day, latency, max(200_000, 10 * len(day.calls)), bucket,
                                       scenario)
    stack.dispatcher(mode, bucket, **(
        {} if args.finish_cost is None else {"operating_limit": budget}))
    label = f"[{mode} {latency:g}s x{scale}]"
    shots = _screenshots(stack, args, portal, member, label, scale, latency, mode)
    print(f"{label} portal {member}: {len(day.calls)} calls, {len(rows)} events over "
          f"{args.minutes:g} min ({compression:.0f} x faster than the day), rate bucket "
          f"x{bucket:g}", flush=True)
    if scenario.faults:
        print(f"{label} faults on every request calling register or finish: "
              f"{fault_mix(scenario.faults)}", flush=True)
    if args.finish_cost is not None:
        demand = args.finish_cost * len(day.calls)
        windows = math.ceil(demand / (0.8 * budget))  # the ledger sends up to 80 % a window
        print(f"{label} operating time: finish costs {args.finish_cost:g} s of portal time, "
              f"budget {budget:g} s per method per 10 min (portal and engine; latency is "
              f"waiting, not operating time): {demand:.0f} s of finishes"
              + (f", the last of them not before about {10 * (windows - 1)} min (the 10-min "
                 f"window has to slide {windows - 1} times)" if windows > 1 else
                 ", within 80 % of one window"), flush=True)
    samples = [(time.time(), st.usage(stack.pids()))]  # (epoch, usage per role)
    t0 = time.time() + 1.0
    plan = st.schedule(day, rows, args.minutes, t0, not args.day_at)

    def progress(r: st.Replay, posted: int, total: int, inflight: int) -> None:
        samples.append((time.time(), st.usage(stack.pids())))
        inbox, outbox, done, records = stack.unsettled(portal.id)
        lag = pbx_day_check.quantiles(r.lag[-2000:])
        answer = pbx_day_check.quantiles(r.answer_s[-2000:])
        print(f"{label} {time.time() - t0:6.0f}s posted {posted}/{total} events, "
              f"{len(r.accepted)} starts accepted, requests in flight {inflight}, "
              f"202 p99 {answer['p99']:.3f}s, lag p99 {lag['p99']:.3f}s; "
              f"inbox waiting {inbox}, outbox waiting {outbox}, done {done}, recordings "
              f"pending {records}", flush=True)

    if shots is not None:
        shots.at(t0 + SHOT_AT * (plan[-1][0] - t0), shots.path,
                 f"{100 * SHOT_AT:.0f} % of the replay", t0)
    time.sleep(max(0.0, t0 - time.time()))
    replayed = asyncio.run(st.replay(stack.url, key, plan, args.tick_ms / 1000.0, progress))
    if shots is not None:
        shots.at(time.time(), pbx_day_shot.suffixed(shots.path, "-end"), "the end of the replay",
                 t0)
    drained = _drain(stack, portal.id, args.drain_minutes * 60, label,
                     lambda: samples.append((time.time(), st.usage(stack.pids()))))
    samples.append((time.time(), st.usage(stack.pids())))
    screenshots = shots.join() if shots is not None else []
    counters = stack.rig.control.counters(member)
    # the log's registers and finishes: only for the scenarios (a full day's log is large)
    writes = stack.writes(member) if scenario.faults or args.finish_cost is not None else []
    targets = pbx_day_check.fault_targets(writes, counters.get("faults_by_kind") or {})
    behind = pbx_day_check.registers_behind_finishes(writes)
    history = stack.rig.control.call_history(member)
    sent_at = replayed.start_at if not args.day_at else {
        c.call_id: day.at(c.start) for c in day.calls}
    checks = pbx_day_check.check(day, sent_at, history)
    lat, unshown = pbx_day_check.card_latencies(day, replayed.accepted, history)
    q = pbx_day_check.quantiles([v for _, v in lat] + [math.inf] * unshown)
    q["cards_never_complete"] = unshown
    stages = stage_times(replayed.accepted, stack.register_times(portal.id))
    lag = pbx_day_check.quantiles(replayed.lag)
    answer = pbx_day_check.quantiles(replayed.answer_s)
    problems = uniqueness(day, rows)
    if len(replayed.stored_ids) != replayed.events or replayed.duplicates:
        problems.append(f"{replayed.events} events posted, {len(replayed.stored_ids)} new ids, "
                        f"{replayed.duplicates} answered as duplicates")
    print(f"{label} replay: {replayed.events} events in {replayed.requests} requests, "
          f"{replayed.retries} retries, {len(replayed.failed)} failed; the 202 in p50 "
          f"{answer['p50']:.3f}s p99 {answer['p99']:.3f}s; request lag p99 "
          f"{lag['p99']:.3f}s max {lag['max']:.3f}s; the generator's CPU "
          f"{replayed.cpu_s:.1f}s over {replayed.ended - replayed.began:.0f}s "
          f"({100 * replayed.cpu_s / max(replayed.ended - replayed.began, 1e-9):.0f}% of a core)"
          f"; drained: {drained}", flush=True)
    if replayed.failed:
        print(f"{label} refused requests: {len(replayed.failed)}, e.g. {replayed.failed[0]}",
              flush=True)
    print(f"{label} where a register's time went (s, p50 / p99): "
          + "; ".join(f"{k} {v['p50']:.2f} / {v['p99']:.2f}" for k, v in stages.items()),
          flush=True)
    print(pbx_day_check.table(checks), flush=True)
    if problems:
        print(f"{label} load generator: " + "; ".join(problems), flush=True)
    dead = stack.dead_letters(portal.id)
    reasons = pbx_day_check.dead_letter_reasons(dead)
    result = pbx_day_check.outcomes(day, history, len(rows), len(replayed.stored_ids),
                                    stack.inbox_statuses(portal.id))
    result["app_finish_outcomes"] = stack.finish_outcomes(portal.id)
    print(report_lines(label, scenario, counters, result, reasons, targets, behind),
          flush=True)
    return {"scale": scale, "latency": latency, "mode": mode, "member_id": member,
            "screenshots": screenshots,
            "compression": compression, "bucket_scale": bucket,
            "calls": len(day.calls), "events": len(rows),
            "scenario": {"faults": scenario.faults, "fault_methods": list(st.FAULT_METHODS),
                         "finish_cost": scenario.finish_cost,
                         "operating_budget": budget if scenario.finish_cost is not None
                         else None},
            "faults_injected": {"total": counters.get("faults_injected", 0),
                                "by_kind": counters.get("faults_by_kind", {}),
                                "rest_requests": counters.get("rest_requests", 0),
                                "requests_calling_register_or_finish": targets},
            "outcomes": {**result, "duplicate_calls": result["duplicate_calls"][:50],
                         "duplicate_call_count": len(result["duplicate_calls"]),
                         "unfinished": result["unfinished"][:50],
                         "unfinished_count": len(result["unfinished"])},
            "registers_behind_finishes": behind,
            "dead_letters": {"total": len(dead), "operation_time_limit":
                             pbx_day_check.operating_dead(reasons),
                             "by_reason": reasons, "examples": dead[:20]},
            "sandbox_counters": counters,
            "violating_calls": violating_calls(stack, portal.id, member, checks, result,
                                               history),
            "checks": [{"name": c.name, "checked": c.checked, "violations": len(c.bad),
                        "examples": c.bad[:20], "note": c.note} for c in checks],
            "card_latency": q, "series": lat, "drained": drained, "register_stages": stages,
            "replay": {"events": replayed.events, "requests": replayed.requests,
                       "retries": replayed.retries, "failed": replayed.failed,
                       "duplicates": replayed.duplicates, "lag": lag, "answer": answer,
                       "cpu_s": round(replayed.cpu_s, 2),
                       "seconds": round(replayed.ended - replayed.began, 1)},
            "generator_problems": problems,
            "resources": resources(samples),
            "recordings_served": st._Recordings.served}


def violating_calls(stack: Any, portal_id: int, member: str, checks: list[Any],
                    result: dict[str, Any], history: dict[str, Any],
                    limit: int = 20) -> dict[str, Any]:
    """The first calls that broke a check or the faults point, for the JSON: the sandbox's
    view of each (``history``), the commands it executed for it in order (``log``, without
    file contents) and the app's outbox commands for it (``outbox``)."""
    ids = [b.split(":", 1)[0] for c in checks for b in c.bad]
    ids = list(dict.fromkeys(ids + result["duplicate_calls"] + result["unfinished"]))[:limit]
    if not ids:
        return {}
    rows = history.get("calls", {})
    call_ids = {cid: set((rows.get(cid) or {}).get("call_ids", [])) for cid in ids}
    logs: dict[str, list[dict[str, Any]]] = {cid: [] for cid in ids}
    for entry in stack.rig.control.log(member):
        for cid in ids:
            if entry.get("external_call_id") == cid or entry.get("call_id") in call_ids[cid] \
                    or (entry.get("params") or {}).get("CALL_ID") in call_ids[cid]:
                params = {k: v for k, v in (entry.get("params") or {}).items()
                          if k != "FILE_CONTENT"}
                logs[cid].append({**entry, "params": params})
    outbox = stack.call_commands(portal_id, ids)
    return {cid: {"history": rows.get(cid), "log": logs[cid], "outbox": outbox.get(cid, [])}
            for cid in ids}


def report_lines(label: str, scenario: Any, counters: dict[str, Any], result: dict[str, Any],
                 reasons: dict[str, int], targets: int, behind: dict[str, Any]) -> str:
    """After the checks: the faults the sandbox injected, the faults point's three results
    and how the app got there, the portal's OPERATION_TIME_LIMIT answers, the dead letters
    by reason."""
    lines = []
    kinds = counters.get("faults_by_kind") or {}
    if scenario.faults or kinds:
        lines.append(
            f"{label} faults injected: " + (", ".join(
                f"{FAULT_NAMES.get(k, k)} {n}" for k, n in sorted(kinds.items())) or "none")
            + f" ({counters.get('faults_injected', 0)} of about {targets} requests calling "
              f"register or finish, {counters.get('rest_requests', 0)} REST requests in all)")
    not_done = result["inbox_not_done"]
    lines.append(
        f"{label} duplicate calls {len(result['duplicate_calls'])} (the sandbox's counter "
        f"{counters.get('duplicate_calls', 0)}), calls left unfinished "
        f"{len(result['unfinished'])}, lost events {result['lost_events']} ("
        f"{result['events_posted']} posted, {result['events_stored']} stored"
        + (", not done: " + ", ".join(f"{k} {v}" for k, v in not_done.items())
           if not_done else ", all done") + "); "
        f"registers answered by the dedup {result['registers_deduplicated']}, finishes "
        f"refused after the first {result['finishes_refused']} (the sandbox's double_finish "
        f"counter {counters.get('violations', {}).get('double_finish', 0)}); the app's "
        f"finish outcomes: " + ", ".join(
            f"{k} {v}" for k, v in sorted(result.get("app_finish_outcomes", {}).items())))
    for what in ("duplicate_calls", "unfinished"):
        if result[what]:
            lines.append(f"{label}   {what.replace('_', ' ')}, e.g. "
                         + ", ".join(result[what][:5]))
    if scenario.finish_cost is not None or counters.get("operation_time_limit"):
        lines.append(f"{label} OPERATION_TIME_LIMIT answers from the portal: "
                     f"{counters.get('operation_time_limit', 0)}; registers executed in a "
                     f"batch behind finishes: {behind['behind_finishes']} of "
                     f"{behind['registers']} (up to {behind['most_finishes_ahead']} "
                     f"finishes ahead)")
    total = sum(reasons.values())
    lines.append(f"{label} dead letters {total}" + (": " + "; ".join(
        f"{k} {n}" for k, n in reasons.items()) if total else "")
        + f" (of them OPERATION_TIME_LIMIT: {pbx_day_check.operating_dead(reasons)})")
    return "\n".join(lines)


def _screenshots(stack: Any, args: argparse.Namespace, portal: Any, member: str, label: str,
                 scale: int, latency: float, mode: str) -> pbx_day_shot.Shots | None:
    """``--screenshot``: the run's shots, the widget bound on its portal; None without."""
    if args.screenshot is None:
        return None
    path = args.screenshot if args.runs == 1 else pbx_day_shot.suffixed(
        args.screenshot, f"-{mode}-{latency:g}s-x{scale}")
    try:
        url = pbx_day_shot.open_widget(stack, portal, member)
    except Exception as err:  # noqa: BLE001 - the day runs on without its picture
        print(f"{label} no screenshot: the dashboard widget could not be bound: {err}",
              flush=True)
        return None
    return pbx_day_shot.Shots(url, label, path)


def stage_times(accepted: dict[str, float],
                times: dict[str, tuple[float, float | None, float | None]]
                ) -> dict[str, dict[str, float]]:
    """Quantiles of the register's stages from the app's own tables: 202 to submitted (the
    worker applied the start), submitted to first sent (the dispatcher's queue), first sent
    to completed (the round trip, as the engine saw it)."""
    worker, queue, wire = [], [], []
    for call_id, (submitted, sent, completed) in times.items():
        if call_id in accepted:
            worker.append(submitted - accepted[call_id])
        if sent is not None:
            queue.append(sent - submitted)
            if completed is not None:
                wire.append(completed - sent)
    return {"202 -> submitted": pbx_day_check.quantiles(worker),
            "submitted -> sent": pbx_day_check.quantiles(queue),
            "sent -> completed": pbx_day_check.quantiles(wire)}


def _drain(stack: Any, portal_id: int, limit: float, label: str, sample: Any) -> str:
    """Wait until nothing is left in the inbox or the outbox (twice in a row); ``sample``
    every 5 s."""
    deadline = time.monotonic() + limit
    quiet, last_note, began = 0, 0.0, time.monotonic()
    while time.monotonic() < deadline:
        inbox, outbox, done, records = stack.unsettled(portal_id)
        quiet = quiet + 1 if inbox == 0 and outbox == 0 and records == 0 else 0
        if quiet >= 2:
            return f"settled {time.monotonic() - began:.0f}s after the last post"
        if time.monotonic() - last_note >= 5:
            last_note = time.monotonic()
            sample()
            print(f"{label} draining: inbox waiting {inbox}, outbox waiting {outbox}, "
                  f"done {done}, recordings pending {records}", flush=True)
        time.sleep(0.5)
    inbox, outbox, _, records = stack.unsettled(portal_id)
    return (f"NOT settled after {limit:.0f}s: inbox {inbox}, outbox {outbox}, recordings "
            f"{records} waiting")


def latency_table(runs: list[dict[str, Any]], modes: list[str]) -> str:
    """Card latency, the modes side by side per scale and portal latency."""
    head = f"{'calls/day':>9} {'portal':>6} |"
    for mode in modes:
        head += f" {mode + ' p50':>14} {'p95':>6} {'p99':>6} {'max':>7} |"
    head += f" {'goal p99':>8}"
    lines = ["card latency (s), the start's 202 to register + show executed on the portal",
             head]
    keys = sorted({(r["scale"], r["latency"]) for r in runs})
    for scale, latency in keys:
        cells = [r for r in runs if (r["scale"], r["latency"]) == (scale, latency)]
        goal = goal_factor(latency) * latency
        line = f"{cells[0]['calls']:>9} {latency:>5g}s |"
        verdicts = []
        for mode in modes:
            r = next((c for c in cells if c["mode"] == mode), None)
            if r is None:
                line += f" {'-':>14} {'-':>6} {'-':>6} {'-':>7} |"
                continue
            q = r["card_latency"]
            line += (f" {q['p50']:>14.2f} {q['p95']:>6.2f} {q['p99']:>6.2f} "
                     f"{q['max']:>7.2f} |")
            met = not math.isnan(q["p99"]) and q["p99"] <= goal
            verdicts.append(f"{mode} {'met' if met else 'NOT met'}")
        never = ", ".join(f"{c['mode']} {c['card_latency']['cards_never_complete']}"
                          for c in cells if c["card_latency"]["cards_never_complete"])
        lines.append(line + f" {goal:>7.2f}s  " + ", ".join(verdicts)
                     + (f"; calls never fully shown (inf above): {never}" if never else ""))
    return "\n".join(lines)


def scenario_table(runs: list[dict[str, Any]]) -> str:
    """Per run: the faults injected, the faults point's results, the portal's
    OPERATION_TIME_LIMIT answers, dead letters (OPERATION_TIME_LIMIT's / all), card p99."""
    lines = ["faults and operating time per run (issue 22's acceptance)",
             f"{'run':<34} {'faults injected':<30} {'dup calls':>9} {'unfinished':>10} "
             f"{'lost events':>11} {'OTL answers':>11} {'dead OTL/all':>12} {'card p99':>8}"]
    for r in runs:
        sc = r["scenario"]
        name = f"{r['mode']} {r['latency']:g}s x{r['scale']}"
        if sc["faults"]:
            name += " faults"
        if sc["finish_cost"] is not None:
            name += f" finish {sc['finish_cost']:g}s/{sc['operating_budget']:g}s"
        kinds = r["faults_injected"]["by_kind"]
        injected = "/".join(str(kinds.get(k, 0)) for k in sc["faults"]) if sc["faults"] else "-"
        if sc["faults"]:
            injected += f" of {r['faults_injected']['requests_calling_register_or_finish']}"
        o, d = r["outcomes"], r["dead_letters"]
        lines.append(
            f"{name:<34} {injected:<30} {o['duplicate_call_count']:>9} "
            f"{o['unfinished_count']:>10} {o['lost_events']:>11} "
            f"{r['sandbox_counters'].get('operation_time_limit', 0):>11} "
            f"{str(d['operation_time_limit']) + '/' + str(d['total']):>12} "
            f"{r['card_latency']['p99']:>8.2f}")
    kinds = [k for r in runs for k in r["scenario"]["faults"]]
    if kinds:
        lines.append("(faults injected: " + "/".join(
            FAULT_NAMES.get(k, k) for k in dict.fromkeys(kinds))
            + "; 'of N': about N requests called register or finish)")
    return "\n".join(lines)


def resources(samples: list[tuple[float, dict[str, dict[str, float]]]]) -> dict[str, Any]:
    """Per role: CPU % of one core over the first and the last window of the run (a minute,
    or a fifth of the run if shorter), RSS at the start and the end; the samples."""
    began, ended = samples[0][0], samples[-1][0]
    window = min(60.0, (ended - began) / 5) or 1.0
    first = next((x for x in samples if x[0] - began >= window), samples[-1])
    last = next((x for x in reversed(samples) if ended - x[0] >= window), samples[0])
    out: dict[str, Any] = {"window_s": round(window, 1), "roles": {}}
    for role in samples[0][1]:
        def cpu(a: tuple[float, dict[str, dict[str, float]]],
                b: tuple[float, dict[str, dict[str, float]]], role: str = role) -> float:
            spent = b[1].get(role, {}).get("cpu_s", 0.0) - a[1].get(role, {}).get("cpu_s", 0.0)
            return round(100 * spent / max(b[0] - a[0], 1e-9), 1)

        out["roles"][role] = {
            "cpu_first": cpu(samples[0], first), "cpu_last": cpu(last, samples[-1]),
            "rss_start": samples[0][1][role]["rss_mib"],
            "rss_end": samples[-1][1].get(role, {}).get("rss_mib", 0.0)}
    out["samples"] = [(round(t - began, 1), u) for t, u in samples]
    return out


def resources_table(runs: list[dict[str, Any]]) -> str:
    """CPU and RSS per role at the start and the end of each run, and the generator's CPU."""
    lines = ["resources per run: CPU % of one core in the first and the last window of the run "
             "(first/last), RSS MiB at the start -> end",
             f"{'run':<24} {'web':>20} {'worker':>20} {'dispatcher':>20} {'generator':>10}"]
    for r in runs:
        roles = r["resources"]["roles"]
        cells = []
        for role in ("web", "worker", "dispatcher"):
            x = roles.get(role)
            cells.append(f"{'-':>20}" if x is None else
                         f"{x['cpu_first']:.0f}/{x['cpu_last']:.0f}% "
                         f"{x['rss_start']:.0f}->{x['rss_end']:.0f}")
        gen = 100 * r["replay"]["cpu_s"] / max(r["replay"]["seconds"], 1e-9)
        name = f"{r['mode']} {r['latency']:g}s x{r['scale']}"
        lines.append(f"{name:<24} " + " ".join(f"{c:>20}" for c in cells) + f" {gen:>9.0f}%")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=18000, help="calls per day at scale 1")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--csv", type=Path, help="a customer's call log instead of a generated day")
    p.add_argument("--csv-tz", type=int, default=3, help="UTC offset (hours) for CSV times "
                                                         "without one")
    p.add_argument("--write-csv", type=Path, help="write the generated day as CSV and stop")
    p.add_argument("--minutes", type=float, default=10.0, help="the day is replayed in this")
    p.add_argument("--latency", default="2", help="portal seconds per request, comma list")
    p.add_argument("--scale", default="1", help="calls per day multiplier, comma list")
    p.add_argument("--modes", default="parallel,sequential")
    p.add_argument("--database", choices=("pg", "sqlite"), default="pg",
                   help="pg: a fresh database on --pg's server, dropped afterwards")
    p.add_argument("--pg", default=PG, help="PostgreSQL server URL (any database on it)")
    p.add_argument("--bucket-scale", default="auto",
                   help="the portal's rate bucket (drain and burst) times this, the engine's "
                        "likewise; auto: as much as the day is compressed (the limit keeps its "
                        "share of the day's load); 1: the plan's own")
    p.add_argument("--worker-processes", type=int, default=1, help="Dramatiq worker processes")
    p.add_argument("--worker-threads", type=int, default=4, help="threads per worker process")
    p.add_argument("--tick-ms", type=float, default=100.0,
                   help="events due within a tick go in one request")
    p.add_argument("--extensions", type=int, default=60, help="users with an extension")
    p.add_argument("--out-of-order", type=float, default=0.02,
                   help="share of calls whose start is posted after a later event")
    p.add_argument("--overlap", type=float, default=0.03,
                   help="share of calls from a number whose other call is still going on")
    p.add_argument("--hunt", type=float, default=0.0,
                   help="share of incoming calls to a hunting queue (ring/ring_end events)")
    p.add_argument("--day-at", action="store_true",
                   help="send the day's own times as at (default: moved onto the wall clock)")
    p.add_argument("--drain-minutes", type=float, default=10.0,
                   help="how long to wait for the app to settle after the last post")
    p.add_argument("--faults", nargs="?", const=parse_faults("default"), type=parse_faults,
                   metavar="MIX",
                   help="faults on every portal request calling register or finish: "
                        "kind:rate,... (kinds 5xx, reset, 504_after = executed then a 504, "
                        f"or {', '.join(FAULT_KINDS[1:4])}); bare or 'default': issue 22's "
                        f"mix {DEFAULT_FAULTS}")
    p.add_argument("--finish-cost", type=float, metavar="SECONDS",
                   help="every finish costs this much portal time, under the operating-time "
                        "budget (Bitrix24's 480 s per method per 10 min) instead of the "
                        "lifted one; the portal's latency is then waiting, not operating time")
    p.add_argument("--operating-budget", type=float, metavar="SECONDS",
                   help="with --finish-cost: a lower budget per method per 10 min than "
                        "Bitrix24's 480, on the portal and in the engine (for a quick run)")
    p.add_argument("--out", type=Path, default=OUT,
                   help="where the charts and the JSON go (default bench/out)")
    p.add_argument("--screenshot", type=Path, metavar="PATH",
                   help="a PNG of the live dashboard in Chromium at 70 %% of the replay, and "
                        "PATH's stem + -end at its end (per run when there are several)")
    args = p.parse_args(argv)
    if args.operating_budget is not None and args.finish_cost is None:
        p.error("--operating-budget goes with --finish-cost")
    if args.finish_cost is not None and args.finish_cost <= 0:
        p.error("--finish-cost is a positive number of seconds")
    if args.operating_budget is not None and args.operating_budget <= 0:
        p.error("--operating-budget is a positive number of seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    """Generate (or read) the day, replay it per scale x latency x mode, report."""
    args = parse_args(argv)
    if args.write_csv:
        served = "http://127.0.0.1:8099"  # stands for the bench's server: written as "yes"
        day = build_day(args, 1, served)
        pbx_day_gen.write_csv(day, args.write_csv, served)
        print(f"{len(day.calls)} calls written to {args.write_csv}")
        return 0
    from bench import pbx_day_stack as st

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    scales = [int(s) for s in _floats(args.scale)]
    latencies = _floats(args.latency)
    args.runs = len(modes) * len(scales) * len(latencies)
    if args.screenshot is not None and (missing := pbx_day_shot.chromium_missing()):
        print(f"--screenshot: no screenshot, the day runs without: {missing}", flush=True)
        args.screenshot = None
    server, rec_url = st.recordings_server()
    stack = st.Stack(args.database, args.pg, args.worker_processes, args.worker_threads)
    runs: list[dict[str, Any]] = []
    started = time.strftime("%Y%m%d-%H%M%S")
    try:
        stack.start()
        print(f"stack up: web {stack.url}, {st.env_note()}", flush=True)
        for scale in scales:
            day = build_day(args, scale, rec_url)
            print(describe(day, pbx_day_gen.all_events(day)), flush=True)
            for latency in latencies:
                for mode in modes:
                    runs.append(run_one(stack, args, day, scale, latency, mode))
    finally:
        stack.close()
        server.shutdown()
    print()
    print(latency_table(runs, modes))
    print()
    print(scenario_table(runs))
    print()
    print(resources_table(runs))
    args.out.mkdir(parents=True, exist_ok=True)
    for scale, latency in sorted({(r["scale"], r["latency"]) for r in runs}):
        cells = [r for r in runs if (r["scale"], r["latency"]) == (scale, latency)]
        path = args.out / f"pbx_day-{scale}x-{latency:g}s.svg"
        path.write_text(pbx_day_chart.render(cells, goal_factor(latency) * latency))
        print(f"chart: {path}")
    result = args.out / f"pbx_day-{started}.json"
    result.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                  "runs": runs}, indent=1))
    print(f"result: {result}")
    bad = sum(c["violations"] for r in runs for c in r["checks"])
    bad += sum(len(r["generator_problems"]) for r in runs)
    bad += sum(len(r["replay"]["failed"]) for r in runs)  # events the app refused or lost
    bad += sum(sum(r["outcomes"]["inbox_not_done"].values()) for r in runs)  # stored, not done
    bad += sum(r["dead_letters"]["operation_time_limit"] for r in runs)
    print(f"{'FAIL' if bad else 'PASS'}: {bad} violations over {len(runs)} runs")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
