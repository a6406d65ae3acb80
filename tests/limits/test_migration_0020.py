"""Migration 0020: the never-read default of 4 batches in flight becomes automatic (NULL) for
every existing portal, the new columns start as the app's defaults; and back."""

from __future__ import annotations

from typing import Any

from flask_migrate import downgrade, upgrade
from sqlalchemy import text

from app.extensions import db


def _settings() -> list[Any]:
    return [tuple(r) for r in db.session.execute(text(
        "SELECT portal_id, max_batches_in_flight FROM portal_settings ORDER BY portal_id"))]


def test_existing_portals_get_the_apps_rule_up_and_down(make_app, scratch_database):
    app = make_app(SQLALCHEMY_DATABASE_URI=scratch_database)
    with app.app_context():
        upgrade(revision="0019")
        for pid in (1, 2):
            db.session.execute(text(
                "INSERT INTO portals (id, member_id, domain, client_endpoint, token_version, "
                "plan, rate_per_second, rate_burst, status, created_at, updated_at) VALUES "
                "(:id, :m, 'd', 'https://d/rest/', 1, 'standard', 2, 50, 'active', "
                "'2026-01-01', '2026-01-01')"), {"id": pid, "m": f"m{pid}"})
            db.session.execute(text(
                "INSERT INTO portal_settings (id, portal_id, event_mode, lines, crm_create, "
                "max_batches_in_flight, updated_at) VALUES (:id, :id, 'online', '[]', true, 4, "
                "'2026-01-01')"), {"id": pid})
        db.session.commit()
        upgrade(revision="0020")
        assert _settings() == [(1, None), (2, None)]
        assert [tuple(r) for r in db.session.execute(text(
            "SELECT sequential, route_priority, route_skip_absent FROM portal_settings"))] == [
            (None, None, None)] * 2
        db.session.execute(text("UPDATE portal_settings SET max_batches_in_flight = 9 "
                                "WHERE portal_id = 2"))
        db.session.commit()
        downgrade(revision="0019")
        assert _settings() == [(1, 4), (2, 9)]
        db.session.commit()
        downgrade(revision="base")
        db.session.remove()
        db.engine.dispose()
