"""Tenants cannot reach each other's calls through the PBX API: an employee of one customer
who learns (or guesses) another customer's PBX call ids and posts events for them with his
own portal's API key only ever touches his own portal's calls (the key names the portal)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from app.extensions import db
from app.ingress import auth
from app.telephony.models import Call
from app.tenants.models import Portal
from tests.conftest import wait_for
from tests.telephony.conftest import (
    dispatching_worker,
    employees,
    pbx,
    poster,
    sandbox_line,
)
from tests.telephony.test_end_to_end import card_log, cards_left_open, finished, stat
from tests.tenants.conftest import CLIENT_ID, CLIENT_SECRET, oauth_app  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(180)


def _portal(sandbox: Any, users: dict[str, int]) -> tuple[Portal, str]:
    portal, _ = sandbox_line(sandbox, employees(users), users)
    return portal, auth.issue_api_key(portal)


def test_the_same_pbx_call_id_on_two_portals_stays_two_calls(
        oauth_app, sandbox, client, start_worker, redis_client):  # noqa: F811 - fixture
    a, key_a = _portal(sandbox, {"101": 1, "102": 2})
    b, key_b = _portal(sandbox, {"101": 7, "102": 8})
    dispatching_worker(start_worker, redis_client)

    def post(key: str, *events: dict[str, Any]) -> None:
        poster(client, key)(*events)

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
