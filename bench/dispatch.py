"""Dispatcher benchmarks (issue #12): card latency, throughput, isolation, overhead.

    .venv/bin/python -m bench.dispatch                    # every scenario, PostgreSQL
    .venv/bin/python -m bench.dispatch --quick            # shorter runs, a smoke check
    .venv/bin/python -m bench.dispatch overhead --db both # one scenario, SQLite and PostgreSQL

Each scenario builds a fresh rig (bench/dispatch_rig.py): a private Redis, a fresh
database, the sandbox portal in its own process, and the engine as production runs it
(``flask dispatcher run``, its own process). This process submits through
``app.dispatcher.submit`` and reads the outbox rows back: latency is a row's
``completed_at - submitted_at``. Tables are printed and written to
``bench/out/dispatch-<time>.json`` and ``.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.dispatch_rig import OUT, Rig, cpu_seconds, quantile

HUGE_BUCKET = (1e6, 1e9)  # sandbox drain/s, burst: no rate limit


def _register(portal: Any, n: int, tag: str, priority: str = "realtime") -> int:
    from app.dispatcher import Priority, submit

    level = Priority[priority.upper()]
    if tag.startswith("ovh"):  # the cheapest command for the sandbox to run
        return submit(portal.id, "profile", {}, key=f"{tag}-{n}", priority=level)
    if tag.startswith("thr"):  # bulk work; the sandbox's register scans every call so far
        return submit(portal.id, "crm.deal.add", {"fields": {"TITLE": f"{tag}-{n}"}},
                      priority=level)
    return submit(portal.id, "telephony.externalcall.register",
                  {"USER_ID": 1, "PHONE_NUMBER": f"+4930{n:07d}", "TYPE": 2,
                   "EXTERNAL_CALL_ID": f"{tag}-{n}", "SHOW": 0},
                  key=f"{tag}-{n}", priority=level)


def _submit_backlog(portal: Any, count: int, tag: str, priority: str = "realtime",
                    chunk: int = 2000) -> None:
    from app.extensions import db

    for start in range(0, count, chunk):
        for n in range(start, min(count, start + chunk)):
            _register(portal, n, tag, priority)
        db.session.commit()


def _drain(rig: Rig, portal_id: int, count: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while rig.count_final(portal_id) < count:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return time.monotonic()


# ---------------------------------------------------------------- overhead

def _profile_env(args: argparse.Namespace) -> dict[str, str]:
    return {"B24RELAY_BENCH_PROFILE": args.profile} if args.profile else {}


def _left(portal_id: int) -> bool:
    """Whether any of the portal's commands is still queued or in flight: one index probe,
    where counting the finished ones would scan them all, ten times a second, on the cores
    the engine is measured on."""
    from sqlalchemy import select

    from app.dispatcher.models import OutboxCommand as O
    from app.extensions import db

    with db.engine.connect() as conn:
        return conn.execute(select(O.id).where(O.portal_id == portal_id,
                                               O.status.in_(("queued", "inflight")))
                            .limit(1)).first() is not None


def _wait_done(portal_id: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _left(portal_id) and time.monotonic() < deadline:
        time.sleep(0.1)


def _db_cpu(rig: Rig) -> float:
    """CPU seconds the PostgreSQL backends of the rig's database have used so far (0 on
    SQLite, which runs inside the engine)."""
    if not rig.db_name:
        return 0.0
    from sqlalchemy import text

    from app.extensions import db

    with db.engine.connect() as conn:
        pids = conn.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = :name"),
                            {"name": rig.db_name}).scalars().all()
    return sum(cpu_seconds(pid) for pid in pids)


def overhead(database: str, args: argparse.Namespace) -> dict[str, Any]:
    """Zero latency, no rate limit: commands/s of one engine process over a backlog."""
    count = 6000 if args.quick else 30000
    rig = Rig(database, args.pg).start()
    try:
        portal, _member = rig.portal(bucket=HUGE_BUCKET)
        pid = portal.id
        # before the engine starts: it measures the engine alone
        _submit_backlog(portal, count, "ovh")
        engine = rig.engine(DISPATCH_MAX_INFLIGHT=args.inflight or 0, DISPATCH_BUCKET_SCALE=1e6,
                            **_profile_env(args))
        cpu0 = cpu_seconds(engine.pid), cpu_seconds(rig.sandbox.pid), _db_cpu(rig)
        rig.nudge(pid)
        _wait_done(pid, timeout=120)
        cpu = [round(cpu_seconds(p.pid) - c, 2)
               for p, c in zip((engine, rig.sandbox), cpu0[:2], strict=True)]
        db_cpu = round(_db_cpu(rig) - cpu0[2], 2) if rig.db_name else None
        times = rig.times(pid)
        rig.stop(engine)
    finally:
        rig.close()
    sent = [t[2] for t in times if t[2] is not None]
    done = [t[3] for t in times if t[3] is not None]
    wall = max(done) - min(sent)
    return {"scenario": "overhead", "db": database, "commands": count,
            "done": sum(t[0] == "done" for t in times), "wall_s": round(wall, 2),
            "per_s": round(count / wall, 1), "engine_cpu_s": cpu[0], "sandbox_cpu_s": cpu[1],
            "db_cpu_s": db_cpu, "load": round(os.getloadavg()[0], 2)}


# ---------------------------------------------------------------- open-loop offer

def _offer(portals: list[Any], rate: float, seconds: float, tag: str) -> float:
    """Submit register commands (one commit each, a key per call) round-robin over
    ``portals`` at ``rate`` each per second, on a fixed schedule; returns the worst lag."""
    from app.extensions import db

    t0, lag, total = time.monotonic(), 0.0, int(rate * seconds)
    for i in range(total):
        due = t0 + i / rate
        if (ahead := due - time.monotonic()) > 0:
            time.sleep(ahead)
        lag = max(lag, time.monotonic() - due)
        for portal in portals:
            _register(portal, i, f"{tag}-{portal.id}")
        db.session.commit()
    return lag


def _latencies(rig: Rig, portal_id: int) -> tuple[list[float], int, list[float]]:
    """Submit-to-complete seconds of the done commands, how many are not done, and each
    done command's wait for its batch to leave (submit to first sent)."""
    times = rig.times(portal_id)
    done = [t for t in times if t[0] == "done" and t[3] is not None]
    waits = [t[2] - t[1] for t in done if t[2] is not None]
    return [t[3] - t[1] for t in done], len(times) - len(done), waits


def _summary(lat: list[float], left: int, waits: list[float]) -> dict[str, Any]:
    return {"completed": len(lat), "not_done": left, "p50_s": round(quantile(lat, 0.5), 3),
            "p99_s": round(quantile(lat, 0.99), 3), "max_s": round(max(lat, default=0.0), 3),
            "wait_p99_s": round(quantile(waits, 0.99), 3)}


# ---------------------------------------------------------------- card latency

def card_latency(database: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """70 commands/s for 60 s at 2 s and 10 s per request, parallel and sequential."""
    seconds, out = (15.0 if args.quick else 60.0), []
    rig = Rig(database, args.pg).start()
    try:
        for latency in (2.0, 10.0):
            for mode in ("parallel", "sequential"):
                portal, _ = rig.portal(latency_ms=latency * 1000)
                engine = rig.engine(f"card-{mode}-{latency:g}", DISPATCH_MODE=mode)
                lag = _offer([portal], 70.0, seconds, "card")
                left_at_end = rig_backlog(rig, portal.id)
                _drain(rig, portal.id, int(70 * seconds),
                       timeout=2 * latency + 5 if mode == "parallel" else latency + 1)
                lat, left, waits = _latencies(rig, portal.id)
                rig.stop(engine, timeout=latency + 10)
                budget = (1.3 if latency <= 2 else 1.1) * latency
                out.append({"scenario": "card_latency", "db": database, "mode": mode,
                            "latency_s": latency, "offered": int(70 * seconds),
                            "seconds": seconds, "submit_lag_s": round(lag, 3),
                            "backlog_at_end": left_at_end, **_summary(lat, left, waits),
                            "budget_p99_s": budget,
                            "meets": mode == "sequential" or quantile(lat, 0.99) <= budget})
            parallel, sequential = out[-2], out[-1]
            if sequential["p99_s"]:
                parallel["vs_seq_p99"] = round(parallel["p99_s"] / sequential["p99_s"], 3)
    finally:
        rig.close()
    return out


def rig_backlog(rig: Rig, portal_id: int) -> int:
    """Commands of the portal not done yet."""
    return sum(t[0] != "done" for t in rig.times(portal_id))


# ---------------------------------------------------------------- throughput

CEILINGS = {"standard": (2.0, 50), "enterprise": (5.0, 250)}


def ceiling_seconds(plan: str, commands: int, rtt: float) -> float:
    """The burst of batches at once, then the drain rate, plus one round trip."""
    drain, burst = CEILINGS[plan]
    batches = -(-commands // 50)
    return max(0, batches - burst) / drain + rtt


def throughput(database: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """A backlog to one portal (standard, enterprise) drained at 1 s per request."""
    rtt, out = 1.0, []
    runs = [(plan, count) for plan, count in (("standard", 3000 if args.quick else 10000),
                                              ("enterprise", 15000 if args.quick else 30000))
            if plan in args.plans]
    rig = Rig(database, args.pg).start()
    try:
        for plan, count in runs:
            portal, member = rig.portal(plan=plan, latency_ms=rtt * 1000)
            _submit_backlog(portal, count, f"thr-{plan}", priority="bulk")
            engine = rig.engine(f"thr-{plan}", **_profile_env(args))
            started = time.monotonic()
            rig.nudge(portal.id)
            finished = _drain(rig, portal.id, count, timeout=ceiling_seconds(plan, count, rtt) * 2)
            counters = rig.control.counters(member)
            rig.stop(engine)
            wall, ceiling = finished - started, ceiling_seconds(plan, count, rtt)
            done = sum(t[0] == "done" for t in rig.times(portal.id))
            requests = counters.get("rest_requests", 0)
            out.append({"scenario": "throughput", "db": database, "plan": plan,
                        "commands": count, "rtt_s": rtt, "wall_s": round(wall, 2),
                        "ceiling_s": round(ceiling, 2), "ratio": round(ceiling / wall, 3),
                        "requests": requests, "status_503": counters.get("status_503", 0),
                        "done": done, "lost": count - done,
                        "executed": counters.get("commands", 0)})
    finally:
        rig.close()
    return out


# ---------------------------------------------------------------- isolation

def isolation(database: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """B (0.2 s) alone, then beside A (30 s), both offered 20 commands/s."""
    seconds, rate, out = (20.0 if args.quick else 60.0), 20.0, []
    rig = Rig(database, args.pg).start()
    try:
        b_alone, _ = rig.portal(latency_ms=200)
        engine = rig.engine("iso-alone")
        _offer([b_alone], rate, seconds, "iso")
        _drain(rig, b_alone.id, int(rate * seconds), timeout=10)
        rig.stop(engine)
        a, _ = rig.portal(latency_ms=30000)
        b, _ = rig.portal(latency_ms=200)
        engine = rig.engine("iso-both")
        _offer([a, b], rate, seconds, "iso")
        _drain(rig, b.id, int(rate * seconds), timeout=10)
        rows = {"B alone": _latencies(rig, b_alone.id), "B beside A": _latencies(rig, b.id),
                "A (30 s)": _latencies(rig, a.id)}
        rig.stop(engine, timeout=40)
        for name, (lat, left, waits) in rows.items():
            out.append({"scenario": "isolation", "db": database, "portal": name,
                        "offered": int(rate * seconds), **_summary(lat, left, waits)})
        base, beside = out[0]["p99_s"], out[1]["p99_s"]
        out[1]["vs_alone"] = round(beside / base, 3) if base else None
    finally:
        rig.close()
    return out


SCENARIOS = {"overhead": overhead, "card_latency": card_latency, "throughput": throughput,
             "isolation": isolation}


def main() -> None:
    """Parse options, run the scenarios, print and write the tables."""
    ap = argparse.ArgumentParser(prog="python -m bench.dispatch")
    ap.add_argument("scenarios", nargs="*", default=list(SCENARIOS))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--db", choices=["sqlite", "pg", "both"], default="pg")
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--inflight", type=int, default=0)
    ap.add_argument("--plans", nargs="+", default=["standard", "enterprise"],
                    help="throughput: the plans to drain a backlog for")
    ap.add_argument("--profile", default="", help="overhead: write the engine's yappi profile here")
    args = ap.parse_args()
    dbs = ["sqlite", "pg"] if args.db == "both" else [args.db]
    results = []
    for name in args.scenarios:
        for database in dbs:
            result = SCENARIOS[name](database, args)
            for row in result if isinstance(result, list) else [result]:
                print(json.dumps(row), flush=True)
                results.append(row)
    _write(results)


TABLES = {  # scenario -> the columns its table shows
    "overhead": ("db", "commands", "wall_s", "per_s", "engine_cpu_s", "sandbox_cpu_s",
                 "db_cpu_s", "load"),
    "card_latency": ("db", "latency_s", "mode", "offered", "completed", "not_done",
                     "backlog_at_end", "p50_s", "p99_s", "max_s", "wait_p99_s", "budget_p99_s",
                     "vs_seq_p99"),
    "throughput": ("db", "plan", "commands", "wall_s", "ceiling_s", "ratio", "requests",
                   "status_503", "lost"),
    "isolation": ("db", "portal", "offered", "completed", "not_done", "p50_s", "p99_s",
                  "max_s", "wait_p99_s", "vs_alone"),
}


def tables(results: list[dict[str, Any]]) -> str:
    """Plain-text tables, one per scenario that ran."""
    out = []
    for scenario, columns in TABLES.items():
        rows = [r for r in results if r["scenario"] == scenario]
        if not rows:
            continue
        cells = [list(columns)] + [[_cell(r.get(c)) for c in columns] for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
        out.append(scenario)
        out.extend("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True))
                   for row in cells)
        out.append("")
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _write(results: list[dict[str, Any]]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    Path(OUT / f"dispatch-{stamp}.json").write_text(json.dumps(results, indent=1))
    text = tables(results)
    Path(OUT / f"dispatch-{stamp}.txt").write_text(text)
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
