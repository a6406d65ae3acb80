"""Real events' acknowledgement while slow clients hold connections: our worker vs stock gthread.

    .venv/bin/python -m bench.slow_clients              # 100 ev/s, 15 s per run
    .venv/bin/python -m bench.slow_clients --quick      # 5 s per run, for a smoke check

What it does (the set-up is bench/ingest.py's: a fresh PostgreSQL database, a private
Redis, gunicorn started with the Procfile's ``web`` line, an open-loop load generator):
two servers run, ``gunicorn.conf.py``'s worker and stock ``gthread`` (through
``GUNICORN_CMD_ARGS``), taking turns row by row. For 0, 16 and 200 slow connections, the
slow connections are opened (each sends its headers and 10 bytes of a 1000-byte body, then
nothing; one more sends a byte a second) and kept at that number for the whole run (one
closed by the server is opened again, as an attacker would), while Bitrix24-shaped events
are sent at a steady rate. The table gives the real events' p50/p99 and errors, the web
tier's CPU per event, how long the server kept the slow connections and how they ended
(408, closed, or still open at the end), and the web workers' memory. Every acknowledged
event must be in the inbox. Results go to ``bench/out/slow-clients-<time>.txt`` / ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.ingest import (
    OUT,
    P99_BUDGET_MS,
    Stack,
    _check_inbox,
    _procfile_web,
    _run_load,
    _wait_http,
    cpu_probe_ms,
)

SLOW_COUNTS = (0, 16, 200)
WORKERS = (("ours", ""), ("gthread", "--worker-class gthread"))
TRICKLE_SECONDS = 1.0
OPEN_SPACING = 0.003


def slow_request(host: str, path: str = "/b24/events") -> bytes:
    """The start of an event POST: headers announcing 1000 bytes, then only 10 of them."""
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n"
            "event=ONCR").encode()


class SlowClients:
    """``count`` connections that stall mid-body, plus one that trickles a byte a second.

    A background thread watches them: what each connection got from the server (``408``,
    another status, or ``closed``) and how long it was held is recorded in ``outcomes``;
    with ``reopen`` a connection the server let go is replaced, keeping the pressure on;
    those still open at :meth:`stop` are recorded as ``open``.
    """

    def __init__(self, host: str, port: int, count: int, reopen: bool = False) -> None:
        self.address, self.count, self.reopen = (host, port), count, reopen
        self.outcomes: list[tuple[str, float]] = []
        self.selector = selectors.DefaultSelector()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> SlowClients:
        """Open the connections (the trickler last) and start watching them."""
        for _ in range(self.count):
            self._open(trickle=False)
            # Paced like separate clients, so that every web worker process gets its share
            # (opened in one burst, they can all land on one process and spare the other).
            time.sleep(OPEN_SPACING)
        self._open(trickle=True)
        self.thread.start()
        return self

    def _open(self, trickle: bool) -> None:
        sock = socket.create_connection(self.address, timeout=5)
        sock.sendall(slow_request(f"{self.address[0]}:{self.address[1]}"))
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ, [time.monotonic(), trickle])

    def _watch(self) -> None:
        next_trickle = time.monotonic() + TRICKLE_SECONDS
        while not self.stopping.is_set():
            for key, _ in self.selector.select(timeout=0.1):
                self._settle(key)
            if time.monotonic() >= next_trickle:
                next_trickle += TRICKLE_SECONDS
                self._trickle()

    def _settle(self, key: selectors.SelectorKey) -> None:
        opened, trickle = key.data
        try:
            answer = key.fileobj.recv(64)
        except OSError:
            answer = b""
        status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "closed"
        self.outcomes.append((status, time.monotonic() - opened))
        self.selector.unregister(key.fileobj)
        key.fileobj.close()
        if self.reopen and not self.stopping.is_set():
            self._open(trickle)

    def _trickle(self) -> None:
        for key in list(self.selector.get_map().values()):
            if key.data[1]:
                try:
                    key.fileobj.send(b"E")
                except OSError:
                    pass  # closed by the server: its outcome is read next

    def stop(self) -> None:
        """Stop watching and close whatever is still open (its outcome: ``open``)."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(5)
        for key in list(self.selector.get_map().values()):
            self.outcomes.append(("open", time.monotonic() - key.data[0]))
            key.fileobj.close()
        self.selector.close()


def _rss_mb(pgid: int) -> float:
    """Resident memory of a process group's processes but its leader (gunicorn's workers)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == pgid:
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[2]) == pgid:
                total += int(stat[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return round(total / 2**20, 1)


HEADER = (f"{'worker':>8} {'slow':>5} {'sent':>6} {'2xx':>6} {'errors':>6} {'p50 ms':>7} "
          f"{'p99 ms':>8} {'max ms':>8} {'cpu ms/ev':>9} {'held s (max)':>12} "
          f"{'slow connections ended':>24} {'rss MB':>7} {'inbox':>6}")


def _row(worker: str, slow: int, s: dict[str, Any]) -> str:
    ended = ",".join(f"{k}:{v}" for k, v in sorted(s["slow_ended"].items())) or "-"
    return (f"{worker:>8} {slow:>5} {s['sent']:>6} {s['ok']:>6} {s['errors']:>6} "
            f"{s['p50_ms']:>7.2f} {s['p99_ms']:>8.2f} {s['max_ms']:>8.2f} "
            f"{s.get('web_cpu_ms_per_request', float('nan')):>9.2f} {s['slow_held_max_s']:>12} "
            f"{ended:>24} {s['rss_mb']:>7} {s.get('inbox', ''):>6}")


def _one_run(stack: Stack, base: str, pgid: int, slow: int, args: argparse.Namespace,
             seed: tuple[str, str]) -> dict[str, Any]:
    host, port = base.rsplit("/", 1)[1].split(":")
    clients = SlowClients(host, int(port), slow, reopen=True).start() if slow else None
    time.sleep(0.5)  # the slow connections are in place before the first event
    try:
        summary = _run_load(base, args.rate, args.seconds, *seed, stack.workdir, pgid)
        summary["rss_mb"] = _rss_mb(pgid)
    finally:
        if clients:
            clients.stop()
    outcomes = clients.outcomes if clients else []
    summary["slow_ended"] = dict(Counter(status for status, _ in outcomes))
    summary["slow_held_max_s"] = round(max((held for _, held in outcomes), default=0.0), 1)
    _check_inbox(stack, summary)
    summary.pop("acked_ids", None)
    return summary


def _bench(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    stack.start_backends()
    seed = stack.seed()
    lines = [f"gunicorn: {_procfile_web()}; events {args.rate:.0f}/s x {args.seconds:.0f}s "
             f"per run; request deadline {args.deadline} s",
             f"cpus: {os.cpu_count()}  loadavg before: {_loadavg()}  "
             f"cpu probe: {cpu_probe_ms()} ms",
             HEADER]
    print("\n".join(lines), flush=True)
    servers = {worker: _start(stack, extra_args, args.deadline, seed)
               for worker, extra_args in WORKERS}
    runs = []
    # Rows alternate between the two servers, so that both see the same neighbours' load.
    for slow in SLOW_COUNTS:
        for worker, (proc, base) in servers.items():
            summary = _one_run(stack, base, proc.pid, slow, args, seed)
            runs.append({"worker": worker, "slow": slow, **summary})
            lines.append(_row(worker, slow, summary))
            print(lines[-1], flush=True)
            _settle(stack, base)
    for proc, _ in servers.values():
        stack.stop(proc)
    lines.append(f"loadavg after: {_loadavg()}  cpu probe: {cpu_probe_ms()} ms "
                 "(a 1M-iteration Python loop; this shared machine's speed varies)")
    print(lines[-1], flush=True)
    return {"runs": runs, "table": lines, "p99_budget_ms": P99_BUDGET_MS}


def _settle(stack: Stack, base: str) -> None:
    """Wait until a server has caught up, then empty the inbox for the next row.

    Stock gthread still owes answers to the events the client gave up on; it is done when
    it answers its health check and the inbox stops growing.
    """
    _wait_http(base + "/healthz", timeout=120)
    stored, previous = len(stack.inbox_ids()), -1
    while stored != previous:
        time.sleep(2)
        stored, previous = len(stack.inbox_ids()), stored
    stack.reset_inbox()


def _start(stack: Stack, extra_args: str, deadline: int, seed: tuple[str, str]
           ) -> tuple[Any, str]:
    """gunicorn as the Procfile starts it, plus ``extra_args``; warmed up."""
    stack.env.pop("GUNICORN_CMD_ARGS", None)
    if extra_args:
        stack.env["GUNICORN_CMD_ARGS"] = extra_args
    stack.env["REQUEST_DEADLINE_SECONDS"] = str(deadline)
    proc, base = stack.gunicorn("wsgi:app")
    _run_load(base, 100, 2, *seed, stack.workdir)  # warm-up: connections, caches
    stack.reset_inbox()
    return proc, base


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--deadline", type=int, default=10,
                        help="REQUEST_DEADLINE_SECONDS for the server (default 10, as shipped)")
    parser.add_argument("--pg", default=os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--quick", action="store_true", help="5 s runs")
    args = parser.parse_args()
    if args.quick:
        args.seconds = 5.0
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="b24relay-slow-") as tmp:
        stack = Stack(args.pg, Path(tmp))
        try:
            report = _bench(stack, args)
        finally:
            stack.teardown()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (OUT / f"slow-clients-{stamp}.json").write_text(json.dumps(report, indent=2))
    (OUT / f"slow-clients-{stamp}.txt").write_text("\n".join(report["table"]) + "\n")
    print(f"written: bench/out/slow-clients-{stamp}.json, .txt")


if __name__ == "__main__":
    main()
