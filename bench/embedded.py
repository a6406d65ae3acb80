"""The embedded default as a new user meets it: ``make run``'s stack, events one at a time.

    .venv/bin/python -m bench.embedded              # 500 events, then the table
    .venv/bin/python -m bench.embedded --rounds 3   # three stacks in turn, one table each

Each round starts ``python -m sandbox.devrun`` (what ``make run`` runs) in an instance folder
of its own on a spare port: SQLite, the embedded Redis, gunicorn per gunicorn.conf.py, one
Dramatiq worker (1 process, 4 threads) and the sandbox portal with the app installed into it.
Then one client posts ``--events`` unique Bitrix24-shaped events for that portal to
``/b24/events``, one at a time over a keep-alive connection, and after each one a GET of
``/healthz`` on the same connection: the baseline at the same moments (gunicorn, no database).
The worker handles the events meanwhile, as it would for a user trying the app.

Reported: p50/p95/p99/max of both, their ratio, and how many events took over 20 ms. Every
answer must be a 200 with a new id. ``--database-url`` runs the same stack on PostgreSQL
instead (an empty database; devrun applies the migrations). Results go to
``bench/out/embedded-<time>.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sandbox.appsetup import free_port

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
P99_BUDGET_MS = 25.0
SLOW_MS = 20.0
PATH = "/b24/events"


def _body(member_id: str, token: str, i: int, tag: str) -> bytes:
    from app.ingress.formparse import encode_form

    return encode_form({
        "event": "ONCRMDEALUPDATE", "event_handler_id": "201",
        "data": {"FIELDS": {"ID": str(i)}}, "ts": tag,
        "auth": {"access_token": "s6p6eclrvim6da22ft9ch94ekreb52lv", "expires": "1736409407",
                 "domain": "sandbox.bitrix24.test", "member_id": member_id, "user_id": "1",
                 "application_token": token},
    }).encode()


class Stack:
    """``python -m sandbox.devrun`` in a fresh instance folder, stopped like Ctrl-C."""

    def __init__(self, workdir: Path, database_url: str | None) -> None:
        self.instance = workdir / "instance"
        self.port = free_port()
        self.log_path = workdir / "devrun.log"
        env = {k: v for k, v in os.environ.items()
               if k not in {"DATABASE_URL", "REDIS_URL", "BROKER_URL", "B24_CLIENT_ID"}}
        path = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update({"B24RELAY_INSTANCE": str(self.instance), "PYTHONPATH": path,
                    "APP_PUBLIC_URL": f"http://127.0.0.1:{self.port}"})
        if database_url:
            env["DATABASE_URL"] = database_url
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> str:
        """Start it; the installed sandbox portal's member_id once its banner is printed."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "sandbox.devrun"], cwd=ROOT,
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"devrun exited: {self.log_path.read_text()[-3000:]}")
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.strip().startswith("member_id"):
                    return line.split()[-1]
            time.sleep(0.2)
        raise RuntimeError(f"no banner within {timeout:.0f}s: {self.log_path.read_text()[-3000:]}")

    def token(self, member_id: str) -> str:
        """The application token the sandbox portal sends with its events."""
        from sandbox.client import SandboxControl

        state = json.loads((self.instance / "sandbox.json").read_text())
        with SandboxControl(f"http://127.0.0.1:{state['port']}") as control:
            return str(control.portal(member_id)["application_token"])

    def stop(self) -> None:
        """SIGINT, as Ctrl-C: devrun stops every child and its embedded Redis."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _timed(conn: http.client.HTTPConnection, method: str, path: str,
           body: bytes | None = None) -> tuple[float, int, bytes]:
    """One request on the kept-alive connection: milliseconds, status, body."""
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
    started = time.perf_counter()
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    return (time.perf_counter() - started) * 1000, response.status, data


def _post_all(port: int, member_id: str, token: str, events: int,
              warmup: int) -> dict[str, list[float]]:
    """Each event, then /healthz; ``warmup`` pairs first, not counted."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    tag = str(time.time_ns())
    out: dict[str, list[float]] = {"events": [], "healthz": []}
    ids: set[int] = set()
    for i in range(warmup + events):
        ms, status, data = _timed(conn, "POST", PATH, _body(member_id, token, i, tag))
        answer = json.loads(data) if status == 200 else {}
        if status != 200 or answer.get("duplicate") or answer.get("id") in ids:
            raise RuntimeError(f"event {i}: {status} {data[:300]!r}")
        ids.add(answer["id"])
        health_ms, health_status, _ = _timed(conn, "GET", "/healthz")
        if health_status != 200:
            raise RuntimeError(f"/healthz: {health_status}")
        if i >= warmup:
            out["events"].append(ms)
            out["healthz"].append(health_ms)
    conn.close()
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/max in milliseconds, and how many took over SLOW_MS."""
    return {"p50": _percentile(values, 0.50), "p95": _percentile(values, 0.95),
            "p99": _percentile(values, 0.99), "max": max(values),
            "over_20ms": sum(v > SLOW_MS for v in values)}


def _round(args: argparse.Namespace, number: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="b24relay-embedded-") as tmp:
        stack = Stack(Path(tmp), args.database_url)
        try:
            member_id = stack.start()
            token = stack.token(member_id)
            load = os.getloadavg()[0]
            times = _post_all(stack.port, member_id, token, args.events, args.warmup)
        finally:
            stack.stop()
    return {"round": number, "load_before": load, "events": summary(times["events"]),
            "healthz": summary(times["healthz"]), "raw": times}


def _row(name: str, s: dict[str, float], base: dict[str, float] | None = None) -> str:
    cells = f"{name:>8} {s['p50']:7.2f} {s['p95']:7.2f} {s['p99']:7.2f} {s['max']:8.2f}"
    cells += f" {int(s['over_20ms']):8d}"
    if base:
        ratios = " ".join(f"{s[k] / base[k]:5.1f}" for k in ("p50", "p95", "p99"))
        cells += f"   {ratios}"
    return cells


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The table: per round, events and /healthz, with the ratios events / healthz."""
    backend = "PostgreSQL" if args.database_url else "SQLite"
    lines = [f"make run's stack on {backend} (embedded Redis, 1 worker x 4 threads): "
             f"{args.events} events one at a time, /healthz after each",
             "round  target  p50 ms  p95 ms  p99 ms   max ms  >20 ms   ratio p50 p95 p99"]
    for r in results:
        lines.append(f"{r['round']:5d} " + _row("events", r["events"], r["healthz"])
                     + f"   (load {r['load_before']:.1f})")
        lines.append("      " + _row("healthz", r["healthz"]))
    worst = max(r["events"]["p99"] for r in results)
    verdict = "PASS" if worst <= P99_BUDGET_MS else "FAIL"
    lines.append(f"{verdict}: events p99 {worst:.2f} ms (worst round) <= {P99_BUDGET_MS} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the rounds, print the table, write bench/out/embedded-<time>.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=10,
                        help="event + /healthz pairs before the counted ones")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--database-url", help="PostgreSQL instead of SQLite (an empty database)")
    args = parser.parse_args(argv)
    results = [_round(args, n + 1) for n in range(args.rounds)]
    text = report(results, args)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (OUT / f"embedded-{stamp}.json").write_text(json.dumps(
        {"args": vars(args), "uptime": os.getloadavg(), "rounds": results}, indent=1))
    return 0 if "PASS" in text.splitlines()[-1] else 1


if __name__ == "__main__":
    raise SystemExit(main())
