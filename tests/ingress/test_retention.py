"""Inbox retention: finished rows go in time, parked rows expire to dead, live rows stay."""

from __future__ import annotations

import uuid
from datetime import timedelta

from app.extensions import db
from app.ingress.models import InboxEvent, InboxStatus
from app.ingress.retention import Retention, prune
from app.tenants.models import utcnow
from tests.conftest import wait_for
from tests.ingress.conftest import inbox_rows, make_portal

DAY = timedelta(days=1)


def _row(portal_id: int, status: str, age: timedelta, processed_age: timedelta | None = None,
         event_type: str = "ONCRMDEALUPDATE") -> int:
    now = utcnow()
    row = InboxEvent(portal_id=portal_id, member_id="m", source="b24", event_type=event_type,
                     dedupe_key=uuid.uuid4().hex, payload={"event": event_type}, status=status,
                     received_at=now - age,
                     processed_at=None if processed_age is None else now - processed_age)
    db.session.add(row)
    db.session.commit()
    return row.id


def test_each_kind_of_row_is_kept_for_its_own_time(app):
    portal = make_portal()
    keep = {
        "fresh done": _row(portal.id, "done", 6 * DAY, 6 * DAY),
        "old queued": _row(portal.id, "queued", 90 * DAY),
        "old received": _row(portal.id, "received", 90 * DAY),
        "old processing": _row(portal.id, "processing", 90 * DAY),
        "recently dead": _row(portal.id, "dead", 60 * DAY, 29 * DAY),
        "young unhandled": _row(portal.id, "unhandled", 29 * DAY),
        "young held": _row(portal.id, "held", 29 * DAY),
    }
    gone = {
        "old done": _row(portal.id, "done", 8 * DAY, 8 * DAY),
        "old dead": _row(portal.id, "dead", 31 * DAY, 31 * DAY),
    }
    expire = {
        "old unhandled": _row(portal.id, "unhandled", 31 * DAY),
        "old held": _row(portal.id, "held", 31 * DAY),
        "old legacy skipped": _row(portal.id, "skipped", 31 * DAY),
    }

    result = prune(Retention(done_days=7, dead_days=30, park_days=30))

    rows = {r.id: r for r in inbox_rows()}
    assert result == {"expired": 3, "done_deleted": 1, "dead_deleted": 1}
    assert set(rows) == set(keep.values()) | set(expire.values())
    assert not set(rows) & set(gone.values())
    for name, row_id in expire.items():
        assert rows[row_id].status == InboxStatus.DEAD.value, name
        assert rows[row_id].last_error.startswith("expired: parked as "), name
        assert "30 days" in rows[row_id].last_error
    assert {rows[i].status for i in keep.values()} == {
        "done", "queued", "received", "processing", "dead", "unhandled", "held"}

    # An expired row is dead from now on, so it is kept for dead_days more, then deleted.
    assert prune(Retention(), now=utcnow() + 29 * DAY)["dead_deleted"] == 1  # "recently dead"
    assert prune(Retention(), now=utcnow() + 31 * DAY)["dead_deleted"] == 3


def test_deletes_run_in_batches_until_nothing_is_left(app):
    portal = make_portal()
    for _ in range(23):
        _row(portal.id, "done", 10 * DAY, 10 * DAY)
    for _ in range(9):
        _row(portal.id, "unhandled", 40 * DAY)
    _row(portal.id, "done", DAY, DAY)
    assert prune(Retention(batch=7)) == {"expired": 9, "done_deleted": 23, "dead_deleted": 0}
    assert sorted(r.status for r in inbox_rows()) == ["dead"] * 9 + ["done"]


def test_a_worker_prunes_on_its_own_schedule(app, start_worker):
    portal = make_portal()
    old = _row(portal.id, "done", 8 * DAY, 8 * DAY)
    young = _row(portal.id, "done", DAY, DAY)
    start_worker(periodic=True, INBOX_PRUNE_INTERVAL="1", INBOX_KEEP_DONE_DAYS="7")
    wait_for(lambda: [r.id for r in inbox_rows()] == [young], timeout=60)
    assert old not in [r.id for r in inbox_rows()]
