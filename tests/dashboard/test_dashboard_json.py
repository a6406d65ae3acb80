"""The dashboard's JSON after a real dispatcher run against the sandbox portal, and who may
read it: only a valid page session, and only its own portal's."""

from __future__ import annotations

import time

from itsdangerous import URLSafeTimedSerializer
from itsdangerous.timed import TimestampSigner

from app.dispatcher import submit
from app.extensions import db
from placements import page_session
from tests.dashboard.conftest import session_for
from tests.dispatcher.conftest import call_commands, settled

URL = "/placements/app/dashboard.json"


def _get(client, token):
    return client.get(URL, headers={page_session.HEADER: token} if token is not None else {})


def _run(portal, sandbox, info, start_engine, calls=10):
    sandbox.set_latency(info["member_id"], 300)
    sandbox.set_fault(info["member_id"], "query_limit", count=1)
    start_engine(DISPATCH_LINGER_MS=0)
    ids = [i for call in range(calls) for i in call_commands(portal, call)]
    dead = submit(portal.id, "crm.nothing.here", {"ID": 1})
    db.session.commit()
    rows = settled(portal.id, len(ids) + 1, timeout=60)
    return ids, dead, rows


def test_the_dashboard_shows_a_real_dispatcher_run(make_portal, sandbox, start_engine, client):
    portal, info = make_portal()
    ids, dead, rows = _run(portal, sandbox, info, start_engine)
    assert {r.id: r.status for r in rows}[dead] == "dead"

    answer = _get(client, session_for(portal))
    assert answer.status_code == 200
    data = answer.get_json()
    assert len(data["series"]) == 24 * 60
    busy = [m for m in data["series"] if m["batches"]]
    assert busy, "the run's minutes are in the series"
    assert sum(m["done"] for m in data["series"]) == len(ids)
    assert sum(m["dead"] for m in data["series"]) == 1
    assert sum(m["rate_limited"] for m in data["series"]) == 1  # the one 503
    assert sum(m["sent"] for m in data["series"]) >= len(ids) + 1
    slowest = max(m["max"] for m in busy)
    assert 0.3 <= slowest < 30  # the sandbox took 300 ms a request
    assert all(m["p50"] <= m["p95"] <= m["max"] for m in busy)
    assert data["outbox"] == {"queued": 0, "inflight": 0, "dead": 1}
    assert data["batches_in_flight"] == 0
    assert data["inbox"] == {"waiting": 0, "parked": 0, "dead": 0}
    methods = {m["method"]: m for m in data["operating"]}
    register = methods["telephony.externalcall.register"]
    assert register["budget"] == 480.0 and 0 < register["seconds"] < 480
    assert data["token"]["expires_in"] > 0 and data["portal"]["status"] == "active"
    error = data["errors"][0]
    assert error["kind"] == "command" and error["what"] == "crm.nothing.here"
    assert "does not know this method" in error["words"]
    assert "ERROR_METHOD_NOT_FOUND" in error["detail"]
    assert data["calls"]["total"] == 0 and data["calls"]["routing"]["asked"] == 0


def test_a_session_reads_its_own_portal_only(make_portal, sandbox, start_engine, client):
    busy, info = make_portal()
    quiet, _ = make_portal()
    _run(busy, sandbox, info, start_engine, calls=2)
    mine = _get(client, session_for(quiet)).get_json()
    assert mine["portal"]["id"] == quiet.id
    assert not any(m["sent"] for m in mine["series"])
    assert mine["outbox"]["dead"] == 0 and mine["errors"] == [] and mine["operating"] == []
    theirs = _get(client, session_for(busy)).get_json()
    assert theirs["portal"]["id"] == busy.id and theirs["errors"]
    # Nothing in the request can name another portal: a query parameter is ignored.
    again = client.get(f"{URL}?portal_id={busy.id}&p={busy.id}",
                       headers={page_session.HEADER: session_for(quiet)}).get_json()
    assert again["portal"]["id"] == quiet.id and again["errors"] == []


def _expired(portal) -> str:
    class Past(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - page_session.TTL_SECONDS - 60

    from flask import current_app
    old = URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt=page_session.SALT,
                                 signer=Past)
    return old.dumps({"p": portal.id, "m": portal.member_id, "u": 1, "a": True, "l": "en",
                      "t": int(time.time())})


def test_missing_forged_or_expired_sessions_get_401(make_portal, client, app):
    portal, _ = make_portal()
    good = session_for(portal)
    assert _get(client, good).status_code == 200
    forged = URLSafeTimedSerializer("not-our-secret", salt=page_session.SALT).dumps(
        {"p": portal.id, "m": portal.member_id, "u": 1, "a": True, "l": "en"})
    for token in (None, "", forged, good[:-3] + "abc", _expired(portal)):
        answer = _get(client, token)
        assert answer.status_code == 401, token
        assert "series" not in answer.get_json()
    page = client.get("/placements/app/dashboard")
    assert page.status_code == 401


def test_the_page_renders_in_russian_with_its_charts(make_portal, client):
    portal, _ = make_portal()
    page = client.get(f"/placements/app/dashboard?s={session_for(portal, lang='ru')}")
    assert page.status_code == 200
    body = page.get_data(as_text=True)
    assert 'id="chart-round-trip"' in body and "uPlot.iife.min.js" in body
    assert "Очереди" in body
    assert page.headers["Content-Security-Policy"] == f"frame-ancestors {portal.origin}"


def test_a_hostile_error_text_is_never_markup_in_the_page(make_portal, sandbox, start_engine,
                                                           client):
    portal, _ = make_portal()
    start_engine(DISPATCH_LINGER_MS=0)
    evil = 'crm.</script><img src=x onerror="alert(1)">'
    submit(portal.id, evil, {})
    db.session.commit()
    assert settled(portal.id, 1, timeout=60)[0].status == "dead"
    data = _get(client, session_for(portal)).get_json()
    assert data["errors"][0]["what"] == evil  # the JSON carries the text as it is ...
    body = client.get(f"/placements/app/dashboard?s={session_for(portal)}").get_data(
        as_text=True)
    assert "<img src=x" not in body and "</script><img" not in body  # ... the page never
    assert "\\u003cimg src=x" in body  # embedded as JSON, escaped for the script element
