"""The dispatcher benchmarks' rig: a private Redis, a database, the sandbox portal process,
the app in this process (to submit), and dispatcher engines as separate processes.

The engine runs the way production runs it: ``flask dispatcher run`` in its own process
(one process = one engine). This process only submits through ``app.dispatcher.submit``
and reads the outbox rows back.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sandbox.appsetup import free_port

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
CLIENT_ID, CLIENT_SECRET = "app.bench.dispatch", "bench-dispatch-secret"
OPERATING_LIMIT = 1e9  # seconds per method per 10 minutes, sandbox and engines (see portal())


def _wait(check: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up")


class Rig:
    """Everything one benchmark run needs; ``close()`` tears it all down."""

    def __init__(self, database: str, pg: str) -> None:
        self.database = database
        self.workdir = Path(tempfile.mkdtemp(prefix="b24relay-dispatch-"))
        print(f"rig: logs in {self.workdir}", flush=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pg_admin = pg.rsplit("/", 1)[0] + "/postgres"
        self.db_name = f"b24relay_bench_{secrets.token_hex(4)}" if database == "pg" else None
        self.app: Any = None
        self.control: Any = None

    # ---------------------------------------------------------------- set-up
    def start(self) -> Rig:
        """Redis, the database (migrated), the sandbox; the app in this process."""
        from cryptography.fernet import Fernet

        redis_port = free_port()
        self._spawn(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no"], "redis")
        db_url = self._database()
        self.env = {**os.environ, "DATABASE_URL": db_url,
                    "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                    "SECRET_KEY": secrets.token_hex(16),
                    "TOKEN_ENCRYPTION_KEY": Fernet.generate_key().decode(),
                    "B24_CLIENT_ID": CLIENT_ID, "B24_CLIENT_SECRET": CLIENT_SECRET,
                    "B24_SANDBOX": "1",  # its portal is the sandbox's: DISPATCH_BUCKET_SCALE may
                    "B24RELAY_INSTANCE": str(self.workdir / "instance"),
                    "PROMETHEUS_MULTIPROC_DIR": str(self._mkdir("prom")),
                    "PYTHONPATH": str(ROOT), "LOG_LEVEL": "WARNING", "FLASK_APP": "wsgi",
                    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        self.env.pop("BROKER_URL", None)
        os.environ.update({k: v for k, v in self.env.items() if k != "PATH"})
        self._sandbox()
        self._app()
        return self

    def _mkdir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(exist_ok=True)
        return path

    def _spawn(self, argv: list[str], name: str, env: dict[str, str] | None = None
               ) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def _database(self) -> str:
        if self.database == "sqlite":
            return f"sqlite:///{self.workdir / 'bench.db'}"
        from sqlalchemy import create_engine, text

        admin = create_engine(self.pg_admin.replace("postgresql://", "postgresql+psycopg://"),
                              isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.db_name}"'))
        admin.dispose()
        return self.pg_admin.rsplit("/", 1)[0] + "/" + str(self.db_name)

    def _sandbox(self) -> None:
        from sandbox.client import SandboxControl

        port = free_port()
        self.sandbox = self._spawn([sys.executable, "-m", "sandbox", "--port", str(port)],
                                   "sandbox")
        self.control = SandboxControl(f"http://127.0.0.1:{port}")
        _wait(lambda: self.control.settings() is not None, "the sandbox")

    def _app(self) -> None:
        from flask_migrate import upgrade

        from app import create_app

        self.app = create_app()
        self.ctx = self.app.app_context()
        self.ctx.push()
        upgrade()

    def portal(self, plan: str = "standard", latency_ms: float = 0.0,
               bucket: tuple[float, float] | None = None) -> tuple[Any, str]:
        """A sandbox portal and its Portal row; returns (row, member_id)."""
        from app.extensions import db
        from app.tenants.models import Portal

        info = self.control.create_portal(plan=plan, client_id=CLIENT_ID,
                                          client_secret=CLIENT_SECRET)
        member = info["member_id"]
        if latency_ms:
            self.control.set_latency(member, latency_ms)
        if bucket:
            self.control.set_bucket(member, drain=bucket[0], burst=bucket[1])
        # The sandbox books a request's latency as its methods' operating time: at 2-30 s per
        # request the 480 s per 10 minutes would pause every scenario within seconds. These
        # runs measure batching and the rate bucket; engines get DISPATCH_OPERATING_LIMIT.
        self.control.set_operating_limit(OPERATING_LIMIT, member)
        row = Portal(member_id=member, domain=info["domain"],
                     client_endpoint=info["client_endpoint"],
                     server_endpoint=info["server_endpoint"],
                     access_token=info["access_token"], refresh_token=info["refresh_token"],
                     expires_at=datetime.fromtimestamp(info["expires"], UTC), token_version=1,
                     status="active", installed_at=datetime.now(UTC))
        row.set_plan(plan)  # the engine's K and bucket follow the row, as the sandbox's do
        db.session.add(row)
        db.session.commit()
        return row, member

    # ---------------------------------------------------------------- engines
    def engine(self, name: str = "engine", **settings: Any) -> subprocess.Popen[bytes]:
        """``flask dispatcher run`` in its own process with DISPATCH_* overrides; waits until
        it listens."""
        env = {**self.env, "DISPATCH_OPERATING_LIMIT": str(OPERATING_LIMIT),
               **{k: str(v) for k, v in settings.items()}}
        argv = ([sys.executable, "-m", "bench.engine_profile"] if "B24RELAY_BENCH_PROFILE" in env
                else [sys.executable, "-m", "flask", "dispatcher", "run"])
        proc = self._spawn(argv, name, env)
        log = self.workdir / f"{name}.log"
        _wait(lambda: "running" in log.read_text(errors="replace") or proc.poll() is not None,
              "the dispatcher engine", 30)
        if proc.poll() is not None:
            raise RuntimeError(log.read_text(errors="replace")[-3000:])
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def close(self) -> None:
        """Stop every process started here and drop the database."""
        for proc in reversed(self.procs):
            self.stop(proc, 5)
        if self.control is not None:
            self.control.close()
        if self.app is not None:
            from app.extensions import db

            db.session.remove()
            db.engine.dispose()
            self.ctx.pop()
        if self.db_name:
            from sqlalchemy import create_engine, text

            admin = create_engine(self.pg_admin.replace("postgresql://", "postgresql+psycopg://"),
                                  isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
            admin.dispose()

    def nudge(self, portal_id: int) -> None:
        """Wake the engines for a portal (as a commit that submitted would)."""
        from app.dispatcher import nudge
        from app.extensions import redis_ext

        nudge.publish(redis_ext.client, [portal_id])

    # ---------------------------------------------------------------- reading back
    def times(self, portal_id: int) -> list[tuple[str, float, float | None, float | None]]:
        """Each command's (status, submitted, first sent, completed) as epoch seconds."""
        from sqlalchemy import select

        from app.dispatcher.models import OutboxCommand as O
        from app.extensions import db

        def epoch(value: datetime | None) -> float | None:
            if value is None:
                return None
            return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()

        with db.engine.connect() as conn:
            rows = conn.execute(select(O.status, O.submitted_at, O.first_sent_at, O.completed_at)
                                .where(O.portal_id == portal_id)).all()
        return [(r[0], epoch(r[1]) or 0.0, epoch(r[2]), epoch(r[3])) for r in rows]

    def count_final(self, portal_id: int) -> int:
        """Commands of the portal that are done or dead."""
        from sqlalchemy import func, select

        from app.dispatcher.models import OutboxCommand as O
        from app.extensions import db

        with db.engine.connect() as conn:
            return conn.execute(select(func.count()).where(
                O.portal_id == portal_id, O.status.in_(("done", "dead")))).scalar_one()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of values (0.0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]


def repeatable(method: str, params: Any) -> bool:
    """Whether the dispatcher may send this command again after a lost answer: the per-command
    rule (a register with SHOW=0, young) or the method's table (app/dispatcher/policy.py)."""
    from datetime import UTC, datetime, timedelta

    from app.dispatcher.policy import ResendLimits, resend_refusal

    now = datetime.now(UTC)
    limits = ResendLimits(register_window=timedelta(seconds=1500))
    return resend_refusal(method, params if isinstance(params, dict) else {}, now, limits,
                          now) is None

