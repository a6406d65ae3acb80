"""POST /api/v1/calls/events: the PBX's call events, per-portal API key, 202 with ids."""

from __future__ import annotations

import copy
import json
import time

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import delete, select

from app.extensions import db
from app.ingress import auth, pbx
from app.ingress.models import PortalApiKey
from tests.ingress.conftest import inbox_count, inbox_rows, queued_messages

AT = "2026-11-22T16:40:00+03:00"
START = {"call_id": "pbx-1", "event": "start", "at": AT, "direction": "in",
         "phone": "+74951234567", "extensions": ["101", "102"], "line": "+74950000000"}
CALL = [
    START,
    {"call_id": "pbx-1", "event": "answer", "at": AT, "extension": "101"},
    {"call_id": "pbx-1", "event": "transfer", "at": AT, "from_extension": "101",
     "to_extension": "105"},
    {"call_id": "pbx-1", "event": "end", "at": AT, "status": "answered", "duration": 42},
    {"call_id": "pbx-1", "event": "record", "at": AT, "url": "https://pbx.example/r/1.mp3"},
]


def test_a_whole_call_is_stored_in_order_and_answered_202(app, api_key, deliver, redis_client):
    response = deliver.pbx(api_key, {"events": CALL})
    assert response.status_code == 202
    rows = inbox_rows()
    assert response.json == {"ids": [r.id for r in rows], "duplicates": 0}
    assert [r.event_type for r in rows] == ["start", "answer", "transfer", "end", "record"]
    assert {r.source for r in rows} == {"pbx"}
    assert rows[0].payload["extensions"] == ["101", "102"]
    assert queued_messages(redis_client, app) == 5


def test_a_single_event_object_is_accepted(api_key, deliver):
    response = deliver.pbx(api_key, {**START, "extensions": "101"})
    assert response.status_code == 202 and len(response.json["ids"]) == 1
    assert inbox_rows()[0].payload["extensions"] == ["101"]


def test_a_retried_request_is_stored_once(app, api_key, deliver, redis_client):
    first = deliver.pbx(api_key, {"events": CALL[:2]})
    again = deliver.pbx(api_key, {"events": CALL[:2]})
    assert again.status_code == 202
    assert again.json == {"ids": first.json["ids"], "duplicates": 2}
    assert inbox_count() == 2 and queued_messages(redis_client, app) == 2


@pytest.mark.parametrize("key", [None, "b24r_not-a-key", ""])
def test_a_missing_or_wrong_key_gets_401_and_leaves_no_trace(app, api_key, deliver, redis_client,
                                                             key):
    response = deliver.pbx(key, START)
    assert response.status_code == 401
    assert inbox_count() == 0 and queued_messages(redis_client, app) == 0


def test_rotating_the_key_revokes_the_old_one(portal, api_key, deliver):
    new_key = auth.issue_api_key(portal)
    assert deliver.pbx(api_key, START).status_code == 401
    assert deliver.pbx(new_key, START).status_code == 202


def _broken(index: int, **changes):
    events = copy.deepcopy(CALL)
    for name, value in changes.items():
        if value is ...:
            events[index].pop(name)
        else:
            events[index][name] = value
    return {"events": events}


def test_a_key_is_checked_in_the_database_at_most_once_per_cache_window(
        app, portal, api_key, deliver, monkeypatch):
    monkeypatch.setattr(auth, "CACHE_SECONDS", 0.5)
    header = f"Bearer {api_key}"
    assert auth.verify_api_key(header).id == portal.id
    # Another process rotates the key: this one accepts the old key only within the window.
    db.session.execute(delete(PortalApiKey))
    db.session.commit()
    assert auth.verify_api_key(header).id == portal.id, "served from the cache"
    time.sleep(0.6)
    with pytest.raises(auth.Rejected):
        auth.verify_api_key(header)
    assert deliver.pbx(api_key, START).status_code == 401


def test_a_rotation_in_this_process_drops_the_cached_key_at_once(portal, api_key, deliver):
    assert deliver.pbx(api_key, START).status_code == 202  # now cached
    auth.issue_api_key(portal)
    assert deliver.pbx(api_key, START).status_code == 401


@pytest.mark.parametrize("body, field", [
    (_broken(0, call_id=...), "events[0].call_id"),
    (_broken(0, call_id=""), "events[0].call_id"),
    (_broken(1, event="hangup"), "events[1].event"),
    (_broken(2, at="2026-11-22T16:40:00"), "events[2].at"),       # no offset
    (_broken(2, at="yesterday"), "events[2].at"),
    (_broken(0, direction="sideways"), "events[0].direction"),
    (_broken(0, phone=...), "events[0].phone"),
    (_broken(0, extensions=[]), "events[0].extensions"),
    (_broken(0, extensions=["101", ""]), "events[0].extensions[1]"),
    (_broken(1, extension=None), "events[1].extension"),
    (_broken(2, to_extension=...), "events[2].to_extension"),
    (_broken(3, status="hung"), "events[3].status"),
    (_broken(3, duration=-1), "events[3].duration"),
    (_broken(3, duration="42"), "events[3].duration"),
    (_broken(3, sip_code="4" * 17), "events[3].sip_code"),
    (_broken(3, sip_code={"code": 486}), "events[3].sip_code"),
    (_broken(4, url="ftp://pbx.example/r/1.mp3"), "events[4].url"),
    (_broken(4, url="https://[::1/r/1.mp3"), "events[4].url"),  # urlsplit raises on it
    (_broken(4, url="https://pbx.example:rec/r/1.mp3"), "events[4].url"),
    (_broken(4, url="https://:8080/r/1.mp3"), "events[4].url"),  # no host
    ({"events": []}, "events"),
    ({"events": [START, "start"]}, "events[1]"),
    ({"call_id": "x", "event": "answer", "at": AT}, "extension"),
    ([START], "body"),
])
def test_a_wrong_schema_gets_422_naming_the_field(app, api_key, deliver, redis_client, body,
                                                  field):
    response = deliver.pbx(api_key, body)
    assert response.status_code == 422, response.json
    assert response.json["error"] == "invalid_event"
    assert response.json["field"] == field
    assert response.json["message"]
    assert inbox_count() == 0 and queued_messages(redis_client, app) == 0


_END = json.dumps({"events": CALL[:3] + [{**CALL[3], "duration": 0}]})
_LONG_NAME = "n" * 1000


@pytest.mark.parametrize("body, field", [
    (_END.replace('"duration": 0', '"duration": NaN'), "events[3].duration"),
    (_END.replace('"duration": 0', '"duration": Infinity'), "events[3].duration"),
    (_END.replace('"duration": 0', '"duration": -Infinity'), "events[3].duration"),
    (_END.replace('"duration": 0', '"duration": 1e999'), "events[3].duration"),  # inf as a float
    (json.dumps(START)[:-1] + ', "extra": {"a": [1, 2.5, NaN]}}', "extra.a[2]"),
    (json.dumps(START)[:-1] + f', "{_LONG_NAME}": NaN}}', "n" * 40 + "..."),
    ("NaN", "body"),
], ids=["NaN", "Infinity", "-Infinity", "1e999", "nested extra", "long name", "bare"])
def test_a_number_that_is_not_finite_gets_422_naming_the_field(app, client, api_key, redis_client,
                                                               body, field):
    response = client.post("/api/v1/calls/events", data=body,
                           headers={"Authorization": f"Bearer {api_key}",
                                    "Content-Type": "application/json"})
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.json["error"] == "invalid_event" and response.json["field"] == field
    assert inbox_count() == 0 and queued_messages(redis_client, app) == 0


def test_finite_floats_are_still_accepted(client, api_key):
    body = _END.replace('"duration": 0', '"duration": 42.7')
    response = client.post("/api/v1/calls/events", data=body,
                           headers={"Authorization": f"Bearer {api_key}",
                                    "Content-Type": "application/json"})
    assert response.status_code == 202
    # kept whole: telephony rounds a call's 42.7 s up to 43 (a truncated 42 could not be)
    assert inbox_rows()[3].payload["duration"] == 42.7


def _nested(levels: int) -> str:
    """``START`` with an extra field, the whole body nested ``levels`` containers deep."""
    return json.dumps(START)[:-1] + ', "extra": ' + "[" * (levels - 1) + "]" * (levels - 1) + "}"


@pytest.mark.parametrize("body", [
    "call_id=1",
    "[" * 100_000 + "]" * 100_000,  # under the size limit, past Python's recursion limit
    _nested(pbx.MAX_DEPTH + 1),
], ids=["form", "nesting bomb", "one level too deep"])
def test_a_body_that_is_not_json_or_nests_too_deep_gets_400(app, client, api_key, redis_client,
                                                            body):
    response = client.post("/api/v1/calls/events", data=body,
                           headers={"Authorization": f"Bearer {api_key}",
                                    "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json["error"] == "malformed"
    assert inbox_count() == 0 and queued_messages(redis_client, app) == 0


@pytest.mark.parametrize("event", [
    {**START, "phone": "+7495\x001234567"},
    {**START, "note": "a\x00b"},
    {**START, "x\x00": "1"},
], ids=["in a field", "in an extra field", "in a name"])
def test_a_nul_character_gets_400_not_an_outage(app, api_key, deliver, redis_client, event):
    before = REGISTRY.get_sample_value("b24relay_events_rejected_total",
                                       {"source": "pbx", "reason": "db_unavailable"}) or 0.0
    response = deliver.pbx(api_key, event)
    assert response.status_code == 400 and response.json["error"] == "malformed"
    assert inbox_count() == 0 and queued_messages(redis_client, app) == 0
    assert (REGISTRY.get_sample_value("b24relay_events_rejected_total",
                                      {"source": "pbx", "reason": "db_unavailable"})
            or 0.0) == before
    assert deliver.pbx(api_key, {**START, "note": "a\\u0000b"}).status_code == 202  # text


def test_extra_fields_may_nest_up_to_the_limit(client, api_key):
    response = client.post("/api/v1/calls/events", data=_nested(pbx.MAX_DEPTH),
                           headers={"Authorization": f"Bearer {api_key}",
                                    "Content-Type": "application/json"})
    assert response.status_code == 202 and inbox_count() == 1


def test_a_body_over_the_limit_gets_413(app, api_key, deliver):
    app.config["MAX_CONTENT_LENGTH"] = 1024
    response = deliver.pbx(api_key, {"events": [START] * 20})
    assert response.status_code == 413 and inbox_count() == 0


def test_the_cli_prints_a_working_key_once_and_stores_only_its_hash(app, portal, deliver):
    result = app.test_cli_runner().invoke(args=["portals", "api-key", portal.member_id])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    stored = db.session.scalars(
        select(PortalApiKey).where(PortalApiKey.portal_id == portal.id)).one()
    assert stored.key_hash == auth.hash_api_key(key) and key not in stored.key_hash
    assert deliver.pbx(key, START).status_code == 202


def test_the_cli_refuses_an_unknown_portal(app):
    result = app.test_cli_runner().invoke(args=["portals", "api-key", "nope"])
    assert result.exit_code != 0 and "no portal" in result.output
