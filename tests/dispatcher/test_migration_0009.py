"""Migration 0009 carries existing outbox rows over: on_done actor names become their tags,
dead rows are told apart as dead or unknown, bulk moves to its new number; and back."""

from __future__ import annotations

from typing import Any

from flask_migrate import downgrade, upgrade
from sqlalchemy import text

from app.extensions import db

_ROWS = [  # id, status, priority, dead_reason, on_done, on_done_sent
    (1, "done", 0, None, "tenants_users_page", True),
    (2, "done", 1, None, "tenants_setup_read", False),
    (3, "dead", 1, "unknown outcome: the worker stopped while it was in flight",
     "tenants_user_fetched", False),
    (4, "dead", 0, "NOT_FOUND: Not found", None, True),
    (5, "queued", 1, None, "someone_elses_actor", False),
]


def _insert_at_0008() -> None:
    db.session.execute(text(
        "INSERT INTO portals (id, member_id, domain, client_endpoint, token_version, plan, "
        "rate_per_second, rate_burst, status, created_at, updated_at) VALUES (1, 'm', 'd', "
        "'https://d/rest/', 1, 'standard', 2, 50, 'active', '2026-01-01', '2026-01-01')"))
    for id_, status, priority, reason, on_done, sent in _ROWS:
        db.session.execute(text(
            "INSERT INTO outbox_commands (id, portal_id, method, params, priority, status, "
            "attempts, dead_reason, on_done, on_done_sent, submitted_at, inbox_event_id) "
            "VALUES (:id, 1, 'user.get', '{}', :p, :s, 1, :r, :o, :sent, '2026-01-01', 9)"),
            {"id": id_, "p": priority, "s": status, "r": reason, "o": on_done, "sent": sent})
    db.session.commit()


def _rows(columns: str) -> list[Any]:
    return [tuple(r) for r in db.session.execute(
        text(f"SELECT id, {columns} FROM outbox_commands ORDER BY id"))]


def test_existing_rows_keep_their_meaning_up_and_down(make_app, scratch_database):
    app = make_app(SQLALCHEMY_DATABASE_URI=scratch_database)
    with app.app_context():
        upgrade(revision="0008")
        _insert_at_0008()
        upgrade(revision="0009")
        assert _rows("outcome, handler, settled, priority") == [
            (1, "done", "installation.users_page", True, 0),
            (2, "done", "installation.setup_read", False, 2),
            (3, "unknown", "installation.user_fetched", True, 2),
            (4, "dead", None, True, 0),
            (5, None, "someone_elses_actor", False, 2)]
        db.session.commit()
        downgrade(revision="0008")
        assert _rows("on_done, on_done_sent, priority") == [
            (1, "tenants_users_page", True, 0), (2, "tenants_setup_read", False, 1),
            (3, "tenants_user_fetched", True, 1), (4, None, True, 0),
            (5, "someone_elses_actor", False, 1)]
        db.session.commit()
        downgrade(revision="base")
        db.session.remove()
        db.engine.dispose()
