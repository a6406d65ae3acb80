"""Extensions, created unbound: no I/O happens at import time."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import redis
from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import BigInteger, Integer, Table, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase

from app import embedded
from app.config import private_sqlite


class Base(DeclarativeBase):
    """Declarative base shared by every model module."""


db = SQLAlchemy(model_class=Base)

if TYPE_CHECKING:
    from flask_sqlalchemy.model import Model as _FlaskModel

    class Model(_FlaskModel, Base):
        """What ``db.Model`` is at run time, spelled so mypy accepts it as a base class: mypy
        cannot subclass an attribute (python/mypy#8603)."""

        __table__: ClassVar[Table]  # every model declares __tablename__: a Table, not a join
else:
    Model = db.Model

# A BIGINT primary key on PostgreSQL; SQLite autoincrements only an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer, "sqlite")


def configure_database(app: Flask) -> None:
    """Engine options: a bounded connect on PostgreSQL; WAL, a busy timeout, FK checks and
    commits that sync the WAL outside the write lock on SQLite (shared by web and worker
    processes; see :class:`SQLiteConnection`)."""
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    if uri.startswith("postgresql"):
        # A server that accepts but never answers (hung, or a half-open network path) would
        # hold an intake thread forever; after DB_CONNECT_TIMEOUT seconds the event gets 503.
        # No pool_pre_ping: it costs a round trip per request. A connection found dead is
        # invalidated by SQLAlchemy; intake retries once on it (retry_if_connection_died below),
        # workers retry the message, pages answer one error after a database restart.
        app.config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", {"connect_args": {
            "connect_timeout": int(app.config["DB_CONNECT_TIMEOUT"])}})
        return
    if not uri.startswith("sqlite"):
        return
    if uri.startswith("sqlite:///") and ":memory:" not in uri:  # customer data: 0600, 0700
        private_sqlite(Path(uri[len("sqlite:///"):].split("?", 1)[0]),
                       Path(app.config["INSTANCE_PATH"]))
    app.config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", {"connect_args": {
        "timeout": BUSY_TIMEOUT_MS / 1000, "factory": SQLiteConnection}})


# sqlite3's own descriptor, which the subclass below wraps (typeshed types the attribute as
# its value, so it is read from the class's namespace).
_SQLITE_ISOLATION: Any = vars(sqlite3.Connection)["isolation_level"]


class SQLiteConnection(sqlite3.Connection):
    """A SQLite connection whose commit flushes the WAL after the write lock is released.

    SQLite has one write lock per database. With ``synchronous=FULL`` a commit fsyncs the WAL
    while it holds that lock, and every other writer waits in SQLite's busy handler, which
    sleeps 1, 2, 5, 10, 15, 20 ms... between tries and is not woken when the lock frees. On
    ``make run``'s stack the worker commits twice per event (claim, finish), so an intake
    INSERT found the lock taken by a worker's fsync and slept through those steps: 5 % of
    the events took 20-56 ms (issue 20; README, *The embedded default*). So a transaction
    commits with ``synchronous=NORMAL`` (no sync under the lock) and :meth:`commit` then
    fdatasyncs the WAL itself before it returns: a caller still gets control back only once
    its transaction is on disk, as with FULL; other connections may read it a moment sooner.
    In autocommit (intake's single INSERT) no commit() follows a statement, so the connection
    is switched to FULL there and SQLite syncs each statement itself, as before. Only in WAL
    mode on a file; otherwise the connection keeps SQLite's FULL throughout.
    """

    wal: str | None = None  # the WAL file's path, set by _sqlite_pragmas in WAL mode
    _dir_synced = False

    @property  # type: ignore[override]
    def isolation_level(self) -> str | None:
        """sqlite3's own: None is autocommit."""
        return _SQLITE_ISOLATION.__get__(self)  # type: ignore[no-any-return]

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        if self.in_transaction:  # sqlite3 would commit it too: with our flush
            self.commit()
        _SQLITE_ISOLATION.__set__(self, value)
        self.sync_mode()

    def sync_mode(self) -> None:
        """FULL in autocommit (SQLite syncs each statement), NORMAL for transactions; in
        autocommit the waits for the write lock are polled (:class:`PollingCursor`)."""
        if self.wal is not None:
            autocommit = self.isolation_level is None
            self.execute(f"PRAGMA synchronous={'FULL' if autocommit else 'NORMAL'}")
            self.execute(f"PRAGMA busy_timeout={0 if autocommit else BUSY_TIMEOUT_MS}")

    def cursor(self, factory: Any = None) -> sqlite3.Cursor:  # type: ignore[override]
        """Cursors that poll for the write lock in autocommit (see PollingCursor)."""
        return super().cursor(factory or PollingCursor)

    def commit(self) -> None:
        """Commit, then put the WAL on disk (outside the write lock) before returning."""
        wrote = self.in_transaction
        super().commit()
        if wrote and self.wal is not None:
            self._flush(self.wal)

    def _flush(self, wal: str) -> None:
        try:
            fd = os.open(wal, os.O_RDONLY)
        except FileNotFoundError:  # the journal mode was changed behind us: SQLite's own syncs
            return
        try:
            os.fdatasync(fd)  # every frame written to the file so far, ours included
        finally:
            os.close(fd)
        if not self._dir_synced:  # once per connection: the WAL file's own directory entry
            folder = os.open(os.path.dirname(wal) or ".", os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
            self._dir_synced = True


BUSY_TIMEOUT_MS = 30000  # how long a statement waits for the write lock, either way
BUSY_POLL_SECONDS = 0.0005
SQLITE_BUSY = 5


class PollingCursor(sqlite3.Cursor):
    """In autocommit, a statement that finds the write lock taken is tried again every
    half millisecond, instead of in SQLite's busy handler.

    The busy handler sleeps 1, 2, 5, 10, 15, 20, 25... ms between tries and is not woken
    when the lock frees. On ``make run``'s stack a worker's transactions hold the lock for a
    millisecond or two each, but there are many of them (claims, finishes, the enqueuer, the
    settle actor), so intake's INSERT could find it taken several tries in a row and sleep
    through the steps: 33, 53, 78 ms for an event that needs 3 (issue 20). Polling takes the
    lock within half a millisecond of its release. Only in autocommit, where a statement
    is the whole transaction and a busy one did nothing, so trying it again is always safe:
    that is intake's INSERT (app/ingress/inbox/storing.py); transactions keep the handler.
    """

    def execute(self, sql: str, parameters: Any = (), /) -> PollingCursor:  # type: ignore[override]
        connection = self.connection
        if not isinstance(connection, SQLiteConnection) or connection.wal is None \
                or connection.isolation_level is not None:
            super().execute(sql, parameters)
            return self
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                super().execute(sql, parameters)
                return self
            except sqlite3.OperationalError as exc:
                busy = getattr(exc, "sqlite_errorcode", 0) & 0xFF == SQLITE_BUSY
                if not busy or time.monotonic() >= deadline:
                    raise
            time.sleep(BUSY_POLL_SECONDS)


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection: object, connection_record: object) -> None:
    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    cursor = dbapi_connection.cursor()
    mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    if isinstance(dbapi_connection, SQLiteConnection) and str(mode).lower() == "wal":
        path = next((row[2] for row in cursor.execute("PRAGMA database_list") if row[1] == "main"),
                    "")
        if path:
            dbapi_connection.wal = f"{path}-wal"
            dbapi_connection.sync_mode()
    cursor.close()
migrate = Migrate()


class RedisExtension:
    """One redis-py client per app, from ``REDIS_URL`` or the embedded server."""

    def __init__(self) -> None:
        self._client: redis.Redis | None = None
        self.url: str | None = None

    def init_app(self, app: Flask) -> None:
        """Resolve the URL (starting the embedded server if needed) and build the client."""
        url = app.config["REDIS_URL"]
        if not url:
            url = embedded.ensure_running(Path(app.config["INSTANCE_PATH"]))
            app.config["REDIS_URL"] = url
        self.url = url
        self._client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2,
                                           health_check_interval=30)
        app.extensions["redis"] = self

    @property
    def client(self) -> redis.Redis:
        """The shared client; raises if the app was never initialised."""
        if self._client is None:
            raise RuntimeError("redis extension used before init_app")
        return self._client


redis_ext = RedisExtension()


T = TypeVar("T")


def retry_if_connection_died(work: Callable[[], T], reset: Callable[[], None] | None = None) -> T:
    """Run ``work``; if its pooled connection was dead (the database restarted), once more.

    SQLAlchemy drops the whole pool when it sees a dead connection, so the second run
    gets a fresh one. With pool_pre_ping off, this is what the request paths use
    instead; ``reset`` (a session rollback, say) runs between the two.
    """
    try:
        return work()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        if reset is not None:
            reset()
        return work()
