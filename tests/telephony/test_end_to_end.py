"""Calls end to end: PBX events posted to intake, a real worker (inbox handlers, the
dispatcher's engine, the settle actor) and a sandbox portal. Checked from the portal's
command log by EXTERNAL_CALL_ID, as issue 22's acceptance says."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from app.dispatcher import nudge
from app.extensions import db
from app.ingress import auth
from app.telephony.models import Call
from tests.conftest import wait_for
from tests.telephony.conftest import (
    employees,
    pbx,
    sandbox_line,
)
from tests.tenants.conftest import CLIENT_ID, CLIENT_SECRET, oauth_app  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(180)

USERS = {"101": 1, "102": 2, "103": 3, "104": 4}
TELEPHONY = ("telephony.externalcall.register", "telephony.externalcall.show",
             "telephony.externalcall.hide", "telephony.externalcall.finish")


@pytest.fixture
def line(oauth_app: Any, sandbox: Any, client: Any,  # noqa: F811 - the imported fixture
         start_worker: Any, redis_client: Any) -> dict[str, Any]:
    """A sandbox portal with four employees on extensions 101-104, its Portal row and
    extension map, a PBX API key, and a worker listening for the dispatcher's nudges."""
    portal, info = sandbox_line(sandbox, employees(USERS), USERS)
    key = auth.issue_api_key(portal)
    start_worker(threads=4, periodic=True, DISPATCH_SWEEP_INTERVAL="1", DISPATCH_LINGER_MS="0")
    wait_for(lambda: redis_client.pubsub_numsub(nudge.channel(redis_client))[0][1] >= 1,
             timeout=30)

    def post(*events: dict[str, Any]) -> None:
        for event in events:  # one request each, each after the previous one's 202
            response = client.post("/api/v1/calls/events", json=event,
                                   headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 202, response.get_data(as_text=True)

    return {"member_id": info["member_id"], "portal_id": portal.id, "post": post}


def finished(portal_id: int, pbx_call_id: str) -> Call | None:
    """The call once its finish's outcome is in."""
    db.session.expire_all()
    call = db.session.scalars(select(Call).where(Call.portal_id == portal_id,
                                                 Call.pbx_call_id == pbx_call_id)).first()
    return call if call is not None and call.finish_outcome else None


def _users(value: Any) -> set[int]:
    return {int(v) for v in (value if isinstance(value, list) else [value])}


def card_log(sandbox: Any, member_id: str, external: str) -> list[tuple[str, Any]]:
    """The call's telephony commands the portal ran, in order: (method, users), with the
    cards left open replayed per protocol §8.4 (finish hides for its own user only)."""
    entries = [e for e in sandbox.log(member_id) if e["method"] in TELEPHONY]
    reg = [e for e in entries if e["method"] == TELEPHONY[0]
           and e["params"].get("EXTERNAL_CALL_ID") == external]
    assert len(reg) == 1, f"registered {len(reg)} times"
    call_id = reg[0]["call_id"]
    mine = [e for e in entries if e is reg[0] or e["params"].get("CALL_ID") == call_id]
    assert all(e["status"] == 200 for e in mine), mine
    out: list[tuple[str, Any]] = []
    for e in mine:
        users = _users(e["params"].get("USER_ID"))
        out.append((e["method"].rsplit(".", 1)[1],
                    sorted(users) if e["method"] in TELEPHONY[1:3] else min(users)))
    return out


def cards_left_open(log: list[tuple[str, Any]]) -> set[int]:
    """Who still sees the card after these commands (§8.4: finish hides for its user)."""
    cards: set[int] = set()
    for method, users in log:
        if method == "show":
            cards |= set(users)
        elif method in ("hide", "finish"):
            cards -= set(users) if isinstance(users, list) else {users}
    return cards


def stat(sandbox: Any, member_id: str, external: str) -> dict[str, Any]:
    [found] = [s for s in sandbox.calls(member_id)["finished"]
               if s["EXTERNAL_CALL_ID"] == external]
    return found


def test_a_ring_group_call_answered_transferred_and_ended(line, sandbox):
    line["post"](
        pbx("grp-1", "start", 0, direction="in", phone="+49 30 1234567",
            extensions=["101", "102", "103"], line="+4930555"),
        pbx("grp-1", "answer", 6, extension="102"),
        pbx("grp-1", "transfer", 40, from_extension="102", to_extension="104"),
        pbx("grp-1", "end", 55, status="answered", duration=48.2))
    call = wait_for(lambda: finished(line["portal_id"], "grp-1"), timeout=60)
    assert (call.finish_outcome, call.finish_error, call.collision) == ("done", None, False)
    log = card_log(sandbox, line["member_id"], "grp-1")
    assert log == [("register", 1), ("show", [1, 2, 3]), ("hide", [1, 3]), ("show", [4]),
                   ("hide", [2]), ("finish", 4)]
    assert cards_left_open(log) == set(), "the card is hidden for everyone"
    [register] = sandbox.log(line["member_id"], method=TELEPHONY[0])
    assert register["params"]["SHOW"] == "0"
    assert register["params"]["CALL_START_DATE"] == "2026-11-22T16:40:00+03:00"
    assert register["params"]["PHONE_NUMBER"] == "+49301234567"
    assert "CRM_ENTITY_TYPE" not in register["params"], "never sent as an empty string"
    found = stat(sandbox, line["member_id"], "grp-1")
    assert (found["PORTAL_USER_ID"], found["CALL_FAILED_CODE"], found["CALL_DURATION"],
            found["CALL_STATUS"]) == ("4", "200", "49", 1)
    assert sandbox.calls(line["member_id"])["active"] == []


def test_a_missed_incoming_call_finishes_with_304(line, sandbox):
    line["post"](
        pbx("miss-1", "start", 0, direction="in", phone="+4930999888",
            extensions=["101", "102"]),
        pbx("miss-1", "end", 20, status="no_answer", duration=0))
    wait_for(lambda: finished(line["portal_id"], "miss-1"), timeout=60)
    log = card_log(sandbox, line["member_id"], "miss-1")
    assert log == [("register", 1), ("show", [1, 2]), ("hide", [2]), ("finish", 1)]
    assert cards_left_open(log) == set()
    found = stat(sandbox, line["member_id"], "miss-1")
    assert (found["PORTAL_USER_ID"], found["CALL_FAILED_CODE"], found["CALL_STATUS"],
            found["CALL_FAILED_REASON"]) == ("1", "304", 0, "no answer")


def test_events_posted_out_of_order_still_give_one_register_and_one_finish(line, sandbox):
    line["post"](
        pbx("late-1", "end", 50, status="answered", duration=30),
        pbx("late-1", "answer", 5, extension="103"),
        pbx("late-1", "start", 0, direction="in", phone="+4930777666",
            extensions=["102", "103"]),
        pbx("late-1", "end", 51, status="answered", duration=31),  # a duplicate, later
        pbx("late-1", "answer", 6, extension="102"))  # after the end: changes nothing
    call = wait_for(lambda: finished(line["portal_id"], "late-1"), timeout=60)
    assert call.finish_outcome == "done"
    log = card_log(sandbox, line["member_id"], "late-1")
    assert log == [("register", 2), ("show", [2, 3]), ("hide", [2]), ("finish", 3)]
    assert cards_left_open(log) == set()
    assert stat(sandbox, line["member_id"], "late-1")["CALL_DURATION"] == "30"
