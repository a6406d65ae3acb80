"""Migrations: one head, up and down on the database under test, schema == models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from flask_migrate import downgrade, upgrade
from sqlalchemy import inspect

from app import MIGRATIONS_DIR
from app.extensions import db


def _script() -> ScriptDirectory:
    return ScriptDirectory(MIGRATIONS_DIR)


def test_single_alembic_head():
    heads = _script().get_heads()
    assert len(heads) == 1, f"Alembic has several heads, merge them: {heads}"


def test_every_revision_file_is_named_after_its_revision():
    for rev in _script().walk_revisions():
        assert rev.path.split("/")[-1].startswith(f"{rev.revision}_"), rev.path


def test_upgrade_downgrade_upgrade_matches_models(make_app, scratch_database):
    app = make_app(SQLALCHEMY_DATABASE_URI=scratch_database)
    with app.app_context():
        upgrade()
        tables = set(inspect(db.engine).get_table_names())
        assert {"portals", "portal_settings", "alembic_version"} <= tables
        downgrade(revision="base")
        assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
        upgrade()
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), db.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
        db.engine.dispose()
