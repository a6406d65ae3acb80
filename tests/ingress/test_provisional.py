"""Events for a portal that awaits its application_token: kept, never processed unverified.

The portal here is as the short iframe form leaves it: installed by a verified admin,
``active``, no application_token until ONAPPINSTALL's handler records one (simulated
by writing it, as that handler does; tests/install/test_late_events.py runs the real one).
"""

from __future__ import annotations

import json

import pytest
from prometheus_client import REGISTRY

import tests.ingress.effect_handlers  # noqa: F401 - registers TESTEFFECT in this process
from app.extensions import db
from app.ingress import processing
from app.ingress.models import InboxStatus
from app.tenants.models import Portal
from tests.ingress.conftest import (
    FORM,
    b24_body,
    inbox_count,
    inbox_rows,
    make_portal,
    queued_messages,
)

REAL = "a1" * 16
FORGED = "f0" * 16
ACCESS_TOKEN = "s6p6eclrvim6da22"  # what b24_body puts into auth[access_token]


@pytest.fixture
def waiting(app) -> Portal:
    """Installed from the short form; its ONAPPINSTALL has not arrived."""
    return make_portal(application_token=None)


def _deliver(client, portal: Portal, token: str, **kw):
    return client.post("/b24/events", headers=FORM,
                       data=b24_body(portal.member_id, token, event="TESTEFFECT", **kw))


def _provisional(outcome: str) -> float:
    return REGISTRY.get_sample_value("b24relay_provisional_events_total",
                                     {"outcome": outcome}) or 0.0


def _token_arrives(portal: Portal, token: str) -> None:
    portal.application_token = token  # what ONAPPINSTALL's handler records, once verified
    db.session.commit()


def test_a_kept_event_is_stored_sealed_and_nothing_processes_it(app, client, waiting,
                                                                redis_client, effects):
    response = _deliver(client, waiting, REAL)
    assert response.status_code == 200  # stored: Bitrix24 would never send it again
    [row] = inbox_rows()
    assert (row.status, row.unverified) == (InboxStatus.PROVISIONAL.value, True)
    stored = json.dumps(row.payload)
    assert REAL not in stored and ACCESS_TOKEN not in stored  # its claim is sealed
    assert queued_messages(redis_client, app) == 0

    assert processing.process(row.id) == "not_claimed"  # a stray message finds nothing
    processing.sweep()  # nor does the sweeper queue it while the token is missing
    assert [r.status for r in inbox_rows()] == [InboxStatus.PROVISIONAL.value]
    assert queued_messages(redis_client, app) == 0 and effects() == {}


def test_the_token_releases_its_events_and_a_forged_copy_is_dropped(app, client, waiting,
                                                                    redis_client, effects):
    forged_before = _provisional("forged")
    # The forger copies the real event's body (same ts, data) and gets there first.
    assert _deliver(client, waiting, FORGED).status_code == 200
    assert _deliver(client, waiting, REAL).status_code == 200
    forged_id, real_id = (r.id for r in inbox_rows())

    _token_arrives(waiting, REAL)
    processing.sweep()
    [row] = inbox_rows()
    assert (row.id, row.status, row.unverified) == (real_id, InboxStatus.QUEUED.value, False)
    assert "sealed_auth" not in row.payload  # its claim is checked; nothing sealed is left
    assert queued_messages(redis_client, app) == 1
    assert _provisional("forged") == forged_before + 1

    assert processing.process(real_id) == "done"
    assert effects() == {real_id: 1}
    assert forged_id not in effects()


def test_a_portal_keeps_a_bounded_number_of_small_events(app, client, waiting, redis_client):
    app.config["PROVISIONAL_EVENTS_PER_PORTAL"] = 2
    big = _deliver(client, waiting, FORGED, data={"FIELDS": {"ID": "x" * 20_000}})
    assert big.status_code == 413
    answers = [_deliver(client, waiting, FORGED, data={"FIELDS": {"ID": str(n)}})
               for n in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[2].json["error"] == "provisional_limit"
    assert inbox_count() == 2
