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
