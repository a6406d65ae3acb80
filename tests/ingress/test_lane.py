"""The intake lane: a new event whose token matches is stored and answered before Flask
routes it; every other request reaches the view whole and gets the view's answer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from flask import request, request_started
from prometheus_client import REGISTRY

from app.ingress.models import InboxStatus
from tests.ingress.conftest import (
    FORM,
    b24_body,
    inbox_count,
    inbox_rows,
    make_portal,
    queued_rows,
)


@pytest.fixture
def flask_requests(app: Any) -> Iterator[list[str]]:
    """The paths of the requests Flask itself dispatched during the test."""
    seen: list[str] = []

    def record(sender: Any, **_: Any) -> None:
        seen.append(request.path)

    request_started.connect(record, app)
    yield seen
    request_started.disconnect(record, app)


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_new_verified_event_is_stored_queued_and_answered_without_flask(
        app, portal, deliver, redis_client, flask_requests):
    response = deliver.b24(portal, data={"FIELDS": {"ID": "41"}})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    [row] = inbox_rows()
    assert response.json == {"id": row.id, "duplicate": False}
    assert (row.portal_id, row.status, row.unverified) == \
        (portal.id, InboxStatus.QUEUED.value, False)
    assert "application_token" not in row.payload["auth"]  # stripped as on the view's path
    assert queued_rows(redis_client, app) == [row.id]
    assert flask_requests == []


def test_a_duplicate_goes_on_to_the_view_and_is_answered_as_one(
        app, portal, deliver, redis_client, flask_requests):
    first = deliver.b24(portal)
    second = deliver.b24(portal)
    assert second.status_code == 200
    assert second.json == {"id": first.json["id"], "duplicate": True}
    assert second.headers["Content-Type"] == first.headers["Content-Type"]
    assert inbox_count() == 1
    assert queued_rows(redis_client, app) == [first.json["id"]]
    assert flask_requests == ["/b24/events"]  # the duplicate only


@pytest.mark.parametrize("case, status", [
    ("another portal's token", 401),
    ("no token", 401),
    ("not a form", 400),
    ("body shorter than its Content-Length", 400),
    ("over the size limit", 413),
])
def test_what_the_lane_does_not_store_gets_the_views_refusal_and_nothing_is_kept(
        app, portal, client, redis_client, flask_requests, case, status):
    other = make_portal()
    body = b24_body(portal.member_id, portal.application_token, ts=str(time.time_ns()))
    headers, environ = dict(FORM), {}
    if case == "another portal's token":
        body = b24_body(portal.member_id, other.application_token)
    elif case == "no token":
        body = b24_body(portal.member_id, None)
    elif case == "not a form":
        headers = {"Content-Type": "application/json"}
    elif case == "body shorter than its Content-Length":
        environ = {"CONTENT_LENGTH": str(len(body) + 10)}
    else:
        body += "&pad=" + "x" * app.config["MAX_CONTENT_LENGTH"]
    received = _sample("b24relay_events_received_total", {"source": "b24"})
    response = client.post("/b24/events", data=body, headers=headers, environ_overrides=environ)
    assert response.status_code == status, response.json
    assert inbox_count() == 0
    assert queued_rows(redis_client, app) == []
    assert flask_requests == ["/b24/events"]
    assert _sample("b24relay_events_received_total", {"source": "b24"}) == received + 1


def test_each_request_is_counted_once_whichever_path_answers_it(app, portal, deliver):
    def counts() -> tuple[float, float]:
        return (_sample("b24relay_events_received_total", {"source": "b24"}),
                _sample("b24relay_event_ack_seconds_count", {"source": "b24"}))

    before = counts()
    assert deliver.b24(portal).status_code == 200  # the lane
    assert deliver.b24(portal).status_code == 200  # a duplicate: the view
    assert deliver.b24(portal, token="forged").status_code == 401  # the view
    after = counts()
    assert (after[0] - before[0], after[1] - before[1]) == (3, 3)


def test_other_endpoints_and_methods_are_flasks(app, client, flask_requests):
    assert client.get("/b24/events").status_code == 405
    assert client.get("/healthz").status_code == 200
    assert flask_requests == ["/b24/events", "/healthz"]


def test_a_chunked_body_through_gunicorn_is_stored_by_the_view(app, gunicorn):
    """No Content-Length: the lane leaves it to the view, which stores it all the same."""
    portal = make_portal()
    body = b24_body(portal.member_id, portal.application_token).encode()

    def chunks() -> Iterator[bytes]:
        yield body[:100]
        yield body[100:]

    chunked = httpx.post(f"{gunicorn.url}/b24/events", content=chunks(), headers=FORM,
                         timeout=10)
    plain = httpx.post(f"{gunicorn.url}/b24/events", headers=FORM, timeout=10,
                       content=b24_body(portal.member_id, portal.application_token, ts="2"))
    assert (chunked.status_code, plain.status_code) == (200, 200)
    assert chunked.json()["duplicate"] is False and plain.json()["duplicate"] is False
    assert chunked.headers["content-type"] == plain.headers["content-type"]
    assert sorted(r.id for r in inbox_rows()) == sorted([chunked.json()["id"],
                                                          plain.json()["id"]])
