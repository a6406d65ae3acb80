"""``flask inbox dead`` and ``flask inbox replay``: an operator lists the events that failed for
good and, once the cause is fixed, runs them again through a real worker."""

from __future__ import annotations

from typing import Any

from app.extensions import db
from app.ingress.models import InboxEvent
from tests.conftest import wait_for
from tests.ingress.conftest import add_inbox_row, make_portal, queued_messages


def _row(portal: Any, status: str, reason: str | None = None) -> int:
    return add_inbox_row(status, portal, attempts=5 if status == "dead" else 1, last_error=reason)


def _inbox(app: Any, *args: str) -> Any:
    return app.test_cli_runner().invoke(args=["inbox", *args])


def _status(row_id: int) -> tuple[str, int]:
    db.session.rollback()
    row = db.session.get(InboxEvent, row_id)
    return row.status, row.attempts


def test_an_operator_lists_and_replays_dead_events(app, redis_client, effects,
                                                   start_handler_worker):
    first, second = make_portal(), make_portal()
    fixed = _row(first, "dead", "gave up after 5 attempts: portal timed out")
    still_broken = _row(first, "dead", "KeyError: 'ID'")
    others = _row(second, "dead", "the second portal's failure")
    finished = _row(first, "done")

    listed = _inbox(app, "dead", "--member-id", first.member_id)
    assert listed.exit_code == 0, listed.output
    assert "portal timed out" in listed.output and "KeyError" in listed.output
    assert "second portal" not in listed.output
    assert str(others) in _inbox(app, "dead").output  # without a portal: every portal's

    replayed = _inbox(app, "replay", str(fixed), str(finished))
    assert replayed.exit_code == 0, replayed.output
    assert f"replayed 1 event(s): {fixed}" in replayed.output
    assert f"left alone: {finished}" in replayed.output
    assert _status(fixed) == ("queued", 0) and queued_messages(redis_client, app) == 1

    start_handler_worker()
    wait_for(lambda: _status(fixed)[0] == "done", timeout=30)
    assert effects() == {fixed: 1}
    assert [_status(r)[0] for r in (still_broken, others, finished)] == ["dead", "dead", "done"]

    assert "replayed 1 event(s)" in _inbox(app, "replay", "--member-id", second.member_id).output
    wait_for(lambda: _status(others)[0] == "done", timeout=30)
    assert effects() == {fixed: 1, others: 1} and _status(still_broken)[0] == "dead"


def test_replay_needs_ids_or_a_portal_and_a_known_portal(app):
    assert _inbox(app, "replay").exit_code != 0
    unknown = _inbox(app, "replay", "--member-id", "nope")
    assert unknown.exit_code != 0 and "no portal with member_id" in unknown.output
    assert _inbox(app, "dead").output.strip() == "no dead events"
