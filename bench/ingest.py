"""Event intake under load: gunicorn as in production, PostgreSQL + Redis, an open-loop client.

    .venv/bin/python -m bench.ingest                # 500 ev/s for 60 s, then the peak search
    .venv/bin/python -m bench.ingest --quick        # 10 s runs, for a smoke check

What it does:
1. a fresh PostgreSQL database (``--pg``, default the local server) migrated with the
   real migrations, one installed portal; a Redis server of its own on a spare port;
2. gunicorn started with the Procfile's ``web`` line (same workers, threads, access log);
3. a load generator in another process (bench/loadgen.py, raw asyncio; open loop:
   request *i* is due at ``t0 + i/rate`` whatever happened before, and its latency
   counts from that due time) posting Bitrix24-shaped form events to ``/b24/events``;
4. after each run the inbox must hold exactly the acknowledged ids;
5. the peak sustainable rate: the rate is stepped up until p99 > 25 ms or an error,
   for the app and for a bare Flask endpoint that only returns 200 (same gunicorn
   line), and the ratio of the two peaks is reported.

No dramatiq worker runs: this measures the web tier (workers live on other hosts in
production; here they would only take CPU from the 2 cores). Results go to
``bench/out/ingest-<time>.json`` and ``.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from sandbox.appsetup import free_port

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
P99_BUDGET_MS = 25.0
PATH = "/b24/events"


# ---------------------------------------------------------------- load generator (child)

def _body(member_id: str, token: str, i: int, tag: str) -> bytes:
    from app.ingress.formparse import encode_form

    return encode_form({
        "event": "ONCRMDEALUPDATE", "event_handler_id": "201",
        "data": {"FIELDS": {"ID": str(i)}}, "ts": tag,
        "auth": {"access_token": "s6p6eclrvim6da22ft9ch94ekreb52lv", "expires": "1736409407",
                 "expires_in": "3600", "scope": "crm,telephony,placement,user_basic",
                 "domain": "bench.bitrix24.test", "server_endpoint": "https://oauth.bitrix.info/rest/",
                 "status": "P", "client_endpoint": "https://bench.bitrix24.test/rest/",
                 "member_id": member_id, "user_id": "15", "application_token": token},
    }).encode()


async def _generate(url: str, rate: float, seconds: float, member_id: str, token: str,
                    tag: str) -> dict[str, Any]:
    from bench.loadgen import generate, render_requests

    total = int(rate * seconds)
    requests = render_requests(url, [_body(member_id, token, i, tag) for i in range(total)],
                               "application/x-www-form-urlencoded")
    return await generate(url, requests, rate)


def _generator_main(args: argparse.Namespace) -> None:
    # The client's own garbage collector must not pause the schedule: tens of thousands of
    # pending tasks and result tuples make a full collection take 50-150 ms, which the open
    # loop would charge to the server as latency. A 60 s run fits in memory without it.
    gc.collect()
    gc.freeze()
    gc.disable()
    out = asyncio.run(_generate(args.url, args.rate, args.seconds, args.member_id, args.token,
                                args.tag))
    Path(args.result).write_text(json.dumps(out))


# ---------------------------------------------------------------- parent: set-up

def _wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except Exception:  # noqa: BLE001
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def _procfile_web() -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith("web:"):
            return line.split(":", 1)[1].strip()
    raise RuntimeError("no web line in the Procfile")


class Stack:
    """PostgreSQL database, a private Redis, and gunicorn processes, all torn down at the end."""

    def __init__(self, pg: str, workdir: Path) -> None:
        self.pg_admin = pg.rsplit("/", 1)[0] + "/postgres"
        self.db_name = f"b24relay_bench_{secrets.token_hex(4)}"
        self.db_url = pg.rsplit("/", 1)[0] + "/" + self.db_name
        self.workdir = workdir
        self.redis_port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.groups: set[int] = set()
        self.env: dict[str, str] = {}

    def start_backends(self) -> None:
        from sqlalchemy import create_engine, text

        admin = create_engine(_sqlalchemy_url(self.pg_admin), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.db_name}"'))
        admin.dispose()
        redis = subprocess.Popen(["redis-server", "--port", str(self.redis_port), "--bind",
                                  "127.0.0.1", "--save", "", "--appendonly", "no"],
                                 stdout=subprocess.DEVNULL, cwd=self.workdir)
        self.procs.append(redis)
        from cryptography.fernet import Fernet

        metrics_dir = self.workdir / "prom"
        metrics_dir.mkdir()
        self.env = {**os.environ, "DATABASE_URL": self.db_url,
                    "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                    "SECRET_KEY": secrets.token_hex(16),
                    "TOKEN_ENCRYPTION_KEY": Fernet.generate_key().decode(),
                    "B24RELAY_INSTANCE": str(self.workdir / "instance"),
                    "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                    "PYTHONPATH": str(ROOT), "LOG_LEVEL": "WARNING",
                    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        for key in ("B24_CLIENT_ID", "B24_CLIENT_SECRET", "BROKER_URL"):
            self.env.pop(key, None)
        import redis

        client = redis.Redis(port=self.redis_port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:  # up once it answers PING
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def seed(self) -> tuple[str, str]:
        """Migrate and install one portal; its member_id and application_token."""
        code = (
            "import sys\n"
            "from flask_migrate import upgrade\n"
            "from app import create_app\n"
            "from app.extensions import db\n"
            "from app.tenants.models import Portal, PortalSettings\n"
            "app = create_app()\n"
            "with app.app_context():\n"
            "    upgrade()\n"
            "    p = Portal(member_id=sys.argv[1], domain='bench.bitrix24.test',\n"
            "               client_endpoint='https://bench.bitrix24.test/rest/',\n"
            "               application_token=sys.argv[2], status='active')\n"
            "    p.settings = PortalSettings()\n"
            "    db.session.add(p); db.session.commit()\n")
        member_id, token = secrets.token_hex(16), secrets.token_hex(16)
        subprocess.run([sys.executable, "-c", code, member_id, token], env=self.env, cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return member_id, token

    def gunicorn(self, module: str) -> tuple[subprocess.Popen[bytes], str]:
        """The Procfile's web line serving ``module`` on a spare loopback port."""
        port = free_port()
        command = _procfile_web().replace("0.0.0.0", "127.0.0.1").replace("wsgi:app", module)
        log_path = self.workdir / f"gunicorn-{module.split(':')[0]}.log"
        log = log_path.open("wb")
        proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=ROOT,
                                env={**self.env, "PORT": str(port),
                                     "BIND": f"127.0.0.1:{port}"}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        self.groups.add(proc.pid)
        try:
            _wait_http(f"http://127.0.0.1:{port}/healthz")
        except RuntimeError:
            print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        return proc, f"http://127.0.0.1:{port}"

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            if proc.pid in self.groups:
                os.killpg(proc.pid, 15)  # gunicorn's arbiter and its workers
            else:
                proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def teardown(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        for log in self.workdir.glob("gunicorn-*.log"):  # kept for a look after the run
            (OUT / f"last-{log.name}").write_bytes(log.read_bytes())
        from sqlalchemy import create_engine, text

        admin = create_engine(_sqlalchemy_url(self.pg_admin), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
        admin.dispose()

    def inbox_ids(self) -> list[int]:
        return [int(x) for x in self._sql("SELECT id FROM inbox_events").split()]

    def reset_inbox(self) -> None:
        self._sql("TRUNCATE inbox_events")

    def _sql(self, query: str) -> str:
        from sqlalchemy import create_engine, text

        engine = create_engine(_sqlalchemy_url(self.db_url))
        with engine.begin() as conn:
            result = conn.execute(text(query))
            rows = result.all() if result.returns_rows else []
        engine.dispose()
        return " ".join(str(r[0]) for r in rows)


def _group_cpu_seconds(pgid: int) -> float:
    """CPU time used so far by every process of a process group (gunicorn and its workers)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of stat: the process group
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _sqlalchemy_url(url: str) -> str:
    from app.config import normalise_database_url

    return normalise_database_url(url)


# ---------------------------------------------------------------- parent: runs and report

def _run_load(base: str, rate: float, seconds: float, member_id: str, token: str,
              workdir: Path, web_pgid: int | None = None) -> dict[str, Any]:
    result_file = workdir / f"load-{rate}-{time.monotonic_ns()}.json"
    tag = str(time.time_ns())
    cpu_before = _group_cpu_seconds(web_pgid) if web_pgid else 0.0
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # The client stands in for traffic from other hosts: on this shared box it gets scheduling
    # priority so that its own starvation is not measured as server latency (its remaining
    # lag is still counted, and reported as generator_lag_max_ms). Without root, nice warns
    # and runs it at normal priority.
    subprocess.run(["nice", "-n", "-10", sys.executable, "-m", "bench.ingest", "--generate",
                    "--url", base + PATH,
                    "--rate", str(rate), "--seconds", str(seconds), "--member-id", member_id,
                    "--token", token, "--tag", tag, "--result", str(result_file)],
                   cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    raw = json.loads(result_file.read_text())
    result_file.unlink()
    summary = _summarise(rate, raw)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if summary["sent"]:
        summary["client_cpu_ms_per_request"] = round(
            (children_after.ru_utime + children_after.ru_stime - children_before.ru_utime
             - children_before.ru_stime) * 1000 / summary["sent"], 3)
    if web_pgid and summary["sent"]:
        summary["web_cpu_ms_per_request"] = round(
            (_group_cpu_seconds(web_pgid) - cpu_before) * 1000 / summary["sent"], 3)
    return summary


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _summarise(rate: float, raw: dict[str, Any]) -> dict[str, Any]:
    results = raw["results"]
    latencies = sorted(lat for _, lat, _ in results)
    ok = [r for r in results if 200 <= r[0] < 300]
    return {
        "rate": rate, "sent": len(results), "ok": len(ok), "errors": len(results) - len(ok),
        "achieved_rate": round(len(results) / raw["elapsed"], 1),
        "p50_ms": round(_quantile(latencies, 0.50), 2),
        "p95_ms": round(_quantile(latencies, 0.95), 2),
        "p99_ms": round(_quantile(latencies, 0.99), 2),
        "max_ms": round(latencies[-1], 2) if latencies else None,
        "generator_lag_max_ms": round(raw["generator_lag_max_ms"], 2),
        "failures": raw.get("failures", {}),
        "statuses": _count(r[0] for r in results if not 200 <= r[0] < 300),
        "acked_ids": sorted(r[2] for r in ok if r[2] is not None),
    }


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        out[str(value)] = out.get(str(value), 0) + 1
    return out


def _passes(summary: dict[str, Any]) -> bool:
    return summary["errors"] == 0 and summary["p99_ms"] <= P99_BUDGET_MS


HEADER = (f"{'target':>7} {'rate/s':>7} {'sent':>7} {'2xx':>7} {'errors':>6} {'p50 ms':>7} "
          f"{'p95 ms':>7} {'p99 ms':>7} {'max ms':>8} {'client lag':>10} {'web cpu ms/req':>14} "
          f"{'inbox':>7}")


def _row(target: str, s: dict[str, Any]) -> str:
    inbox = s.get("inbox", "")
    if s["errors"]:
        inbox += f"  errors: {s['statuses']} {s['failures']}"
    return (f"{target:>7} {s['rate']:>7.0f} {s['sent']:>7} {s['ok']:>7} {s['errors']:>6} "
            f"{s['p50_ms']:>7.2f} {s['p95_ms']:>7.2f} {s['p99_ms']:>7.2f} {s['max_ms']:>8.2f} "
            f"{s.get('generator_lag_max_ms', float('nan')):>10.2f} "
            f"{s.get('web_cpu_ms_per_request', float('nan')):>14.2f} {inbox:>7}")


def _check_inbox(stack: Stack, summary: dict[str, Any]) -> None:
    time.sleep(0.5)
    stored = sorted(stack.inbox_ids())
    summary["inbox"] = "exact" if stored == summary["acked_ids"] else \
        f"MISMATCH stored={len(stored)} acked={len(summary['acked_ids'])}"
    stack.reset_inbox()


def _peak(run: Any, rates: list[float], lines: list[str], target: str
          ) -> tuple[float, list, bool]:
    """The highest passing rate, the steps, and whether the search ran out of rates first
    (then the peak is only a lower bound)."""
    best, steps = 0.0, []
    for rate in rates:
        summary = run(rate)
        steps.append(summary)
        lines.append(_row(target, summary))
        print(lines[-1], flush=True)
        if not _passes(summary):
            return best, steps, False
        best = rate
    return best, steps, True


def cpu_probe_ms() -> float:
    """Milliseconds one fixed pure-Python loop takes now: this shared machine's speed varies
    from hour to hour, and the report prints the probe so runs can be compared honestly."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url"), parser.add_argument("--member-id"), parser.add_argument("--token")
    parser.add_argument("--tag"), parser.add_argument("--result")
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--step-seconds", type=float, default=15.0)
    parser.add_argument("--steps", default="500,600,700,800,900,1000,1250,1500,1750,2000,2500,"
                                            "3000,3500,4000")
    parser.add_argument("--pg", default=os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--quick", action="store_true", help="10 s main run, 5 s steps")
    parser.add_argument("--cpu-hog", type=int, default=0, metavar="N",
                        help="N busy-loop processes beside the server for the whole run, as a "
                             "noisy neighbour taking N cores' worth of time (headroom check)")
    args = parser.parse_args()
    if args.generate:
        _generator_main(args)
        return
    if args.quick:
        args.seconds, args.step_seconds = 10.0, 5.0
    rates = [float(r) for r in args.steps.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    load_before, probe_before = os.getloadavg(), cpu_probe_ms()
    with tempfile.TemporaryDirectory(prefix="b24relay-bench-") as tmp:
        stack = Stack(args.pg, Path(tmp))
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(args.cpu_hog)]
        try:
            report = _bench(stack, args, rates)
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
            stack.teardown()
    report["cpu_hogs"] = args.cpu_hog
    report["loadavg_before"], report["loadavg_after"] = load_before, os.getloadavg()
    report["cpu_probe_ms"] = [probe_before, cpu_probe_ms()]
    _write(report)


def _bench(stack: Stack, args: argparse.Namespace, rates: list[float]) -> dict[str, Any]:
    stack.start_backends()
    member_id, token = stack.seed()
    lines = [f"gunicorn: {_procfile_web()}", f"cpus: {os.cpu_count()}  busy-loop neighbours: "
             f"{args.cpu_hog}  "
             f"loadavg before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", HEADER]
    print("\n".join(lines), flush=True)
    app_proc, base = stack.gunicorn("wsgi:app")

    def run_app(rate: float, seconds: float | None = None) -> dict[str, Any]:
        summary = _run_load(base, rate, seconds or args.step_seconds, member_id, token,
                            stack.workdir, app_proc.pid)
        _check_inbox(stack, summary)
        return summary

    _run_load(base, 200, 3, member_id, token, stack.workdir)  # warm-up: connections, caches
    stack.reset_inbox()
    main_run = run_app(args.rate, args.seconds)
    lines.append(_row("app", main_run))
    print(lines[-1], flush=True)
    peak_app, app_steps, app_capped = _peak(run_app, rates, lines, "app")
    stack.stop(app_proc)
    bare_proc, bare = stack.gunicorn("bench.bare_app:app")

    def run_bare(rate: float) -> dict[str, Any]:
        return _run_load(bare, rate, args.step_seconds, member_id, token, stack.workdir,
                         bare_proc.pid)

    _run_load(bare, 200, 3, member_id, token, stack.workdir)
    # The bare endpoint is searched from the app's peak up (it is never slower).
    bare_rates = [r for r in rates if r >= peak_app] or rates
    peak_bare, bare_steps, bare_capped = _peak(run_bare, bare_rates, lines, "bare")
    stack.stop(bare_proc)
    ratio = peak_app / peak_bare if peak_bare else float("nan")
    verdict = ("PASS" if _passes(main_run) and main_run["inbox"] == "exact" else "FAIL")
    lines += [f"main run {args.rate:.0f}/s x {args.seconds:.0f}s: {verdict} "
              f"(p99 {main_run['p99_ms']} ms <= {P99_BUDGET_MS}, errors {main_run['errors']}, "
              f"inbox {main_run['inbox']})",
              f"peak sustainable (p99 <= {P99_BUDGET_MS} ms, no errors): "
              f"app {'>= ' * app_capped}{peak_app:.0f}/s, "
              f"bare Flask {'>= ' * bare_capped}{peak_bare:.0f}/s, ratio {ratio:.2f}"
              + (" (a bound only: a search ran out of steps)" if app_capped or bare_capped
                 else "")]
    for line in lines[-2:]:
        print(line, flush=True)
    for s in [main_run, *app_steps, *bare_steps]:
        s.pop("acked_ids", None)
    return {"main": main_run, "app_steps": app_steps, "bare_steps": bare_steps,
            "peak_app": peak_app, "peak_bare": peak_bare, "ratio": ratio, "table": lines,
            "peak_app_is_lower_bound": app_capped, "peak_bare_is_lower_bound": bare_capped,
            "gunicorn": _procfile_web(), "workers_running": False}


def _write(report: dict[str, Any]) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report["table"].append("loadavg before/after: " + " / ".join(
        " ".join(f"{x:.2f}" for x in la) for la in (report["loadavg_before"],
                                                   report["loadavg_after"])))
    report["table"].append("cpu probe (1M-iteration Python loop) before/after: "
                           f"{report['cpu_probe_ms'][0]} / {report['cpu_probe_ms'][1]} ms")
    print("\n".join(report["table"][-2:]))
    (OUT / f"ingest-{stamp}.json").write_text(json.dumps(report, indent=2))
    (OUT / f"ingest-{stamp}.txt").write_text("\n".join(report["table"]) + "\n")
    print(f"written: bench/out/ingest-{stamp}.json, .txt")


if __name__ == "__main__":
    main()
