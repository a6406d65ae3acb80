"""Inbox rows are handled by real workers: done, parked, retried, dead-lettered, swept up."""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy import insert, update

from app.extensions import db
from app.ingress import inbox, processing
from app.ingress.models import InboxEvent
from app.tenants.models import Portal, utcnow
from tests.conftest import wait_for
from tests.ingress.conftest import add_inbox_row, inbox_rows, make_portal, statuses


def test_a_valid_event_is_processed_once_by_a_real_worker(portal, deliver, effects,
                                                          start_handler_worker):
    worker = start_handler_worker()
    response = deliver.b24(portal, event="TESTEFFECT")
    assert response.status_code == 200
    wait_for(lambda: statuses() == {"done": 1}, timeout=30)
    assert effects() == {response.json["id"]: 1}
    [row] = inbox_rows()
    assert row.processed_at is not None and row.attempts == 1
    assert "access_token" not in row.payload["auth"], "a finished row keeps no tokens"
    assert "application_token" not in row.payload["auth"], "nor the application token"
    assert worker.proc.poll() is None, worker.output()


def test_an_event_without_a_handler_is_parked_until_a_handler_exists(
        portal, deliver, effects, start_handler_worker):
    old = start_handler_worker()
    deal = deliver.b24(portal, event="ONCRMDEALUPDATE").json["id"]
    lead = deliver.b24(portal, event="ONCRMLEADADD").json["id"]
    wait_for(lambda: statuses() == {"unhandled": 2}, timeout=30)
    assert [row.attempts for row in inbox_rows()] == [0, 0], "parking spends no attempt"
    old.stop()
    # A deploy brings a handler for lead events; its sweeper hands the parked row out again.
    start_handler_worker(periodic=True, INBOX_SWEEP_INTERVAL="1", INGRESS_TEST_LATE_HANDLER="1")
    wait_for(lambda: statuses() == {"done": 1, "unhandled": 1}, timeout=40)
    assert effects() == {lead: 1}
    by_id = {row.id: row for row in inbox_rows()}
    assert by_id[deal].status == "unhandled", "still no handler for deal updates"
    assert by_id[lead].attempts == 1


def test_events_of_a_paused_portal_are_held_until_it_is_active_again(
        portal, deliver, effects, start_handler_worker):
    portal.status = "auth_failed"
    db.session.commit()
    start_handler_worker(periodic=True, INBOX_SWEEP_INTERVAL="1")
    row_id = deliver.b24(portal, event="TESTPAUSED").json["id"]
    wait_for(lambda: statuses() == {"held": 1}, timeout=30)
    time.sleep(3)  # a few sweeps: a held row stays held while the portal is paused
    [row] = inbox_rows()
    assert (row.status, row.attempts) == ("held", 0), "held, not dead, and no attempt spent"
    assert "auth_failed" in row.last_error
    db.session.execute(update(Portal).where(Portal.id == portal.id).values(status="active"))
    db.session.commit()
    wait_for(lambda: statuses() == {"done": 1}, timeout=30)
    assert effects() == {row_id: 1}
    assert inbox_rows()[0].attempts == 1


def test_transient_failures_are_retried_with_backoff(portal, deliver, effects,
                                                     start_handler_worker):
    start_handler_worker()
    ids = [deliver.b24(portal, event="TESTFLAKY", data={"ERROR": kind}).json["id"]
           for kind in ("ours", "transport", "rate")]
    wait_for(lambda: statuses() == {"done": 3}, timeout=40)
    assert [row.attempts for row in inbox_rows()] == [2, 2, 2]
    assert effects() == dict.fromkeys(ids, 1)


def test_what_keeps_failing_is_dead_lettered_with_its_reason(portal, deliver,
                                                             start_handler_worker):
    start_handler_worker(INBOX_RETRY_HORIZON_HOURS=str(3 / 3600), INBOX_RETRY_BACKOFF="0.2"
                         ).wait_ready()  # the horizon counts from delivery, not from boot
    deliver.b24(portal, event="TESTDOWN")
    deliver.b24(portal, event="TESTBROKEN")
    wait_for(lambda: statuses() == {"dead": 2}, timeout=40)
    down, broken = inbox_rows()
    assert down.attempts >= 2 and "gave up after 0.000833333 h" in down.last_error
    assert "portal still down" in down.last_error
    assert broken.attempts == 1 and broken.last_error.startswith("KeyError")


def test_a_transient_failure_is_retried_until_its_horizon_not_a_count_of_attempts(
        portal, deliver, start_handler_worker):
    # A 4-second horizon at 0.05-0.2 s backoff: many more attempts than the old budget of 5,
    # and dead only once the horizon has passed since the event arrived.
    start_handler_worker(INBOX_RETRY_HORIZON_HOURS=str(4 / 3600), INBOX_RETRY_BACKOFF="0.05",
                         INBOX_RETRY_BACKOFF_MAX="0.2").wait_ready()
    deliver.b24(portal, event="TESTDOWN")
    wait_for(lambda: statuses() == {"dead": 1}, timeout=30)
    [row] = inbox_rows()
    assert row.attempts > 5 and "gave up after" in row.last_error
    assert (row.processed_at - row.received_at).total_seconds() >= 4
    time.sleep(1)
    assert inbox_rows()[0].attempts == row.attempts, "nothing handles it after it went dead"


def _stuck_row(status: str, age_seconds: float, **values) -> int:
    return add_inbox_row(status, received_at=utcnow() - timedelta(seconds=age_seconds),
                         **values)


def test_the_sweeper_finds_lost_and_abandoned_rows_only(app):
    app.config.update(INBOX_REQUEUE_RECEIVED_AFTER=10, INBOX_REQUEUE_AFTER=30,
                      INBOX_PROCESSING_TIMEOUT=120)
    missed_broker = _stuck_row("received", 20)
    lost_message = _stuck_row("queued", 60)
    waiting_its_turn = _stuck_row("queued", 20)
    fresh = _stuck_row("received", 1)
    abandoned = _stuck_row("processing", 600, attempts=1, claimed_at=utcnow() - timedelta(
        seconds=300))
    busy = _stuck_row("processing", 600, attempts=1, claimed_at=utcnow())
    done = _stuck_row("done", 600)
    policy = inbox.SweepPolicy(received_after=10, queued_after=30, processing_after=120)
    assert {row_id for row_id, _ in inbox.stuck_rows(policy)} == \
        {missed_broker, lost_message, abandoned}
    assert processing.sweep() == 3
    assert processing.sweep() == 0, "a swept row is not swept again at once"
    by_id = {row.id: row for row in inbox_rows()}
    assert {by_id[i].status for i in (missed_broker, lost_message, abandoned)} == {"queued"}
    assert [by_id[i].status for i in (waiting_its_turn, fresh, busy, done)] == \
        ["queued", "received", "processing", "done"]


def test_a_queued_row_is_requeued_with_a_doubling_wait_up_to_a_cap(app):
    policy = inbox.SweepPolicy(queued_after=120, queued_after_cap=1800)

    def queued(age: float, requeued_ago: float | None) -> int:
        claimed = None if requeued_ago is None else utcnow() - timedelta(seconds=requeued_ago)
        return _stuck_row("queued", age, claimed_at=claimed)

    never_requeued = queued(130, None)
    waited_100_then_requeued = queued(250, 150)   # must now wait 120 s: it did
    waited_300_then_requeued = queued(500, 200)   # must now wait 300 s: not yet
    waited_long_then_requeued = queued(9000, 1850)  # the cap: 1800 s at most
    assert {row_id for row_id, _ in inbox.stuck_rows(policy)} == \
        {never_requeued, waited_100_then_requeued, waited_long_then_requeued}
    assert waited_300_then_requeued not in {r for r, _ in inbox.stuck_rows(policy)}
    app.config.update(INBOX_REQUEUE_AFTER=120)
    assert processing.sweep() == 3
    assert processing.sweep() == 0, "a swept row is not swept again at once"


def test_the_sweeper_releases_parked_rows_only_when_they_can_go_on(app, portal):
    paused = make_portal(status="auth_failed")
    unhandled = _stuck_row("unhandled", 5, event_type="TESTEFFECT")
    lowercase_pbx = _stuck_row("unhandled", 5, event_type="answer", source="pbx")
    legacy = _stuck_row("skipped", 5, event_type="TESTEFFECT")
    no_handler = _stuck_row("unhandled", 5, event_type="ONCRMDEALUPDATE")
    held_active = _stuck_row("held", 5, portal_id=portal.id)
    held_paused = _stuck_row("held", 5, portal_id=paused.id)
    policy = inbox.SweepPolicy(handled={"b24": ["TESTEFFECT"], "pbx": ["ANSWER"]})
    assert {row_id for row_id, _ in inbox.stuck_rows(policy)} == \
        {unhandled, lowercase_pbx, legacy, held_active}
    assert inbox.requeue_stuck(policy) == 4
    by_id = {row.id: row for row in inbox_rows()}
    assert [by_id[i].status for i in (unhandled, lowercase_pbx, legacy, held_active)] == \
        ["queued"] * 4
    assert by_id[no_handler].status == "unhandled" and by_id[held_paused].status == "held"


def test_the_periodic_sweeper_gets_stuck_rows_processed(app, effects, start_handler_worker):
    never_queued = _stuck_row("received", 120)
    worker_died = _stuck_row("processing", 120, attempts=1,
                             claimed_at=utcnow() - timedelta(seconds=120))
    start_handler_worker(periodic=True, INBOX_SWEEP_INTERVAL="1",
                         INBOX_REQUEUE_RECEIVED_AFTER="5", INBOX_PROCESSING_TIMEOUT="60")
    wait_for(lambda: statuses() == {"done": 2}, timeout=40)
    assert effects() == {never_queued: 1, worker_died: 1}


def test_a_second_message_for_a_finished_row_does_nothing(app, portal, deliver, effects,
                                                          start_handler_worker):
    start_handler_worker()
    row_id = deliver.b24(portal, event="TESTEFFECT").json["id"]
    wait_for(lambda: statuses() == {"done": 1}, timeout=30)
    assert processing.process(row_id) == "not_claimed"
    inbox.enqueue([row_id], "b24")  # a duplicate message reaches a worker too
    db.session.execute(insert(InboxEvent).values(
        member_id="x", source="b24", event_type="TESTEFFECT", dedupe_key="marker",
        payload={"event": "TESTEFFECT"}, unverified=False, status="received", attempts=0,
        received_at=utcnow()))
    db.session.commit()
    marker = inbox_rows()[-1].id
    inbox.enqueue([marker], "b24")
    wait_for(lambda: statuses() == {"done": 2}, timeout=30)
    assert effects() == {row_id: 1, marker: 1}
