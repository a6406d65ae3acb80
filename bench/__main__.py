"""``make bench``: every benchmark in turn, each printing its own table.

1. ``bench.ingest`` — event intake under gunicorn + PostgreSQL + Redis, against a
   bare Flask endpoint in the same run (see its docstring for options);
   and ``bench.chart`` drawing its latency against the offered rate as an SVG;
   ``bench.embedded``: ``make run``'s stack (SQLite, embedded Redis, a worker), 500 events
   one at a time against ``/healthz`` at the same moments;
2. ``sandbox.loadtest`` — the sandbox portal's rate limit at 300 requests/s for 60 s;
3. ``bench.slow_clients`` — real events' latency while 0, 16 and 200 slow connections
   stall mid-request, for our gunicorn worker and stock gthread side by side;
4. ``bench.dispatch`` — the dispatcher: overhead, card latency, throughput, isolation.
5. the dispatcher under trouble (issue #12): ``bench.dispatch_faults`` (5xx, resets,
   504s after execution, 30 s tokens), ``bench.dispatch_crash`` (SIGKILL with 5,000 in
   flight), ``bench.dispatch_recovery`` (15,000 queued after an outage, calls meanwhile),
   ``bench.dispatch_scale`` (1,000 portals, 50 busy), ``bench.dispatch_peers``
   (fast_bitrix24 and b24pysdk on the same workload; the ``bench`` extra).
6. ``bench.route`` — ``GET /api/v1/calls/route``: cache hits at 200/s, misses at a fast and
   at a 10 s portal (issue 23 point 4).

Run one alone with ``python -m bench.ingest …`` or ``python -m sandbox.loadtest …``.
"""

from __future__ import annotations

import subprocess
import sys

RUNS = [
    ("event intake (bench.ingest)", [sys.executable, "-m", "bench.ingest"]),
    ("its chart (bench.chart)", [sys.executable, "-m", "bench.chart"]),
    ("the embedded default, one event at a time (bench.embedded)",
     [sys.executable, "-m", "bench.embedded"]),
    ("sandbox rate limit (sandbox.loadtest)",
     [sys.executable, "-m", "sandbox.loadtest", "--rate", "300", "--seconds", "60"]),
    ("slow clients (bench.slow_clients)", [sys.executable, "-m", "bench.slow_clients"]),
    ("dispatcher overhead (bench.dispatch)",
     [sys.executable, "-m", "bench.dispatch", "overhead", "--db", "both"]),
    ("dispatcher card latency, throughput, isolation (bench.dispatch)",
     [sys.executable, "-m", "bench.dispatch", "card_latency", "throughput", "isolation"]),
    ("dispatcher faults (bench.dispatch_faults)", [sys.executable, "-m", "bench.dispatch_faults"]),
    ("dispatcher crash (bench.dispatch_crash)", [sys.executable, "-m", "bench.dispatch_crash"]),
    ("dispatcher recovery (bench.dispatch_recovery)",
     [sys.executable, "-m", "bench.dispatch_recovery"]),
    ("dispatcher scale (bench.dispatch_scale)", [sys.executable, "-m", "bench.dispatch_scale"]),
    ("dispatcher peers (bench.dispatch_peers)", [sys.executable, "-m", "bench.dispatch_peers"]),
    ("routing, warm and cold cache (bench.route)", [sys.executable, "-m", "bench.route"]),
]


def main() -> int:
    """Run each benchmark; the exit code is the first failure's, else 0."""
    status = 0
    for title, command in RUNS:
        print(f"\n=== {title}\n$ {' '.join(command[1:])}", flush=True)
        code = subprocess.call(command)
        status = status or code
    return status


if __name__ == "__main__":
    raise SystemExit(main())
