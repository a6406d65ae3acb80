"""SQLite commits put the WAL on disk after releasing the write lock, not while holding it.

The embedded default's intake INSERT waited in SQLite's busy handler for the worker's
commits, each an fsync under the write lock (issue 20). Now a transaction commits with
``synchronous=NORMAL`` and the connection fdatasyncs the WAL before ``commit()`` returns;
autocommit statements keep FULL (app/extensions.py, ``SQLiteConnection``).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from app.extensions import db


@pytest.fixture
def sqlite_app(make_app: Any, tmp_path: Path) -> Any:
    """An app on a SQLite file of its own, whatever the suite's database is."""
    app = make_app(SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'commit.db'}")
    with app.app_context():
        with db.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        yield app


def _synchronous(conn: Any) -> int:
    return conn.exec_driver_sql("PRAGMA synchronous").scalar()


def test_a_transaction_commits_without_a_sync_and_autocommit_keeps_full(sqlite_app):
    with db.engine.connect() as conn:
        assert _synchronous(conn) == 1  # NORMAL: commit() flushes the WAL itself
        conn.rollback()
        auto = conn.execution_options(isolation_level="AUTOCOMMIT")
        assert _synchronous(auto) == 2  # FULL: no commit() follows a statement here
    with db.engine.connect() as conn:  # the same pooled connection, back from autocommit
        assert _synchronous(conn) == 1


def test_commit_returns_once_the_wal_is_flushed_and_the_lock_is_free_meanwhile(
        sqlite_app, tmp_path, monkeypatch):
    path = tmp_path / "commit.db"
    flushed: list[str] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        # While commit() flushes, another connection writes at once (no busy wait allowed):
        # the write lock was released before the sync, which FULL would have held it for.
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        other.execute("INSERT INTO t VALUES (2)")
        other.close()
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with db.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    monkeypatch.undo()
    assert flushed == [f"{path}-wal"]
    with db.engine.connect() as conn:
        assert sorted(conn.exec_driver_sql("SELECT x FROM t").scalars()) == [1, 2]


def test_a_read_only_transaction_flushes_nothing(sqlite_app, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(os, "fdatasync", calls.append)
    with db.engine.begin() as conn:
        conn.exec_driver_sql("SELECT count(*) FROM t").scalar()
    assert calls == []


def _lateness_ms(path: Path, hold: float) -> float:
    """Another connection holds the write lock for ``hold`` s while intake's autocommit
    INSERT waits for it: how long after the release the INSERT is done, in ms."""
    import threading
    import time

    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO t VALUES (0)")
    done: list[float] = []

    def insert() -> None:
        with db.engine.connect() as conn:
            auto = conn.execution_options(isolation_level="AUTOCOMMIT")
            auto.exec_driver_sql("INSERT INTO t VALUES (1)")
        done.append(time.perf_counter())

    from flask import current_app

    app = current_app._get_current_object()  # type: ignore[attr-defined]

    def in_app() -> None:
        with app.app_context():
            insert()

    waiter = threading.Thread(target=in_app)
    waiter.start()
    time.sleep(hold)
    holder.execute("COMMIT")
    released = time.perf_counter()
    holder.close()
    waiter.join(10)
    assert done, "the INSERT never finished"
    return (done[0] - released) * 1000


@pytest.mark.serial
def test_an_autocommit_insert_takes_the_write_lock_as_soon_as_it_frees(sqlite_app, tmp_path):
    # Released 34 ms in: SQLite's busy handler would try again only at 53 ms (its sleeps are
    # 1, 2, 5, 10, 15, 20 ms), 19 ms late; polling takes it within a millisecond or two.
    late = sorted(_lateness_ms(tmp_path / "commit.db", 0.034) for _ in range(7))
    assert late[3] < 8.0, f"an INSERT waited {late[3]:.1f} ms after the lock freed: {late}"


def test_a_transaction_keeps_the_busy_handler(sqlite_app):
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        conn.rollback()
        auto = conn.execution_options(isolation_level="AUTOCOMMIT")
        assert auto.exec_driver_sql("PRAGMA busy_timeout").scalar() == 0  # polled instead
