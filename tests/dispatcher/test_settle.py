"""Settling outcomes: the handler runs once per finished command, in one commit with the
row marked settled; what it needs it gets from the Outcome, never from the table."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from app.dispatcher import NotYet, Outcome, OutcomeKind, earlier, outcome_handler, submit
from app.dispatcher.models import OutboxCommand
from app.dispatcher.results import settle
from app.dispatcher.sweep import resend_settle, sweep
from app.extensions import db
from app.tenants.models import utcnow
from tests.dispatcher.conftest import rows
from tests.ingress.conftest import make_portal as make_plain_portal

SEEN: list[Outcome] = []
FAIL = {"on": False}


@outcome_handler("tests.settle.count")
def _count(outcome: Outcome) -> None:
    SEEN.append(outcome)


@outcome_handler("tests.settle.flaky")
def _flaky(outcome: Outcome) -> None:
    submit(outcome.portal_id, "crm.deal.add", {"fields": {"TITLE": "follow-up"}})
    if FAIL["on"]:
        raise RuntimeError("the handler's database went away")


@outcome_handler("tests.settle.chain")
def _chain(outcome: Outcome) -> None:
    SEEN.extend([*earlier(outcome), outcome])


@pytest.fixture(autouse=True)
def _fresh() -> None:
    SEEN.clear()
    FAIL["on"] = False


def _finish(command_id: int, status: str = "done", **columns: Any) -> None:
    db.session.execute(update(OutboxCommand).where(OutboxCommand.id == command_id).values(
        status=status, outcome=columns.pop("outcome", status), completed_at=utcnow(),
        **columns))
    db.session.commit()


def test_a_settle_sent_twice_runs_the_handler_once(app):
    portal = make_plain_portal()
    command = submit(portal.id, "crm.deal.get", {"id": 7}, handler="tests.settle.count",
                     context={"deal": 7, "why": "card"})
    db.session.commit()
    assert settle(command) is False, "nothing to settle before it finishes"
    _finish(command, "dead", error={"error": "NOT_FOUND", "error_description": "Not found"},
            dead_reason="NOT_FOUND: Not found")
    assert settle(command) is True
    assert settle(command) is False
    assert len(SEEN) == 1
    seen = SEEN[0]
    assert (seen.command_id, seen.portal_id, seen.method, seen.kind, seen.ok) == (
        command, portal.id, "crm.deal.get", OutcomeKind.DEAD, False)
    assert seen.context == {"deal": 7, "why": "card"} and seen.params == {"id": 7}
    assert (seen.reason, seen.error["error"]) == ("NOT_FOUND: Not found", "NOT_FOUND")
    assert rows(portal.id)[0].settled is True


def test_a_failing_handler_leaves_the_outcome_unsettled_and_its_writes_undone(app):
    portal = make_plain_portal()
    command = submit(portal.id, "crm.deal.add", {}, handler="tests.settle.flaky")
    db.session.commit()
    _finish(command, result=42)
    FAIL["on"] = True
    with pytest.raises(RuntimeError):
        settle(command)
    assert [(r.id, r.settled) for r in rows(portal.id)] == [(command, False)]
    FAIL["on"] = False
    assert settle(command) is True
    assert [(r.method, r.settled) for r in rows(portal.id)] == [("crm.deal.add", True),
                                                                ("crm.deal.add", True)]


def test_an_unknown_tag_is_settled_as_unhandled(app, caplog):
    portal = make_plain_portal()
    command = submit(portal.id, "crm.deal.add", {}, handler="tests.settle.nobody")
    db.session.commit()
    _finish(command, "dead", outcome="unknown", dead_reason="unknown outcome: timed out")
    with caplog.at_level(logging.WARNING):
        assert settle(command) is True
    assert "tests.settle.nobody" in caplog.text
    assert rows(portal.id)[0].settled is True


def test_a_handler_gets_its_keys_earlier_outcomes_once_they_are_in(app):
    portal = make_plain_portal()
    first = submit(portal.id, "app.info", {}, key="run")
    last = submit(portal.id, "user.get", {}, key="run", handler="tests.settle.chain")
    submit(portal.id, "user.get", {}, key="another run")
    db.session.commit()
    _finish(last, result=[{"ID": "1"}])
    with pytest.raises(NotYet):  # the batch finished the last read; the first is retried
        settle(last)
    assert SEEN == [] and not [r for r in rows(portal.id) if r.id == last][0].settled
    _finish(first, result={"ID": 1})
    assert settle(last) is True
    assert [(o.command_id, o.kind, o.result) for o in SEEN] == [
        (first, OutcomeKind.DONE, {"ID": 1}), (last, OutcomeKind.DONE, [{"ID": "1"}])]


def test_the_sweep_resends_settles_nobody_sent_and_ones_sent_long_ago(app):
    portal = make_plain_portal()
    done = submit(portal.id, "crm.deal.add", {}, handler="tests.settle.count")
    dead = submit(portal.id, "crm.deal.add", {}, handler="tests.settle.count")
    plain = submit(portal.id, "crm.deal.add", {})
    waiting = submit(portal.id, "crm.deal.add", {}, handler="tests.settle.count")
    db.session.commit()
    _finish(done)
    _finish(dead, "dead", dead_reason="ERROR_CORE: boom")
    _finish(plain)
    now = utcnow()
    assert resend_settle(now) == [], "the engine sends its own first"
    assert sorted(resend_settle(now + timedelta(minutes=1))) == [done, dead]
    assert resend_settle(now + timedelta(minutes=2)) == [], "sent: not again at once"
    assert sorted(resend_settle(now + timedelta(hours=1))) == [done, dead]
    settle(done)
    assert resend_settle(now + timedelta(hours=2)) == [dead]
    assert waiting not in resend_settle(now + timedelta(days=1))


def test_a_stopped_workers_unknown_outcome_is_sent_to_its_handler_at_once(app):
    portal = make_plain_portal()
    add = submit(portal.id, "crm.deal.add", {}, handler="tests.settle.count",
                 context={"call": "pbx-9"})
    db.session.commit()
    db.session.execute(update(OutboxCommand).where(OutboxCommand.id == add).values(
        status="inflight", lease_owner="gone", lease_until=utcnow() - timedelta(seconds=1)))
    db.session.commit()
    swept = sweep()
    assert swept.dead == [add] and add in swept.notified
    row = rows(portal.id)[0]
    assert (row.status, row.outcome, row.settled) == ("dead", "unknown", False)
    assert row.settle_sent_at is not None
    assert settle(add) is True
    assert [(o.kind, o.context) for o in SEEN] == [(OutcomeKind.UNKNOWN, {"call": "pbx-9"})]
