"""The dispatcher benchmarks' stack: a fresh PostgreSQL database, a private Redis, the
sandbox portal in its own process, and real ``dramatiq`` worker processes running the
dispatcher engine; all on loopback and torn down at the end.

The bench process itself is the app's submitting side: it creates the portals (a sandbox
portal plus its ``Portal`` row holding the admin's token chain) and submits commands with
``app.dispatcher.submit`` in the caller's transaction, exactly as a handler would.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sandbox.appsetup import free_port
from sandbox.client import SandboxControl

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
CLIENT_ID, CLIENT_SECRET = "app.bench", "bench-secret"
PG = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception:  # not up yet
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready within {timeout:.0f}s")


class Stack:
    """Everything one dispatcher benchmark needs; use as a context manager."""

    def __init__(self, *, token_ttl: int | None = None, request_timeout: float = 60.0,
                 tls: bool = False) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="b24relay-dbench-"))
        self.db_name = f"b24relay_dbench_{secrets.token_hex(4)}"
        self.pg_admin = PG.rsplit("/", 1)[0] + "/postgres"
        self.db_url = PG.rsplit("/", 1)[0] + "/" + self.db_name
        self.token_ttl, self.request_timeout, self.tls = token_ttl, request_timeout, tls
        self.ca_file: str | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        self.env: dict[str, str] = {}
        self.app: Any = None
        self.sandbox: SandboxControl | None = None

    # ------------------------------------------------------------------ up and down
    def __enter__(self) -> Stack:
        self._database()
        self._redis()
        self._sandbox()
        self._app()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_workers()
        for proc in reversed(self.procs):
            self._stop(proc)
        if self.app is not None:
            from app.extensions import db

            with self.app.app_context():
                db.session.remove()
                db.engine.dispose()
        self._sql_admin(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')

    def _sql_admin(self, statement: str) -> None:
        from sqlalchemy import create_engine, text

        admin = create_engine(self.pg_admin, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(statement))
        admin.dispose()

    def _database(self) -> None:
        self._sql_admin(f'CREATE DATABASE "{self.db_name}"')

    def _redis(self) -> None:
        import redis

        port = free_port()
        self.procs.append(subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, cwd=self.workdir))
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        self.redis = redis.Redis(port=port)
        _wait(self.redis.ping, 10, "redis")

    def _sandbox(self) -> None:
        port = free_port()
        path = self.workdir / "sandbox.log"
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "sandbox", "--port", str(port), "--client-id", CLIENT_ID,
             "--client-secret", CLIENT_SECRET, *(["--https"] if self.tls else [])],
            cwd=ROOT, stdout=path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True))
        self.sandbox_url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        _wait(lambda: "sandbox cloud:" in path.read_text(), 20, "sandbox")
        if self.tls:
            line = [x for x in path.read_text().splitlines() if "B24_CA_BUNDLE" in x][0]
            self.ca_file = line.split(": ", 1)[1].strip()
        self.sandbox = SandboxControl(self.sandbox_url, ca_file=self.ca_file)
        settings: dict[str, Any] = {"request_timeout": self.request_timeout}
        if self.token_ttl:
            settings["token_ttl"] = self.token_ttl
        self.sandbox.settings(**settings)

    def _app(self) -> None:
        from cryptography.fernet import Fernet
        from flask_migrate import upgrade

        from app import create_app

        instance = self.workdir / "instance"
        instance.mkdir()
        self.env = {**os.environ, "DATABASE_URL": self.db_url, "REDIS_URL": self.redis_url,
                    "SECRET_KEY": secrets.token_hex(16),
                    "TOKEN_ENCRYPTION_KEY": Fernet.generate_key().decode(),
                    "B24RELAY_INSTANCE": str(instance), "B24_CLIENT_ID": CLIENT_ID,
                    "B24_CLIENT_SECRET": CLIENT_SECRET,
                    "B24_AUTH_SERVERS": self.sandbox_url,  # with its scheme (http or https)
                    "APP_PUBLIC_URL": "http://127.0.0.1:5000", "PYTHONPATH": str(ROOT),
                    "DRAMATIQ_NAMESPACE": "b24relay-dbench", "LOG_LEVEL": "WARNING"}
        self.env.pop("BROKER_URL", None)
        if self.ca_file:
            # SSL_CERT_FILE as well: the engine's client ignores B24_CA_BUNDLE for now
            # (tests/dispatcher/test_https_engine.py); httpx's default context reads it.
            self.env.update(B24_CA_BUNDLE=self.ca_file, SSL_CERT_FILE=self.ca_file)
        config = {"SQLALCHEMY_DATABASE_URI": self.db_url, "REDIS_URL": self.redis_url,
                  "SECRET_KEY": self.env["SECRET_KEY"], "INSTANCE_PATH": str(instance),
                  "TOKEN_ENCRYPTION_KEY": self.env["TOKEN_ENCRYPTION_KEY"],
                  "B24_CLIENT_ID": CLIENT_ID, "B24_CLIENT_SECRET": CLIENT_SECRET,
                  "DRAMATIQ_NAMESPACE": "b24relay-dbench", "DISPATCH_ENABLED": False}
        self.app = create_app(config)
        with self.app.app_context(), open(os.devnull, "w") as quiet, \
                contextlib.redirect_stderr(quiet):
            upgrade(directory=str(ROOT / "migrations"))

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # ------------------------------------------------------------------ portals
    def portal(self, plan: str = "standard", latency_ms: float = 0.0,
               latency_operating: bool = True, **create: Any) -> tuple[int, str]:
        """A sandbox portal for our app and its Portal row; (portal id, member_id)."""
        from app.extensions import db
        from app.tenants.models import Portal, PortalStatus, utcnow

        assert self.sandbox is not None
        info = self.sandbox.create_portal(plan=plan, client_id=CLIENT_ID,
                                          client_secret=CLIENT_SECRET, **create)
        if latency_ms:
            self.sandbox.set_latency(info["member_id"], latency_ms, operating=latency_operating)
        with self.app.app_context():
            row = Portal(member_id=info["member_id"], domain=info["domain"],
                         client_endpoint=info["client_endpoint"],
                         server_endpoint=info["server_endpoint"],
                         access_token=info["access_token"], refresh_token=info["refresh_token"],
                         expires_at=datetime.fromtimestamp(info["expires"], UTC),
                         token_version=1, status=PortalStatus.ACTIVE.value,
                         installed_at=utcnow())
            row.set_plan(plan)
            db.session.add(row)
            db.session.commit()
            return row.id, info["member_id"]

    def submit(self, portal_id: int, commands: list[tuple[str, dict[str, Any]]],
               priority: str = "realtime", chunk: int = 1000) -> list[int]:
        """Submit commands (method, params) in transactions of ``chunk``; their ids."""
        from app.dispatcher import Priority, submit
        from app.extensions import db

        ids: list[int] = []
        with self.app.app_context():
            for start in range(0, len(commands), chunk):
                for method, params in commands[start:start + chunk]:
                    ids.append(submit(portal_id, method, params,
                                      priority=Priority[priority.upper()]))
                db.session.commit()
        return ids

    def set_status(self, portal_id: int, status: str) -> None:
        """Set a portal's status directly (an outage that holds it, or its end)."""
        self.sql("UPDATE portals SET status = :s WHERE id = :p", s=status, p=portal_id)

    # ------------------------------------------------------------------ workers
    def start_workers(self, count: int = 1, threads: int = 2, **settings: str
                      ) -> list[subprocess.Popen[bytes]]:
        """``count`` dramatiq worker processes (each runs a dispatcher engine and the sweep)."""
        started = []
        for _ in range(count):
            log = (self.workdir / f"worker-{len(self.workers)}.log").open("ab")
            proc = subprocess.Popen(
                [sys.executable, "-m", "dramatiq", "--processes", "1", "--threads", str(threads),
                 "--worker-shutdown-timeout", "5000", "workers"],
                cwd=ROOT, env={**self.env, **settings}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
            self.workers.append(proc)
            started.append(proc)
        return started

    def worker_pids(self, proc: subprocess.Popen[bytes]) -> list[int]:
        """The dramatiq parent and its worker child processes."""
        out = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill_workers(self) -> None:
        """SIGKILL every worker process group at once."""
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.workers:
            proc.wait()
        self.workers.clear()

    def stop_workers(self) -> None:
        """SIGTERM every worker (batches in flight finish first)."""
        for proc in self.workers:
            self._stop(proc)
        self.workers.clear()

    # ------------------------------------------------------------------ outcomes
    def sql(self, query: str, **params: Any) -> list[Any]:
        """Run SQL on the bench database (its own short transaction); rows if any."""
        from sqlalchemy import text

        from app.extensions import db

        with self.app.app_context(), db.engine.begin() as conn:
            result = conn.execute(text(query), params)
            return list(result.all()) if result.returns_rows else []

    def statuses(self, portal_id: int | None = None) -> Counter[str]:
        """Outbox rows by status (of one portal, or all)."""
        where = "WHERE portal_id = :p" if portal_id is not None else ""
        rows = self.sql(f"SELECT status, count(*) FROM outbox_commands {where} GROUP BY status",
                        p=portal_id)
        return Counter({status: int(n) for status, n in rows})

    def wait_settled(self, total: int, timeout: float, portal_id: int | None = None) -> float:
        """Wait until ``total`` commands are done or dead; the monotonic time it happened."""
        def settled() -> bool:
            s = self.statuses(portal_id)
            return s["done"] + s["dead"] >= total

        _wait(settled, timeout, f"{total} commands settled")
        return time.monotonic()


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def save(name: str, text: str) -> Path:
    """Write a benchmark's table to bench/out/<name>-<time>.txt and print it."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    path.write_text(text + "\n")
    print(text, flush=True)
    return path
