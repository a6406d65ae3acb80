"""Scale: 1,000 installed portals, 50 of them with traffic; what a worker costs.

    .venv/bin/python -m bench.dispatch_scale                       # 1,000 portals, 50 busy
    .venv/bin/python -m bench.dispatch_scale --portals 200 --busy 10 --seconds 10   # quick

Every portal is a real sandbox portal with its Portal row (installed, active). One worker
process runs the dispatcher engine and the outbox sweep (every second).

1. idle: no traffic for ``--idle`` seconds: the worker's CPU and memory, the dispatcher's
   keys in Redis (owner leases, buckets), the sweep's query time;
2. busy: 50 portals get ``--rate`` commands/s each for ``--seconds`` s (0.2 s a request):
   CPU, peak memory, keys while busy and after the work is done, and the requests the 950
   idle portals received (must be 0). An idle portal's access token has lapsed, as it
   does an hour after the last call; the periodic user sync (workers/install.py) reads
   only portals with a live token, so it leaves them alone as well.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.dispatch_stack import Stack, save

SETTINGS = {"DISPATCH_SWEEP_INTERVAL": "1"}
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by ``pids``."""
    total = 0.0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def rss_mb(pids: list[int]) -> float:
    """Resident memory of ``pids`` in MiB."""
    total = 0
    for pid in pids:
        try:
            total += int(open(f"/proc/{pid}/statm").read().split()[1]) * PAGE
        except FileNotFoundError:
            continue
    return total / 2**20


def dispatch_keys(stack: Stack) -> dict[str, int]:
    """The dispatcher's per-portal keys in Redis now."""
    buckets = stack.redis.keys("b24relay:bucket:*")
    marks = sum(k.endswith(b":rt") for k in buckets)  # a real-time take's 10-minute reserve
    return {"owner leases": len(stack.redis.keys("b24relay:dispatch:owner:*")),
            "buckets": len(buckets) - marks, "marks": marks,
            "ledger": len(stack.redis.keys("b24relay:operating:*"))}


def requests_of(stack: Stack, members: list[str]) -> dict[str, int]:
    """REST requests each portal has received so far."""
    assert stack.sandbox is not None
    return {m: stack.sandbox.counters(m)["rest_requests"] for m in members}


def sweep_query_ms(stack: Stack) -> float:
    """The sweep's one query (portals with due work or expired leases), timed."""
    from app.dispatcher import sweep

    with stack.app.app_context():
        from app.extensions import db
        from app.tenants.models import utcnow

        with db.engine.connect() as conn:
            started = time.perf_counter()
            for _ in range(20):
                sweep._portals_with_work(conn, utcnow())
            return (time.perf_counter() - started) / 20 * 1000


def load(stack: Stack, busy: list[int], rate: float, seconds: float) -> int:
    """Each busy portal gets ``rate`` register commands a second, one transaction a second."""
    from app.dispatcher import Priority, submit
    from app.extensions import db
    from app.tenants.models import Portal

    sent, start = 0, time.monotonic()
    with stack.app.app_context():
        portals = [db.session.get(Portal, pid) for pid in busy]
        for second in range(int(seconds)):
            for p in portals:
                for i in range(int(rate)):
                    submit(p.id, "telephony.externalcall.register", {
                        "USER_ID": 1, "PHONE_NUMBER": "+493000000000", "TYPE": 2,
                        "EXTERNAL_CALL_ID": f"s{p.id}-{second}-{i}", "SHOW": 0},
                        priority=Priority.REALTIME)
                    sent += 1
            db.session.commit()
            time.sleep(max(0.0, start + second + 1 - time.monotonic()))
    return sent


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Idle phase, then busy phase; the figures."""
    with Stack() as stack:
        assert stack.sandbox is not None
        made = [stack.portal(plan="standard", latency_ms=200) for _ in range(args.portals)]
        busy = [pid for pid, _ in made[:args.busy]]
        idle_members = [m for _, m in made[args.busy:]]
        # An idle portal's access token has lapsed (tokens live an hour); so the periodic
        # user sync, which only reads portals with a live token, leaves it alone too.
        stack.sql("UPDATE portals SET expires_at = :t WHERE NOT (id = ANY(:busy))",
                  t=datetime.now(UTC) - timedelta(hours=2), busy=busy)
        (worker,) = stack.start_workers(1, **SETTINGS)
        time.sleep(10)  # booted, and the boot-time user sync of the busy portals is done
        pids = stack.worker_pids(worker)
        before = requests_of(stack, idle_members)
        out: dict[str, Any] = {"sweep_ms": sweep_query_ms(stack)}
        c0 = cpu_seconds(pids)
        time.sleep(args.idle)
        out["idle_cpu"] = (cpu_seconds(pids) - c0) / args.idle
        out["idle_rss"], out["idle_keys"] = rss_mb(pids), dispatch_keys(stack)
        c0, t0 = cpu_seconds(pids), time.monotonic()
        sent = load(stack, busy, args.rate, args.seconds)
        out["busy_keys"] = dispatch_keys(stack)
        out["busy_rss"] = rss_mb(pids)
        stack.wait_settled(sent, 120)
        out["busy_cpu"] = (cpu_seconds(pids) - c0) / (time.monotonic() - t0)
        out["sent"], out["busy_wall"] = sent, time.monotonic() - t0
        time.sleep(12)  # owner leases lapse or are released
        out["after_keys"] = dispatch_keys(stack)
        out["statuses"] = stack.statuses()
        after = requests_of(stack, idle_members)
        out["boot_requests"] = sum(before.values())
        out["idle_requests"] = sum(after[m] - before[m] for m in idle_members)
        return out


def report(args: argparse.Namespace, r: dict[str, Any]) -> str:
    """The scale table."""
    k = r["idle_keys"], r["busy_keys"], r["after_keys"]
    lines = [
        f"Scale: {args.portals} installed portals, {args.busy} with traffic "
        f"({args.rate:g} commands/s each for {args.seconds:g} s, 0.2 s a request), one worker",
        "",
        "| phase | worker CPU | worker RSS | owner leases | buckets | real-time marks "
        "| ledger keys |",
        "|---|---|---|---|---|---|---|",
        f"| idle ({args.idle:g} s, nothing queued) | {r['idle_cpu']:.1%} | "
        f"{r['idle_rss']:.0f} MiB | {k[0]['owner leases']} | {k[0]['buckets']} | "
        f"{k[0]['marks']} | {k[0]['ledger']} |",
        f"| busy ({r['sent']} commands in {r['busy_wall']:.0f} s) | {r['busy_cpu']:.1%} | "
        f"{r['busy_rss']:.0f} MiB | {k[1]['owner leases']} | {k[1]['buckets']} | "
        f"{k[1]['marks']} | {k[1]['ledger']} |",
        f"| after (work done) | - | - | {k[2]['owner leases']} | {k[2]['buckets']} | "
        f"{k[2]['marks']} | {k[2]['ledger']} |",
        "",
        f"Requests received by the {args.portals - args.busy} idle portals while measured: "
        f"{r['idle_requests']} (at worker boot, before the measurement: "
        f"{r['boot_requests']}). Outbox: {dict(r['statuses'])}. The sweep's one "
        f"query over {args.portals} portals: {r['sweep_ms']:.1f} ms.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse options and run."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--portals", type=int, default=1000)
    ap.add_argument("--busy", type=int, default=50)
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--idle", type=float, default=20.0)
    args = ap.parse_args(argv)
    r = run(args)
    save("dispatch-scale", report(args, r))
    return 0 if r["idle_requests"] == 0 and not r["after_keys"]["owner leases"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
