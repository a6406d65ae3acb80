"""Today's calls on the dashboard, from PBX events handled by a real worker (the inbox
handlers, the dispatcher's engine) against the sandbox portal; the routing hit rate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.ingress import auth
from app.telephony import routing
from tests.conftest import wait_for
from tests.dashboard.conftest import session_for
from tests.telephony.conftest import dispatching_worker, employees, poster, sandbox_line
from tests.telephony.test_end_to_end import finished

pytestmark = pytest.mark.timeout(180)
USERS = {"101": 1, "102": 2}


def _event(call_id: str, kind: str, seconds_ago: float, **fields: Any) -> dict[str, Any]:
    at = datetime.now(UTC) - timedelta(seconds=seconds_ago)
    return {"call_id": call_id, "event": kind, "at": at.isoformat(timespec="seconds"), **fields}


def _json(client, portal) -> dict[str, Any]:
    answer = client.get("/placements/app/dashboard.json",
                        headers={"X-B24relay-Session": session_for(portal)})
    assert answer.status_code == 200
    return answer.get_json()


def test_calls_today_card_latency_incomplete_and_routing(oauth_app, sandbox, client,
                                                          start_worker, redis_client):
    portal, info = sandbox_line(sandbox, employees(USERS), USERS)
    post = poster(client, auth.issue_api_key(portal))
    dispatching_worker(start_worker, redis_client)
    post(_event("today-1", "start", 30, direction="in", phone="+49 30 1234567",
                extensions=["101", "102"], line="+4930555"),
         _event("today-1", "answer", 20, extension="101"),
         _event("today-1", "end", 5, status="answered", duration=15))
    post(_event("lost-1", "answer", 10, extension="102"))  # its start never comes
    wait_for(lambda: finished(portal.id, "today-1"), timeout=90)

    # Routing: one number cached with a manager, one cached as "nobody".
    routing.store(portal.id, "+493011111111", routing.Match(entity_type="CONTACT", entity_id=5,
                                                            responsible=1, user_id=1,
                                                            extension="101"))
    routing.store(portal.id, "+493022222222", routing.Match())
    assert routing.route(portal.id, "+49 30 11111111").routable
    assert not routing.route(portal.id, "+49 30 22222222").routable

    calls = _json(client, portal)["calls"]
    assert calls["total"] == 1
    assert calls["states"] == {"ended": 1}
    assert calls["end_status"] == {"answered": 1}
    assert calls["incomplete"] == 1 and calls["collisions"] == 0
    latency = calls["card_latency"]
    assert latency["calls"] == 1 and 0 <= latency["p50"] <= latency["p99"] < 60
    assert calls["routing"] == {"asked": 2, "routed": 1, "rate": 0.5}
    assert calls["click_to_call"] == {}
    assert info["member_id"]
