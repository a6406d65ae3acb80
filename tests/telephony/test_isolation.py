"""Tenants cannot reach each other's calls through the PBX API: an employee of one customer
who learns (or guesses) another customer's PBX call ids and posts events for them with his
own portal's API key only ever touches his own portal's calls (the key names the portal)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select

from app.dispatcher import nudge
from app.extensions import db
from app.ingress import auth
from app.telephony.models import Call
from app.tenants.models import Portal, PortalSettings, PortalStatus, utcnow
from tests.conftest import wait_for
from tests.telephony.conftest import map_extensions, pbx
from tests.telephony.test_end_to_end import card_log, cards_left_open, finished, stat
from tests.tenants.conftest import CLIENT_ID, CLIENT_SECRET, oauth_app  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(180)


def _portal(sandbox: Any, users: dict[str, int]) -> tuple[Portal, str]:
    info = sandbox.create_portal(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, users=[
        {"id": user, "name": f"User {user}", "admin": user == min(users.values()),
         "extension": ext} for ext, user in users.items()])
    portal = Portal(member_id=info["member_id"], domain=info["domain"],
                    client_endpoint=info["client_endpoint"],
                    server_endpoint=info["server_endpoint"], access_token=info["access_token"],
                    refresh_token=info["refresh_token"],
                    expires_at=datetime.fromtimestamp(info["expires"], UTC), token_version=1,
                    status=PortalStatus.ACTIVE.value, installed_at=utcnow())
    portal.settings = PortalSettings(crm_create=False)
    db.session.add(portal)
    db.session.commit()
    map_extensions(portal, users)
    return portal, auth.issue_api_key(portal)


def test_the_same_pbx_call_id_on_two_portals_stays_two_calls(
        oauth_app, sandbox, client, start_worker, redis_client):  # noqa: F811 - fixture
    a, key_a = _portal(sandbox, {"101": 1, "102": 2})
    b, key_b = _portal(sandbox, {"101": 7, "102": 8})
    start_worker(threads=4, periodic=True, DISPATCH_SWEEP_INTERVAL="1", DISPATCH_LINGER_MS="0")
    wait_for(lambda: redis_client.pubsub_numsub(nudge.channel(redis_client))[0][1] >= 1,
             timeout=30)

    def post(key: str, *events: dict[str, Any]) -> None:
        for event in events:
            response = client.post("/api/v1/calls/events", json=event,
                                   headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 202, response.get_data(as_text=True)

    post(key_a, pbx("shared-1", "start", 0, direction="in", phone="+4930111222",
                    extensions=["101", "102"]),
         pbx("shared-1", "answer", 4, extension="101"))
    # Portal B's employee replays A's call id: an answer by his 102, an end, then a start.
    post(key_b, pbx("shared-1", "answer", 5, extension="102"),
         pbx("shared-1", "end", 9, status="answered", duration=3),
         pbx("shared-1", "start", 1, direction="in", phone="+4930999000",
             extensions=["102"]))
    post(key_a, pbx("shared-1", "end", 30, status="answered", duration=25))

    call_a = wait_for(lambda: finished(a.id, "shared-1"), timeout=60)
    call_b = wait_for(lambda: finished(b.id, "shared-1"), timeout=60)
    assert (call_a.answerer_user_id, call_a.phone, call_a.finish_outcome) == (1, "+4930111222",
                                                                              "done")
    assert (call_b.answerer_user_id, call_b.phone, call_b.finish_outcome) == (8, "+4930999000",
                                                                              "done")
    log_a = card_log(sandbox, a.member_id, "shared-1")
    assert log_a == [("register", 1), ("show", [1, 2]), ("hide", [2]), ("finish", 1)]
    assert cards_left_open(log_a) == set()
    assert stat(sandbox, a.member_id, "shared-1")["CALL_DURATION"] == "25"
    assert stat(sandbox, b.member_id, "shared-1")["PORTAL_USER_ID"] == "8"
    db.session.expire_all()
    assert db.session.scalars(select(Call.portal_id).where(
        Call.pbx_call_id == "shared-1").order_by(Call.portal_id)).all() == [a.id, b.id]
