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
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.dispatch_rig import OUT, Rig, cpu_seconds, quantile  # noqa: F401 - next scenarios

HUGE_BUCKET = (1e6, 1e9)  # sandbox drain/s, burst: no rate limit


def _register(portal: Any, n: int, tag: str, priority: str = "realtime") -> int:
    from app.dispatcher import submit

    if tag == "ovh-profile":  # the cheapest command for the sandbox to run
        return submit(portal, "profile", {}, key=f"{tag}-{n}", priority=priority)
    return submit(portal, "telephony.externalcall.register",
                  {"USER_ID": 1, "PHONE_NUMBER": f"+4930{n:07d}", "TYPE": 2,
                   "EXTERNAL_CALL_ID": f"{tag}-{n}", "SHOW": 0},
                  key=f"{tag}-{n}", priority=priority)


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


def overhead(database: str, args: argparse.Namespace) -> dict[str, Any]:
    """Zero latency, no rate limit: commands/s of one engine process over a backlog."""
    count = 6000 if args.quick else 30000
    rig = Rig(database, args.pg).start()
    try:
        portal, _member = rig.portal(bucket=HUGE_BUCKET)
        pid = portal.id
        # before the engine starts: it measures the engine alone
        _submit_backlog(portal, count, "ovh-profile" if args.cheap else "ovh")
        engine = rig.engine(DISPATCH_MAX_INFLIGHT=args.inflight or 0, DISPATCH_BUCKET_SCALE=1e6,
                            **_profile_env(args))
        cpu0 = cpu_seconds(engine.pid), cpu_seconds(rig.sandbox.pid)
        rig.nudge(pid)
        _drain(rig, pid, count, timeout=120)
        cpu = [round(cpu_seconds(p.pid) - c, 2)
               for p, c in zip((engine, rig.sandbox), cpu0, strict=True)]
        times = rig.times(pid)
        rig.stop(engine)
    finally:
        rig.close()
    sent = [t[2] for t in times if t[2] is not None]
    done = [t[3] for t in times if t[3] is not None]
    wall = max(done) - min(sent)
    return {"scenario": "overhead", "db": database, "commands": count,
            "done": sum(t[0] == "done" for t in times), "wall_s": round(wall, 2),
            "per_s": round(count / wall, 1), "engine_cpu_s": cpu[0], "sandbox_cpu_s": cpu[1]}


SCENARIOS = {"overhead": overhead}


def main() -> None:
    """Parse options, run the scenarios, print and write the tables."""
    ap = argparse.ArgumentParser(prog="python -m bench.dispatch")
    ap.add_argument("scenarios", nargs="*", default=list(SCENARIOS))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--db", choices=["sqlite", "pg", "both"], default="pg")
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--inflight", type=int, default=0)
    ap.add_argument("--cheap", action="store_true")
    ap.add_argument("--profile", default="", help="overhead: write the engine's yappi profile here")
    args = ap.parse_args()
    dbs = ["sqlite", "pg"] if args.db == "both" else [args.db]
    results = []
    for name in args.scenarios:
        for database in dbs:
            result = SCENARIOS[name](database, args)
            print(json.dumps(result), flush=True)
            results.append(result)
    _write(results)


def _write(results: list[dict[str, Any]]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    Path(OUT / f"dispatch-{stamp}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
