"""``make bench``: every benchmark in turn, each printing its own table.

1. ``bench.ingest`` — event intake under gunicorn + PostgreSQL + Redis, against a
   bare Flask endpoint in the same run (see its docstring for options);
   and ``bench.chart`` drawing its latency against the offered rate as an SVG;
2. ``sandbox.loadtest`` — the sandbox portal's rate limit at 300 requests/s for 60 s;
3. ``bench.slow_clients`` — real events' latency while 0, 16 and 200 slow connections
   stall mid-request, for our gunicorn worker and stock gthread side by side;
4. ``bench.dispatch`` — the dispatcher: overhead, card latency, throughput, isolation.

Run one alone with ``python -m bench.ingest …`` or ``python -m sandbox.loadtest …``.
"""

from __future__ import annotations

import subprocess
import sys

RUNS = [
    ("event intake (bench.ingest)", [sys.executable, "-m", "bench.ingest"]),
    ("its chart (bench.chart)", [sys.executable, "-m", "bench.chart"]),
    ("sandbox rate limit (sandbox.loadtest)",
     [sys.executable, "-m", "sandbox.loadtest", "--rate", "300", "--seconds", "60"]),
    ("slow clients (bench.slow_clients)", [sys.executable, "-m", "bench.slow_clients"]),
    ("dispatcher overhead (bench.dispatch)",
     [sys.executable, "-m", "bench.dispatch", "overhead", "--db", "both"]),
    ("dispatcher card latency, throughput, isolation (bench.dispatch)",
     [sys.executable, "-m", "bench.dispatch", "card_latency", "throughput", "isolation"]),
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
