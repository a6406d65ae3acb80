"""Copies of a portal's ONAPPUNINSTALL posted ahead cannot swallow Bitrix24's real one.

An employee of a full-form portal holds its application token, and everything else of the
uninstall event is known or guessable (member_id, a small handler id, ``CLEAN``, ``ts`` to
the second). The event has no user tokens to tell copies apart, so without more the real
delivery was answered ``duplicate`` and never processed: the tenant stayed installed and,
with ``CLEAN=1``, its data was kept. Bitrix24 calls the handler URL the app bound, with the
portal's handler key in ``k``, which employees cannot read: the key is part of the event's
identity now.
"""

from __future__ import annotations

from sqlalchemy import func, select

from app.extensions import db
from app.ingress.models import InboxEvent
from app.tenants import handler_key
from tests.ingress.conftest import FORM, b24_body

UNINSTALL = {"event": "ONAPPUNINSTALL", "data": {"CLEAN": "1", "LANGUAGE_ID": "en"},
             "ts": "1765090000", "handler_id": "3"}


def _uninstall_rows() -> int:
    db.session.remove()
    return int(db.session.scalar(select(func.count(InboxEvent.id)).where(
        InboxEvent.event_type == "ONAPPUNINSTALL")) or 0)


def test_forged_copies_do_not_make_the_real_uninstall_a_duplicate(client, portal):
    body = b24_body(portal.member_id, portal.application_token, **UNINSTALL)
    for _ in range(5):  # the employee's copies: the right token, no handler key
        answer = client.post("/b24/events", data=body, headers=FORM)
        assert answer.status_code == 200
    assert _uninstall_rows() == 1, "the copies are one event among themselves"
    key = handler_key.for_member(portal.member_id)
    real = client.post(f"/b24/events?k={key}", data=body, headers=FORM)
    assert real.status_code == 200 and real.json["duplicate"] is False, real.json
    assert _uninstall_rows() == 2
    again = client.post(f"/b24/events?k={key}", data=body, headers=FORM)
    assert again.json["duplicate"] is True, "a repeated real delivery is still stored once"


def test_other_events_keep_their_key_whatever_the_query(client, portal):
    body = b24_body(portal.member_id, portal.application_token)
    first = client.post("/b24/events", data=body, headers=FORM)
    key = handler_key.for_member(portal.member_id)
    second = client.post(f"/b24/events?k={key}", data=body, headers=FORM)
    assert first.json["duplicate"] is False and second.json["duplicate"] is True
