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
from app.tenants import handler_key
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


def _deliver(client, portal: Portal, token: str, address: str = "127.0.0.1",
             path: str = "/b24/events", **kw):
    return client.post(path, headers=FORM, environ_base={"REMOTE_ADDR": address},
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


def test_events_with_the_handler_key_have_their_own_ration(app, client, waiting, redis_client):
    """An employee knows member_id and can post from a few addresses; Bitrix24's events come
    through the bindings the app made, their URL carrying the portal's handler key."""
    app.config.update(PROVISIONAL_EVENTS_PER_PORTAL=3, PROVISIONAL_EVENTS_PER_ADDRESS=2,
                      PROVISIONAL_KEYED_EVENTS_PER_PORTAL=4)
    keyed = f"/b24/events?k={handler_key.for_member(waiting.member_id)}"
    ids = iter(range(1000))

    def send(address: str = "203.0.113.5", path: str = "/b24/events") -> int:
        data = {"FIELDS": {"ID": str(next(ids))}}
        return _deliver(client, waiting, FORGED, address, path, data=data).status_code

    # One address takes its share; a second one in the same IPv6 /64 is the same sender.
    assert [send("2001:db8:1:2::a"), send("2001:db8:1:2::b"), send("2001:db8:1:2::c")] == [
        200, 200, 429]
    # The rest of the unkeyed ration, then nothing more without the key, wherever from;
    # a made-up key counts as none.
    assert [send("203.0.113.5"), send("203.0.113.6"), send("198.51.100.1"),
            send(path=f"/b24/events?k={'A' * 22}")] == [200, 429, 429, 429]
    # Bitrix24's deliveries (same address as the forger's, even) still get in, up to theirs.
    answers = [_deliver(client, waiting, REAL, "203.0.113.5", keyed,
                        data={"FIELDS": {"ID": str(n)}}) for n in range(5)]
    assert [a.status_code for a in answers] == [200, 200, 200, 200, 429]
    assert answers[4].json["error"] == "provisional_limit"
    assert inbox_count() == 3 + 4  # bounded: both rations, nothing more
    assert {r.status for r in inbox_rows()} == {InboxStatus.PROVISIONAL.value}


def test_the_handler_key_does_not_verify_an_event(app, client, waiting, redis_client, effects):
    """The key only picks the ration: an event carrying it is kept like any other, and
    dropped as forged if its application_token is not the one ONAPPINSTALL brings."""
    keyed = f"/b24/events?k={handler_key.for_member(waiting.member_id)}"
    assert _deliver(client, waiting, FORGED, path=keyed).status_code == 200
    [row] = inbox_rows()
    assert (row.status, row.unverified) == (InboxStatus.PROVISIONAL.value, True)
    _token_arrives(waiting, REAL)
    processing.sweep()
    assert inbox_rows() == [] and effects() == {}
    # Once the token is known the key changes nothing: a wrong token is refused.
    assert _deliver(client, waiting, FORGED, path=keyed).status_code == 401
    assert _deliver(client, waiting, REAL, path=keyed).status_code == 200
