"""Extensions, created unbound: no I/O happens at import time."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeVar

import redis
from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Table, event
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


def configure_database(app: Flask) -> None:
    """Engine options: a bounded connect on PostgreSQL; WAL, a busy timeout and FK checks on
    SQLite (shared by web and worker processes)."""
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
    app.config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", {"connect_args": {"timeout": 30}})


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection: object, connection_record: object) -> None:
    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
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
