"""Bodies over MAX_BODY_BYTES get 413 and nothing is stored, also when sent chunked.

A chunked body has no Content-Length to refuse up front; served by gunicorn (as in
production), werkzeug's input stream used to stop quietly at the limit, and the event
was stored cut at 262,144 bytes with a 200.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from app.ingress import auth
from tests.ingress.conftest import FORM, b24_body, inbox_count, inbox_rows, make_portal

LIMIT = 256 * 1024


def _chunks(body: bytes, size: int = 16 * 1024) -> Iterator[bytes]:
    """The body as a generator: httpx sends it with Transfer-Encoding: chunked."""
    for start in range(0, len(body), size):
        yield body[start:start + size]


def _post_chunked(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    with httpx.Client(timeout=30) as http:
        response = http.post(url, content=_chunks(body), headers=headers)
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    return response


def _post_pbx_chunked(url: str, body: bytes, key: str) -> httpx.Response:
    return _post_chunked(f"{url}/api/v1/calls/events", body,
                         {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})


def _b24_form(member_id: str, token: str, size: int) -> bytes:
    """A valid event form of exactly ``size`` bytes (padding in its last field); an event the
    app handles, as only those may be this large (INTAKE_UNHANDLED_MAX_BYTES)."""
    head = b24_body(member_id, token, event="ONUSERADD").encode() + b"&data%5BPAD%5D="
    return head + b"x" * (size - len(head))


def _pbx_json(size: int) -> bytes:
    """A valid PBX start event of exactly ``size`` bytes (padding in an extra field)."""
    event = {"call_id": "c-1", "event": "start", "at": "2026-11-22T16:40:00+03:00",
             "direction": "in", "phone": "+74950000000", "extensions": ["101"], "pad": ""}
    head = len(json.dumps(event).encode())
    event["pad"] = "x" * (size - head)
    return json.dumps(event).encode()


@pytest.mark.parametrize("size", [1024 * 1024, LIMIT + 1])
def test_an_oversized_chunked_event_gets_413_and_nothing_is_stored(gunicorn, size):
    portal = make_portal()
    body = _b24_form(portal.member_id, portal.application_token, size)
    assert len(body) == size
    response = _post_chunked(f"{gunicorn.url}/b24/events", body, FORM)
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "too_large"
    assert inbox_count() == 0


@pytest.mark.parametrize("size", [1024 * 1024, LIMIT + 1])
def test_an_oversized_chunked_pbx_body_gets_413_and_nothing_is_stored(gunicorn, size):
    key = auth.issue_api_key(make_portal())
    body = _pbx_json(size)
    assert len(body) == size
    response = _post_pbx_chunked(gunicorn.url, body, key)
    assert response.status_code == 413, response.text
    assert inbox_count() == 0


def test_a_chunked_body_of_exactly_the_limit_is_stored_whole(gunicorn):
    portal = make_portal()
    body = _b24_form(portal.member_id, portal.application_token, LIMIT)
    response = _post_chunked(f"{gunicorn.url}/b24/events", body, FORM)
    assert response.status_code == 200, response.text
    [row] = inbox_rows()
    assert len(row.payload["data"]["PAD"]) == LIMIT - body.index(b"PAD%5D=") - len("PAD%5D=")
    key = auth.issue_api_key(portal)
    response = _post_pbx_chunked(gunicorn.url, _pbx_json(LIMIT), key)
    assert response.status_code == 202, response.text
    assert inbox_count() == 2


def test_an_oversized_body_with_a_length_gets_413_too(gunicorn):
    portal = make_portal()
    body = _b24_form(portal.member_id, portal.application_token, LIMIT + 1)
    response = httpx.post(f"{gunicorn.url}/b24/events", content=body, headers=FORM, timeout=30)
    assert response.status_code == 413
    assert inbox_count() == 0
