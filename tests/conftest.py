"""Test wiring: app → database → redis → worker → sandbox, all real.

Databases: SQLite in a temp dir by default; PostgreSQL when ``DATABASE_URL`` is
set (the schema is built by the real migrations once per session and emptied
after every test). Redis: ``REDIS_URL`` when set, else the embedded server.
Workers are real ``dramatiq`` processes. The sandbox portal (``sandbox``
fixtures) is a fake Bitrix24 over loopback HTTP.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text

from app import create_app, embedded
from app.extensions import db
from app.ingress import enqueuer
from app.telephony import routing

# The sandbox portal's fixtures: sandbox_server (session) and sandbox (a SandboxControl).
pytest_plugins = ["sandbox.pytest_plugin"]

ROOT = Path(__file__).resolve().parent.parent
SESSION_KEYS = {
    "SECRET_KEY": "test-secret-" + uuid.uuid4().hex,
    "TOKEN_ENCRYPTION_KEY": Fernet.generate_key().decode(),
}
# The tests' PBX events are dated 2026-11-22: past TELEPHONY_REPLAY_AGE, every call would be
# a replay of a past call (no cards). The suite moves the bound out of their way (apps and
# workers alike); a test of replays gives its worker TELEPHONY_REPLAY_AGE itself.
os.environ.setdefault("TELEPHONY_REPLAY_AGE", str(100 * 365 * 86400))
_ORIGINAL_ENV = dict(os.environ)


@pytest.fixture(autouse=True)
def _reset_os_environ() -> Iterator[None]:
    """Whatever a test does to the environment is undone after it."""
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


def _xdist_worker() -> str:
    """``gw0``, ``gw1``... under pytest-xdist (``make test`` runs two), else empty."""
    return os.environ.get("PYTEST_XDIST_WORKER", "")


def _worker_redis_db(url: str) -> str:
    """Under xdist, worker N uses the database N below the given one (each flushes its own)."""
    worker = _xdist_worker()
    if not worker:
        return url
    parts = urlsplit(url)
    index = int(parts.path.strip("/") or 0) - int(worker.removeprefix("gw"))
    if index < 0:
        raise RuntimeError(f"REDIS_URL {url}: no database left for xdist worker {worker}")
    return urlunsplit(parts._replace(path=f"/{index}"))


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private instance folder for this test session."""
    return tmp_path_factory.mktemp("instance")


@pytest.fixture(scope="session")
def database_url(instance_dir: Path) -> str:
    """The database under test: DATABASE_URL, or a SQLite file."""
    from app.config import normalise_database_url

    url = _ORIGINAL_ENV.get("DATABASE_URL")
    if not url:
        return f"sqlite:///{instance_dir / 'test.db'}"
    url = normalise_database_url(url)
    worker = _xdist_worker()
    if worker:  # each xdist worker empties its tables after every test: one database each
        url = make_empty_database(url, f"{url.rsplit('/', 1)[1]}_{worker}")
    return url


@pytest.fixture(scope="session")
def redis_url(instance_dir: Path) -> Iterator[str]:
    """The Redis under test: REDIS_URL, or the embedded server (stopped at the end)."""
    url = _ORIGINAL_ENV.get("REDIS_URL")
    if url:
        yield _worker_redis_db(url)
        return
    yield embedded.ensure_running(instance_dir)
    embedded.stop(instance_dir)


@pytest.fixture(scope="session")
def base_config(instance_dir: Path, database_url: str, redis_url: str) -> dict[str, Any]:
    """Settings every test app shares; tests may extend a copy."""
    return {
        "TESTING": True,
        "INSTANCE_PATH": str(instance_dir),
        "SQLALCHEMY_DATABASE_URI": database_url,
        "REDIS_URL": redis_url,
        "DRAMATIQ_NAMESPACE": "b24relay-test",
        "APP_PUBLIC_URL": "http://127.0.0.1:5000",
        # An install or a settings save asks a worker for a self-diagnosis this long after:
        # an hour here, so no test's worker sends the round unasked (tests/install/
        # test_diagnosis.py sets it to 0 where it wants one).
        "DIAGNOSIS_SETTLE_SECONDS": 3600.0,
        **SESSION_KEYS,
    }


def child_env(config: dict[str, Any], **extra: str) -> dict[str, str]:
    """Environment for a real app/worker subprocess built from a test config."""
    env = {k: v for k, v in _ORIGINAL_ENV.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env.update({
        "B24RELAY_INSTANCE": config["INSTANCE_PATH"],
        "DATABASE_URL": config["SQLALCHEMY_DATABASE_URI"],
        "REDIS_URL": config["REDIS_URL"],
        "SECRET_KEY": config["SECRET_KEY"],
        "TOKEN_ENCRYPTION_KEY": config["TOKEN_ENCRYPTION_KEY"],
        "APP_PUBLIC_URL": config["APP_PUBLIC_URL"],
        "DRAMATIQ_NAMESPACE": config["DRAMATIQ_NAMESPACE"],
        "PYTHONPATH": str(ROOT),
    })
    for key in ("B24_CLIENT_ID", "B24_CLIENT_SECRET", "B24_OAUTH_TOKEN_URL", "BROKER_URL"):
        if config.get(key):
            env[key] = str(config[key])
    if config.get("B24_CLIENT_ID"):
        env["B24_SANDBOX"] = "1"  # the tests' portals are the sandbox's: not production
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def _schema(base_config: dict[str, Any]) -> None:
    """Build the schema once with the real migrations."""
    from flask_migrate import downgrade, upgrade

    app = create_app(dict(base_config))
    with app.app_context():
        downgrade(revision="base")  # a PostgreSQL left dirty by an earlier run starts clean
        upgrade()
        db.engine.dispose()


@pytest.fixture
def make_app(base_config: dict[str, Any], _schema: None) -> Iterator[Any]:
    """Factory for extra apps with overridden settings; their engines are closed after."""
    made: list[Any] = []

    def make(**overrides: Any) -> Any:
        application = create_app({**base_config, **overrides})
        made.append(application)
        return application

    yield make
    for application in made:
        enqueuer.drain(application)  # nothing sent into the next test's Redis
        routing.drain(application)  # a lookup past its 204 still holds a connection
        with application.app_context():
            db.session.remove()
            for engine in db.engines.values():
                engine.dispose()


def _empty_tables() -> None:
    tables = [t for t in reversed(db.metadata.sorted_tables)]
    with db.engine.begin() as conn:
        for table in tables:
            conn.execute(table.delete())


@pytest.fixture
def app(base_config: dict[str, Any], _schema: None, redis_client: Any) -> Iterator[Any]:
    """A fresh app on the session schema; every table is emptied afterwards."""
    application = create_app(dict(base_config))
    with application.app_context():
        yield application
        enqueuer.drain(application)  # nothing sent into the next test's Redis
        routing.drain(application)  # a lookup past its 204 still holds a connection
        db.session.remove()
        _empty_tables()
        db.engine.dispose()


@pytest.fixture
def client(app: Any) -> Any:
    """Flask's test client (in-process HTTP); use live servers for real sockets."""
    return app.test_client()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    """The Redis database under test, flushed before and after the test."""
    import redis

    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    yield r
    r.flushdb()
    r.close()


class WorkerProcess:
    """A real ``dramatiq workers`` process for the test app's broker and database."""

    def __init__(self, env: dict[str, str], processes: int = 1, threads: int = 4,
                 modules: tuple[str, ...] = ("workers",)) -> None:
        cmd = [sys.executable, "-m", "dramatiq", "--processes", str(processes),
               "--threads", str(threads), "--worker-shutdown-timeout", "5000", *modules]
        self.log = Path(env["B24RELAY_INSTANCE"]) / f"worker-{uuid.uuid4().hex[:8]}.log"
        self._log_fh = self.log.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log_fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the worker has processed a ping (needs the test app's context): a test
        whose clock starts at delivery must not count the worker's boot."""
        from app import health, queue

        nonce = uuid.uuid4().hex
        queue.enqueue("ping", nonce)
        wait_for(lambda: health.ping_result(nonce), timeout=timeout)

    def output(self) -> str:
        """What the worker printed so far (for assertion messages)."""
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = 15) -> None:
        """Stop the whole process group (SIGTERM by default, SIGKILL on request)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._log_fh.close()


@pytest.fixture
def start_worker(app: Any) -> Iterator[Any]:
    """Factory: start real worker processes; all are stopped after the test."""
    started: list[WorkerProcess] = []

    def start(processes: int = 1, threads: int = 4, periodic: bool = False,
              config: dict[str, Any] | None = None, modules: tuple[str, ...] = ("workers",),
              **extra_env: str) -> WorkerProcess:
        if not periodic:
            extra_env.setdefault("B24RELAY_NO_PERIODIC", "1")
        env = child_env(config or app.config, **extra_env)
        worker = WorkerProcess(env, processes, threads, modules)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; return its value or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s: {predicate}")


class StubHandler(BaseHTTPRequestHandler):
    """Base for a test's stand-in HTTP endpoint: silent, with a one-call answer."""

    def reply(self, status: int, body: bytes, content_type: str | None = None) -> None:
        """Send a complete answer: status, optional Content-Type, Content-Length, body."""
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class StubServer:
    """A real HTTP server on a free loopback port, serving ``handler`` from a daemon thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop serving and free the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def scratch_database(database_url: str) -> Iterator[str]:
    """A new empty database of the kind under test, dropped afterwards."""
    name = f"b24relay_scratch_{uuid.uuid4().hex[:8]}"
    url = make_empty_database(database_url, name)
    yield url
    admin = pg_admin_url(database_url)
    if admin is None:
        Path(url[len("sqlite:///"):]).unlink(missing_ok=True)
        return
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def pg_admin_url(database_url: str) -> str | None:
    """For PostgreSQL runs, a URL to the maintenance database (for create/drop)."""
    if not database_url.startswith("postgresql"):
        return None
    return database_url.rsplit("/", 1)[0] + "/postgres"


def make_empty_database(database_url: str, name: str) -> str:
    """A new empty database next to the test one (SQLite file or PostgreSQL DB)."""
    admin = pg_admin_url(database_url)
    if admin is None:
        path = Path(database_url[len("sqlite:///"):]).parent / f"{name}.db"
        path.unlink(missing_ok=True)
        return f"sqlite:///{path}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return database_url.rsplit("/", 1)[0] + f"/{name}"
