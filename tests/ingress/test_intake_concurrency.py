"""Intake under concurrency: each event checked in the statement that stores it, queued
off the request path, several rows to a message.

What a sender must see: a 200 only for an event committed in the inbox, each event stored
and queued once however often and however concurrently it is delivered, a forged token
refused with nothing stored, a database that is down answered 503 by every request; and
a worker processes each row of a many-row message once.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from sqlalchemy import select

from app.extensions import db
from app.ingress import inbox
from app.ingress.models import InboxEvent
from tests.conftest import wait_for
from tests.ingress.conftest import (
    FORM,
    Gunicorn,
    add_inbox_row,
    b24_body,
    inbox_count,
    make_portal,
    queued_messages,
    queued_rows,
    statuses,
)

SENDERS, EVENTS = 12, 20


def _burst(url: str, bodies: list[str]) -> list[httpx.Response]:
    """Post every body at once from SENDERS connections; the answers in body order."""
    local, opened = threading.local(), []

    def post(body: str) -> httpx.Response:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=20)
            opened.append(local.client)
        return local.client.post("/b24/events", content=body, headers=FORM)

    try:
        with ThreadPoolExecutor(SENDERS) as pool:
            return list(pool.map(post, bodies))
    finally:
        for client in opened:
            client.close()


def test_a_concurrent_burst_is_stored_and_queued_once_each_duplicates_and_forgeries_too(
        app, redis_client):
    portals = [make_portal() for _ in range(3)]
    events = [(portals[i % 3], str(i)) for i in range(SENDERS * EVENTS // 2)]
    bodies = [b24_body(p.member_id, p.application_token, data={"FIELDS": {"ID": deal}})
              for p, deal in events] * 2  # each event delivered twice, concurrently
    forged = [b24_body(p.member_id, secrets.token_hex(16), data={"FIELDS": {"ID": "f"}})
              for p in portals]
    server = Gunicorn(app.config, WEB_THREADS="8")
    try:
        answers = _burst(server.url, bodies + forged)
    finally:
        server.stop()

    assert [a.status_code for a in answers[len(bodies):]] == [401] * len(forged)
    accepted = answers[:len(bodies)]
    assert all(a.status_code == 200 for a in accepted), {a.status_code for a in accepted}
    first, second = accepted[:len(events)], accepted[len(events):]
    for one, other in zip(first, second, strict=True):  # both deliveries name the same row
        assert one.json()["id"] == other.json()["id"]
        assert sorted([one.json()["duplicate"], other.json()["duplicate"]]) == [False, True]
    stored = {row.id: (row.member_id, row.payload["data"]["FIELDS"]["ID"])
              for row in db.session.execute(select(InboxEvent.id, InboxEvent.member_id,
                                                   InboxEvent.payload))}
    assert {one.json()["id"]: (p.member_id, deal)
            for one, (p, deal) in zip(first, events, strict=True)} == stored
    assert queued_rows(redis_client, app) == sorted(stored)  # each row queued once


def test_every_concurrent_request_gets_503_when_the_database_is_down(make_app, redis_client):
    down = make_app(SQLALCHEMY_DATABASE_URI="postgresql+psycopg://nobody@127.0.0.1:9/none")
    client_for: Callable[[], Any] = down.test_client
    body = b24_body("d" * 32, "tok")

    def post(i: int) -> int:
        return client_for().post("/b24/events", data=body.replace("759", str(i)),
                                 headers=FORM).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(post, range(32)))
    assert codes == [503] * 32
    assert queued_messages(redis_client, down) == 0


def test_events_of_several_portals_keep_their_own_portal_and_content(app, client):
    portals = [make_portal() for _ in range(4)]
    for i, portal in enumerate(portals):
        body = b24_body(portal.member_id, portal.application_token,
                        data={"FIELDS": {"ID": f"deal-{i}"}})
        assert client.post("/b24/events", data=body, headers=FORM).status_code == 200
    rows = db.session.execute(select(InboxEvent.portal_id, InboxEvent.payload)
                              .order_by(InboxEvent.id)).all()
    assert [(r.portal_id, r.payload["data"]["FIELDS"]["ID"]) for r in rows] == \
        [(p.id, f"deal-{i}") for i, p in enumerate(portals)]
    assert all("application_token" not in r.payload["auth"] for r in rows)
    assert inbox_count() == len(portals)


def test_rows_queued_several_to_a_message_are_each_processed_once(
        app, effects, start_handler_worker):
    portal = make_portal()
    bodies = [b24_body(portal.member_id, portal.application_token, event="TESTEFFECT",
                       data={"FIELDS": {"ID": str(i)}}) for i in range(SENDERS * 4)]
    server = Gunicorn(app.config, WEB_THREADS="8")
    try:
        answers = _burst(server.url, bodies)
    finally:
        server.stop()
    acked = sorted(a.json()["id"] for a in answers if a.status_code == 200)
    assert len(acked) == len(bodies)
    start_handler_worker(threads=4)
    wait_for(lambda: statuses() == {"done": len(bodies)}, timeout=60)
    assert effects() == dict.fromkeys(acked, 1)


def test_a_message_naming_several_rows_gets_each_processed_once(app, effects,
                                                                 start_handler_worker):
    portal = make_portal()
    rows = [add_inbox_row("queued", portal) for _ in range(5)]
    assert inbox.enqueue(rows, "b24", together=True) == rows
    start_handler_worker(threads=2)
    wait_for(lambda: statuses() == {"done": len(rows)}, timeout=60)
    assert effects() == dict.fromkeys(rows, 1)
