"""Unknown outcomes and the register fallback, end to end (issue 22 point 4, protocol §8.3,
§8.13): PBX events posted to intake, a real worker (inbox handlers, the dispatcher's engine,
the settle actor) and a sandbox portal whose method-bound faults answer 504 after running
the command. Checked from the portal's command log by EXTERNAL_CALL_ID."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.extensions import db
from app.ingress import auth
from app.telephony.cli import describe
from app.telephony.models import Call
from tests.conftest import wait_for
from tests.dispatcher.conftest import rows
from tests.telephony.conftest import (
    dispatching_worker,
    poster,
    sandbox_line,
)
from tests.telephony.test_end_to_end import cards_left_open
from tests.tenants.conftest import CLIENT_ID, CLIENT_SECRET, oauth_app  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(180)

# Bitrix24 has user 3 inactive; the app's extension map still lists him (a stale map).
SANDBOX_USERS = [{"id": 1, "name": "Admin", "admin": True, "extension": "101"},
                 {"id": 2, "name": "Bob", "extension": "102"},
                 {"id": 3, "name": "Cy", "extension": "103", "active": False},
                 {"id": 4, "name": "Di", "extension": "104"}]
MAP = {"101": 1, "102": 2, "103": 3, "104": 4}
REGISTER, SHOW, HIDE, FINISH = (f"telephony.externalcall.{m}"
                                for m in ("register", "show", "hide", "finish"))
STATISTICS = "voximplant.statistic.get"


@pytest.fixture
def portal_line(oauth_app: Any, sandbox: Any, client: Any,  # noqa: F811 - imported fixture
                start_worker: Any, redis_client: Any) -> Any:
    """Factory: a sandbox portal (user 3 inactive there), its Portal row with the fallback
    user given, the extension map, a PBX API key and a worker listening for nudges."""

    def make(fallback: int | None, **env: str) -> dict[str, Any]:
        portal, info = sandbox_line(sandbox, SANDBOX_USERS, MAP, fallback)
        key = auth.issue_api_key(portal)
        dispatching_worker(start_worker, redis_client, **env)
        post = poster(client, key)

        return {"info": info, "member_id": info["member_id"], "portal_id": portal.id,
                "post": post}

    return make


def event(call_id: str, kind: str, at: datetime, **fields: Any) -> dict[str, Any]:
    return {"call_id": call_id, "event": kind, "at": at.isoformat(timespec="seconds"),
            **fields}


def call_row(portal_id: int, pbx_call_id: str) -> Call | None:
    db.session.expire_all()
    return db.session.scalars(select(Call).where(Call.portal_id == portal_id,
                                                 Call.pbx_call_id == pbx_call_id)).first()


def settled(portal_id: int, pbx_call_id: str) -> Call | None:
    """The call once its finish's outcome is in and none of its commands is on its way."""
    call = call_row(portal_id, pbx_call_id)
    if call is None or call.finish_outcome is None or not quiet(portal_id, call):
        return None
    return call


def quiet(portal_id: int, call: Call) -> bool:
    """None of the call's commands is queued or in flight (nothing left waiting)."""
    mine = [r for r in rows(portal_id) if r.key == f"call:{call.id}"]
    return bool(mine) and all(r.status in ("done", "dead") for r in mine)


def history(sandbox: Any, member_id: str, external: str) -> dict[str, Any]:
    return sandbox.call_history(member_id, external)["calls"][external]


def entries(sandbox: Any, member_id: str, method: str) -> list[dict[str, Any]]:
    return sandbox.log(member_id, method=method)


def ringing_alone(line: dict[str, Any], call_id: str, at: datetime) -> None:
    """A call that rings user 1 alone and is not answered: register, show, then a finish
    with nothing before it in its batch (no other card to hide)."""
    line["post"](event(call_id, "start", at, direction="in", phone="+4930123456",
                       extensions=["101"]),
                 event(call_id, "end", at + timedelta(seconds=20), status="no_answer",
                       duration=0))


# ---------------------------------------------------------------- register, unknown outcome


def test_a_register_lost_in_a_504_is_sent_again_and_dedups_onto_its_call(portal_line,
                                                                        sandbox):
    line = portal_line(fallback=None)
    sandbox.set_fault(line["member_id"], "executed_504", count=1, methods=[REGISTER])
    ringing_alone(line, "lost-1", datetime.now(UTC) - timedelta(minutes=2))
    call = wait_for(lambda: settled(line["portal_id"], "lost-1"), timeout=60)
    assert (call.state, call.register_error, call.finish_outcome) == ("ended", None, "done")
    hist = history(sandbox, line["member_id"], "lost-1")
    assert len(hist["registers"]) == 2, "sent twice: the first answer was lost"
    assert hist["registered"] == 1 and len(hist["call_ids"]) == 1, "one call in Bitrix24"
    assert [r["shown"] for r in hist["registers"]] == [[], []], "SHOW=0 both times"
    assert hist["finished"] == 1
    assert sandbox.counters(line["member_id"])["executed_504"] == 1


def test_a_register_lost_past_the_window_is_not_sent_again_and_the_call_fails(portal_line,
                                                                             sandbox):
    line = portal_line(fallback=None)
    sandbox.set_fault(line["member_id"], "executed_504", count=1, methods=[REGISTER])
    ringing_alone(line, "old-1", datetime.now(UTC) - timedelta(minutes=40))
    call = wait_for(lambda: (c := call_row(line["portal_id"], "old-1")) is not None
                    and c.state == "failed" and quiet(line["portal_id"], c) and c, timeout=60)
    assert call.register_error.startswith("unknown outcome")
    assert "CALL_START_DATE is" in call.register_error and "not sent again" in call.register_error
    hist = history(sandbox, line["member_id"], "old-1")
    assert len(hist["registers"]) == 1, "a resend would have made a second call"
    assert entries(sandbox, line["member_id"], FINISH) == []
    assert "register: unknown outcome" in describe(call), "flask calls show tells why"
    register = next(r for r in rows(line["portal_id"]) if r.method == REGISTER)
    assert (register.status, register.outcome) == ("dead", "unknown")


# ---------------------------------------------------------------- finish, unknown outcome


def test_a_finish_lost_in_a_504_is_sent_again_and_confirmed_by_the_statistics(portal_line,
                                                                              sandbox):
    line = portal_line(fallback=None)
    sandbox.set_fault(line["member_id"], "executed_504", count=1, methods=[FINISH])
    ringing_alone(line, "fin-1", datetime.now(UTC) - timedelta(minutes=1))
    call = wait_for(lambda: settled(line["portal_id"], "fin-1"), timeout=60)
    assert (call.finish_outcome, call.finish_error) == ("done", None)
    assert [(s["method"], s["outcome"]) for s in call.finish_steps] == [
        (FINISH, "unknown"), (FINISH, "dead"), (STATISTICS, "done")]
    assert call.finish_steps[1]["reason"].startswith("ERROR_CORE: Call is not found")
    finishes = entries(sandbox, line["member_id"], FINISH)
    assert [e["status"] for e in finishes] == [200, 400], "executed once, then not found"
    [check] = entries(sandbox, line["member_id"], STATISTICS)
    assert check["params"]["FILTER"] == {"CALL_ID": call.b24_call_id}
    hist = history(sandbox, line["member_id"], "fin-1")
    assert hist["finished"] == 1 and hist["registered"] == 1
    shown = describe(call)  # flask calls show
    assert "steps: finish unknown (" in shown
    assert "> finish dead (ERROR_CORE: Call is not found" in shown
    assert shown.endswith("> voximplant.statistic.get done")


def test_a_finish_lost_every_time_stays_unknown_after_its_resends(portal_line, sandbox):
    line = portal_line(fallback=None, TELEPHONY_FINISH_RESENDS="1")
    sandbox.set_fault(line["member_id"], "executed_504", count=10, methods=[FINISH])
    ringing_alone(line, "fin-2", datetime.now(UTC) - timedelta(minutes=1))
    call = wait_for(lambda: settled(line["portal_id"], "fin-2"), timeout=60)
    assert call.finish_outcome == "unknown"
    assert call.finish_error.endswith("(sent 2 times, TELEPHONY_FINISH_RESENDS=1)")
    assert [s["outcome"] for s in call.finish_steps] == ["unknown", "unknown"]
    assert len(entries(sandbox, line["member_id"], FINISH)) == 2, "one resend, no more"
    assert "finish unknown" in describe(call)


def test_call_not_found_without_a_lost_finish_is_a_real_error(portal_line, sandbox):
    line = portal_line(fallback=None)
    at = datetime.now(UTC) - timedelta(minutes=1)
    line["post"](event("gone-1", "start", at, direction="in", phone="+4930123456",
                       extensions=["101"]))
    call = wait_for(lambda: (c := call_row(line["portal_id"], "gone-1")) is not None
                    and c.b24_call_id and c, timeout=60)
    info = line["info"]  # someone else finishes the call in Bitrix24 first
    httpx.post(info["client_endpoint"] + "telephony.externalCall.finish",
               json={"auth": info["access_token"], "CALL_ID": call.b24_call_id,
                     "USER_ID": 1}).raise_for_status()
    line["post"](event("gone-1", "end", at + timedelta(seconds=9), status="no_answer",
                       duration=0))
    call = wait_for(lambda: settled(line["portal_id"], "gone-1"), timeout=60)
    assert call.finish_outcome == "dead"
    assert call.finish_error.startswith("ERROR_CORE: Call is not found")
    assert "finish dead" in describe(call) and "Call is not found" in describe(call)
    assert entries(sandbox, line["member_id"], STATISTICS) == [], "nothing to confirm"


# ---------------------------------------------------------------- register refused: fallback


def test_a_refused_owner_falls_back_to_the_fallback_user_once(portal_line, sandbox):
    line = portal_line(fallback=1)
    at = datetime.now(UTC) - timedelta(minutes=1)
    line["post"](event("fb-1", "start", at, direction="in", phone="+4930555111",
                       extensions=["103", "102"]))  # owner: user 3, inactive in Bitrix24
    call = wait_for(lambda: (c := call_row(line["portal_id"], "fb-1")) is not None
                    and c.b24_call_id and c, timeout=60)
    assert (call.owner_user_id, call.refused_user_id, call.state) == (1, 3, "ringing")
    line["post"](event("fb-1", "end", at + timedelta(seconds=15), status="no_answer",
                       duration=0))
    call = wait_for(lambda: settled(line["portal_id"], "fb-1"), timeout=60)
    assert call.finish_outcome == "done"
    hist = history(sandbox, line["member_id"], "fb-1")
    first, second = hist["registers"]
    assert (first["error"], first.get("call_id")) == ("ERROR_CORE", None)
    refused, again = [r for r in rows(line["portal_id"]) if r.method == REGISTER]
    assert refused.params["USER_ID"] == 3 and "User is not found or is not active" in str(
        refused.dead_reason)
    assert again.params == {**refused.params, "USER_ID": 1, "SHOW": 0}, "same call, SHOW=0"
    assert (second["owner"], second["created"], second["shown"]) == (1, True, [])
    assert hist["registered"] == 1 and hist["finished"] == 1 and hist["finisher"] == 1
    cards = [(c["action"], sorted(c["users"])) for c in hist["cards"] if c["accepted"]]
    assert ("show", [2, 3]) in cards, "the ringing users see the card on the new CALL_ID"
    log = [(a, u if a != "finish-hide" else u[0]) for a, u in cards]
    log = [("finish" if a == "finish-hide" else a, u) for a, u in log]
    assert cards_left_open(log) == set()
    [statistics] = [s for s in sandbox.calls(line["member_id"])["finished"]
                    if s["EXTERNAL_CALL_ID"] == "fb-1"]
    assert (statistics["PORTAL_USER_ID"], statistics["CALL_FAILED_CODE"]) == ("1", "304")
    assert "user 3 refused" in describe(call)


def test_a_refused_owner_without_a_fallback_fails_the_call_and_nothing_waits(portal_line,
                                                                            sandbox):
    line = portal_line(fallback=None)
    at = datetime.now(UTC) - timedelta(minutes=1)
    line["post"](event("nofb-1", "start", at, direction="in", phone="+4930555222",
                       extensions=["103", "102"]),
                 event("nofb-1", "answer", at + timedelta(seconds=3), extension="102"),
                 event("nofb-1", "end", at + timedelta(seconds=30), status="answered",
                       duration=25))
    call = wait_for(lambda: (c := call_row(line["portal_id"], "nofb-1")) is not None
                    and c.state == "failed" and quiet(line["portal_id"], c) and c, timeout=60)
    assert "User is not found or is not active" in call.register_error
    assert "register: ERROR_CORE: User is not found" in describe(call)
    mine = [r for r in rows(line["portal_id"]) if r.key == f"call:{call.id}"]
    assert [r.method for r in mine if r.status == "dead"][0] == REGISTER
    assert not any(r.status in ("queued", "inflight") for r in mine), "nothing left waiting"
    assert all(r.dead_reason and "dead" in r.dead_reason
               for r in mine if r.method in (SHOW, HIDE) and r.status == "dead")
    assert entries(sandbox, line["member_id"], FINISH) == [], "never finished"
    assert len(history(sandbox, line["member_id"], "nofb-1")["registers"]) == 1


def test_a_refused_answerer_is_finished_by_the_fallback_user(portal_line, sandbox):
    line = portal_line(fallback=1)
    sandbox.set_latency(line["member_id"], 300)  # the events are in before register's answer
    at = datetime.now(UTC) - timedelta(minutes=1)
    line["post"](event("fb-2", "start", at, direction="in", phone="+4930555333",
                       extensions=["103", "102"]),
                 event("fb-2", "answer", at + timedelta(seconds=4), extension="103"),
                 event("fb-2", "end", at + timedelta(seconds=40), status="answered",
                       duration=35))
    call = wait_for(lambda: settled(line["portal_id"], "fb-2"), timeout=60)
    assert (call.finish_outcome, call.refused_user_id, call.owner_user_id) == ("done", 3, 1)
    hist = history(sandbox, line["member_id"], "fb-2")
    assert hist["registered"] == 1 and hist["finished"] == 1
    assert hist["finisher"] == 1, "Bitrix24 refuses user 3 on finish too"
    assert hist["open_at_finish"] == [] and hist["after_finish"] == []
    [statistics] = [s for s in sandbox.calls(line["member_id"])["finished"]
                    if s["EXTERNAL_CALL_ID"] == "fb-2"]
    assert (statistics["PORTAL_USER_ID"], statistics["CALL_FAILED_CODE"]) == ("1", "200")
