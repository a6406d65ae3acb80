"""``flask outbox show|dead|replay``: an operator sees the dead letters and sends them again."""

from __future__ import annotations

from sqlalchemy import update

from app.dispatcher import submit
from app.dispatcher.models import OutboxCommand
from app.extensions import db
from tests.dispatcher.conftest import rows


def test_dead_commands_are_listed_and_replayed_with_a_nudge(oauth_app, make_portal, nudges):
    portal, info = make_portal()
    first = submit(portal.id, "crm.deal.add", {"fields": {"TITLE": "x"}})
    db.session.commit()
    nudges.read()
    db.session.execute(update(OutboxCommand).where(OutboxCommand.id == first)
                       .values(status="dead", attempts=4, dead_reason="ERROR_CORE: boom"))
    db.session.commit()
    runner = oauth_app.test_cli_runner()
    listed = runner.invoke(args=["outbox", "dead", "--member-id", info["member_id"]])
    assert "crm.deal.add" in listed.output and "ERROR_CORE: boom" in listed.output
    shown = runner.invoke(args=["outbox", "show"])
    assert "dead" in shown.output and info["member_id"] in shown.output
    replayed = runner.invoke(args=["outbox", "replay", "--all", "--member-id",
                                   info["member_id"]])
    assert replayed.exit_code == 0 and f"replayed 1 command(s): {first}" in replayed.output
    assert [(r.status, r.attempts, r.dead_reason) for r in rows(portal.id)] == [
        ("queued", 0, None)]
    assert nudges.read() == [[portal.id]]
