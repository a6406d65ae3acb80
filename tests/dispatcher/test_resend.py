"""Whether a command whose outcome is unknown (a timeout, a 504: it may have run) is sent
again is decided per command (protocol §8.13): register only with SHOW=0 and while its
CALL_START_DATE is younger than TELEPHONY_REGISTER_RESEND_WINDOW, by the engine's verdict and
by the sweep that recovers a stopped worker's leases alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from app.bitrix import BatchResult, errors
from app.dispatcher import outcomes, policy, submit
from app.dispatcher.models import OutboxCommand
from app.dispatcher.packer import Candidate
from app.dispatcher.sweep import sweep
from app.extensions import db
from app.tenants.models import utcnow
from tests.dispatcher.conftest import rows
from tests.ingress.conftest import make_portal as make_plain_portal

NOW = datetime(2026, 12, 7, 5, 0, tzinfo=UTC)
LIMITS = policy.ResendLimits(register_window=timedelta(seconds=1500))
REGISTER = "telephony.externalCall.register"


def register(started: datetime | str | None, **extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"USER_ID": 1, "PHONE_NUMBER": "+4930123456", "TYPE": 2,
                              "EXTERNAL_CALL_ID": "pbx-1", "SHOW": 0, **extra}
    if isinstance(started, datetime):
        params["CALL_START_DATE"] = started.isoformat(timespec="seconds")
    elif started is not None:
        params["CALL_START_DATE"] = started
    return params


@pytest.mark.parametrize("show", [0, "0", "", False, 0.0])
def test_a_young_register_with_show_off_may_be_sent_again(show):
    params = register(NOW - timedelta(minutes=5), SHOW=show)
    assert policy.resend_refusal(REGISTER, params, NOW, LIMITS) is None


@pytest.mark.parametrize("show", [None, 1, "1", "N", "false", "no", "Y", True])
def test_a_register_that_would_show_the_card_again_is_not(show):
    params = register(NOW - timedelta(minutes=5), SHOW=show)
    if show is None:
        del params["SHOW"]  # absent: Bitrix24 shows the card (§8.3)
    assert "SHOW" in policy.resend_refusal(REGISTER, params, NOW, LIMITS)


@pytest.mark.parametrize(("started", "why"), [
    (NOW - timedelta(seconds=1500), "1500 s old"),
    (NOW - timedelta(hours=2), "7200 s old"),
    (None, "never sent"),
    ("2026-12-07T04:59:00", "no offset"),
    ("yesterday", "does not parse"),
])
def test_a_register_whose_call_may_be_past_dedup_is_not_sent_again(started, why):
    refusal = policy.resend_refusal(REGISTER, register(started), NOW, LIMITS)
    assert refusal is not None and why in refusal


def test_without_call_start_date_the_call_is_as_old_as_the_first_send():
    params = register(None)
    sent = NOW - timedelta(minutes=3)
    assert policy.resend_refusal(REGISTER, params, NOW, LIMITS, sent) is None
    long_ago = NOW - timedelta(minutes=26)
    assert "1560 s old" in policy.resend_refusal(REGISTER, params, NOW, LIMITS, long_ago)


def test_the_window_is_measured_with_the_offset_and_the_setting():
    moscow = (NOW - timedelta(seconds=1499)).astimezone(
        datetime.fromisoformat("2026-01-01T00:00:00+03:00").tzinfo)
    assert policy.resend_refusal(REGISTER, register(moscow), NOW, LIMITS) is None
    short = policy.ResendLimits(register_window=timedelta(seconds=60))
    assert policy.resend_refusal(REGISTER, register(moscow), NOW, short) is not None


@pytest.mark.parametrize(("method", "refused"), [
    ("telephony.externalcall.show", False), ("telephony.externalCall.hide", False),
    ("crm.deal.get", False), ("telephony.externalcall.finish", True),
    ("crm.deal.add", True), ("vendor.unknown", True),
])
def test_other_methods_follow_the_static_table(method, refused):
    assert (policy.resend_refusal(method, {}, NOW, LIMITS) is not None) is refused


def _candidate(command_id: int, params: dict[str, Any]) -> Candidate:
    return Candidate(command_id, REGISTER.lower(), params, f"call:{command_id}", None, 0,
                     attempts=1, first_sent_at=NOW)


def test_the_engines_verdict_on_a_lost_register_depends_on_its_params():
    young = _candidate(1, register(NOW - timedelta(minutes=3)))
    old = _candidate(2, register(NOW - timedelta(minutes=40)))
    shown = _candidate(3, register(NOW - timedelta(minutes=3), SHOW=1))
    rules = outcomes.Rules(horizon=timedelta(hours=6), resend=LIMITS)
    lost = errors.AnswerTimeout("ReadTimeout")
    answer = BatchResult(results={}, errors={c.batch_key: lost for c in (young, old, shown)})
    got = {r["id"]: r for r in outcomes.decide([young, old, shown], answer, NOW, rules)[0]}
    assert (got[1]["status"], got[1]["outcome"]) == ("queued", None)
    assert got[1]["not_before"] - NOW < timedelta(seconds=2), "sent again within seconds"
    for dead in (2, 3):
        assert (got[dead]["status"], got[dead]["outcome"]) == ("dead", "unknown")
        assert got[dead]["dead_reason"].startswith("unknown outcome: AnswerTimeout")
    # judged for when the resend would leave (after its backoff)
    assert "CALL_START_DATE is 240" in got[2]["dead_reason"] and "SHOW" in got[3]["dead_reason"]


def test_the_sweep_recovers_a_stopped_workers_registers_by_their_params(app):
    portal = make_plain_portal()
    now = utcnow()
    young = submit(portal.id, REGISTER, register(now - timedelta(minutes=3)), key="call:1")
    old = submit(portal.id, REGISTER, register(now - timedelta(minutes=40)), key="call:2")
    db.session.commit()
    db.session.execute(update(OutboxCommand).where(OutboxCommand.id.in_([young, old])).values(
        status="inflight", lease_owner="gone", lease_until=now - timedelta(seconds=1)))
    db.session.commit()
    swept = sweep()
    assert (swept.requeued, swept.dead) == ([young], [old])
    by_id = {r.id: r for r in rows(portal.id)}
    assert by_id[young].status == "queued"
    assert (by_id[old].status, by_id[old].outcome) == ("dead", "unknown")
    assert by_id[old].dead_reason.startswith("unknown outcome: the worker stopped")
    assert "TELEPHONY_REGISTER_RESEND_WINDOW" in by_id[old].dead_reason


def test_a_finish_behind_a_hide_in_a_batch_lost_after_it_ran_is_judged_not_resent_blindly():
    """One call's hide then finish in one batch, answered 504 after it ran: the hide (safe to
    repeat) goes again, counted; the finish is not put back in the queue as if it had never
    run (its resend would meet "Call is not found"): it ends with an unknown outcome, which its
    handler hears of (telephony re-sends it and confirms with the statistics)."""
    hide = Candidate(1, "telephony.externalcall.hide", {"CALL_ID": "c1", "USER_ID": [2]},
                     "call:c1", None, 0, attempts=1, first_sent_at=NOW)
    finish = Candidate(2, "telephony.externalcall.finish", {"CALL_ID": "c1", "USER_ID": 1},
                       "call:c1", None, 0, attempts=1, first_sent_at=NOW, handler="t.finish")
    rules = outcomes.Rules(horizon=timedelta(hours=6), resend=LIMITS)
    lost = errors.TransportError("HTTP 504: a gateway page", http_status=504)
    assert outcomes.verdict_of(lost) is policy.Verdict.UNKNOWN
    rows_, effects = outcomes.decide([hide, finish], lost, NOW, rules)
    got = {r["id"]: r for r in rows_}
    assert (got[1]["status"], got[1]["attempts_delta"]) == ("queued", 0)
    assert (got[2]["status"], got[2]["outcome"]) == ("dead", "unknown")
    assert effects.settle == [2]
