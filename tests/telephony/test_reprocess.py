"""Past calls sent again (issue 23 point 5, protocol §8.11, §8.13, §8.15, §8.16): ``flask
calls reprocess`` and a PBX replaying old events. PBX events posted to intake, a real worker
(inbox handlers, the dispatcher's engine, the settle actor), a sandbox portal over loopback,
and the command run in-process against them. Checked from the portal's command log by
EXTERNAL_CALL_ID."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from sqlalchemy import delete

from app.extensions import db
from app.ingress.models import InboxEvent
from app.telephony.models import Call
from tests.conftest import wait_for
from tests.telephony.test_recording import ATTACH, pbx_files  # noqa: F401 - a fixture
from tests.telephony.test_unknown import (  # noqa: F401 - portal_line is a fixture
    FINISH,
    REGISTER,
    STATISTICS,
    call_row,
    entries,
    event,
    portal_line,
    quiet,
    settled,
)
from tests.tenants.conftest import oauth_app  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(240)

MSK = timezone(timedelta(hours=3))
SHOW, HIDE = "telephony.externalcall.show", "telephony.externalcall.hide"


def answered(line: dict[str, Any], call_id: str, at: datetime, talk: int = 30) -> None:
    """A call to users 1 and 2 answered by 2. Its end is posted first: it waits for the
    start, and the start applies both in one go (the call is ended before its register's
    outcome can come back)."""
    line["post"](event(call_id, "end", at + timedelta(seconds=10 + talk), status="answered",
                       duration=talk),
                 event(call_id, "answer", at + timedelta(seconds=10), extension="102"),
                 event(call_id, "start", at, direction="in", phone="+4930123456",
                       extensions=["101", "102"]))


def history(sandbox: Any, member_id: str, external: str) -> dict[str, Any]:
    """The sandbox's view of the call by EXTERNAL_CALL_ID (empty: it never reached it)."""
    found = sandbox.call_history(member_id, external)["calls"].get(external)
    return found or {"call_ids": [], "registers": [], "registered": 0, "finished": 0,
                     "cards": []}


def shows(hist: dict[str, Any]) -> list[dict[str, Any]]:
    """The cards the portal showed for a call (register with SHOW, or show)."""
    return [c for c in hist["cards"] if "show" in c["action"]]


def run(app: Any, member_id: str, since: datetime, until: datetime, *extra: str) -> Any:
    result = app.test_cli_runner().invoke(args=[
        "calls", "reprocess", "--member-id", member_id, "--since", since.isoformat(),
        "--until", until.isoformat(), *extra])
    db.session.remove()
    return result


def looked_up(sandbox: Any, member_id: str) -> list[str]:
    """Every EXTERNAL_CALL_ID the portal was asked about in voximplant.statistic.get."""
    out: list[str] = []
    for entry in entries(sandbox, member_id, STATISTICS):
        wanted = (entry["params"].get("FILTER") or {}).get("EXTERNAL_CALL_ID")
        out += wanted if isinstance(wanted, list) else [wanted] if wanted else []
    return out


def telephony(sandbox: Any, member_id: str, method: str, external: str) -> list[dict[str, Any]]:
    hist = history(sandbox, member_id, external)
    ids = set(hist["call_ids"])
    return [e for e in entries(sandbox, member_id, method)
            if e["params"].get("EXTERNAL_CALL_ID") == external
            or e["params"].get("CALL_ID") in ids]


@pytest.fixture
def past_day(app: Any, portal_line: Any, sandbox: Any,  # noqa: F811 - the imported fixture
             pbx_files: Any) -> dict[str, Any]:  # noqa: F811
    """An hour ago, four calls of one portal, none of them done in Bitrix24 by the app:

    - ``missing``: its register's answer was lost (a 504 before Bitrix24 ran it), and a past
      call's register is never resent: the call failed, its recording was skipped;
    - ``in-b24``: its register ran but the answer was lost (the call failed here), and the
      call was finished in Bitrix24 from elsewhere: only the statistics know it;
    - ``open``: registered, its finish lost before Bitrix24 ran it, no resend allowed
      (TELEPHONY_FINISH_RESENDS=0): open in Bitrix24, ``unknown`` here;
    - ``done``: finished, done in the app's table.
    """
    line = portal_line(fallback=None, TELEPHONY_FINISH_RESENDS="0")
    member, portal_id = line["member_id"], line["portal_id"]
    base = (datetime.now(UTC) - timedelta(hours=1)).astimezone(MSK).replace(microsecond=0)

    def failed(external: str) -> Any:
        return wait_for(lambda: (c := call_row(portal_id, external)) is not None
                        and c.state == "failed" and quiet(portal_id, c) and c, timeout=60)

    sandbox.set_fault(member, "html_504", count=1, methods=[REGISTER])
    answered(line, "missing", base)
    line["post"](event("missing", "record", base + timedelta(seconds=41),
                       url=f"{pbx_files.url}/rec/small.mp3"))
    assert failed("missing").record_state == "skipped"

    sandbox.set_fault(member, "executed_504", count=1, methods=[REGISTER])
    answered(line, "in-b24", base + timedelta(minutes=3))
    failed("in-b24")
    [call_id] = history(sandbox, member, "in-b24")["call_ids"]
    info = line["info"]  # someone else finishes it in Bitrix24
    httpx.post(info["client_endpoint"] + "telephony.externalCall.finish",
               json={"auth": info["access_token"], "CALL_ID": call_id, "USER_ID": 2,
                     "DURATION": 30, "STATUS_CODE": "200"}).raise_for_status()

    sandbox.set_fault(member, "html_504", count=1, methods=[FINISH])
    answered(line, "open", base + timedelta(minutes=6))
    wait_for(lambda: (c := settled(portal_id, "open")) is not None
             and c.finish_outcome == "unknown", timeout=60)
    sandbox.clear_faults(member)

    answered(line, "done", base + timedelta(minutes=10))
    wait_for(lambda: (c := settled(portal_id, "done")) and c.finish_outcome == "done",
             timeout=60)
    assert history(sandbox, member, "missing")["registered"] == 0, "nothing in Bitrix24"
    assert history(sandbox, member, "open")["finished"] == 0, "open in Bitrix24"
    assert history(sandbox, member, "in-b24")["finished"] == 1
    return {**line, "since": base - timedelta(minutes=1), "until": base + timedelta(minutes=15),
            "base": base}


def test_a_dry_run_lists_the_missing_calls_and_sends_nothing(app, past_day, sandbox):
    member = past_day["member_id"]
    before = len(sandbox.log(member))
    result = run(app, member, past_day["since"], past_day["until"], "--dry-run")
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line for line in result.output.splitlines()
             if line.strip()[:1].isdigit()}
    assert "register+finish" in lines["missing"], result.output
    assert past_day["base"].isoformat() in lines["missing"], "its start, with its offset"
    assert "+4930123456" in lines["missing"] and "owner=1" in lines["missing"]
    assert "answered" in lines["missing"]
    assert "in Bitrix24" in lines["in-b24"] and " done" in lines["done"]
    assert "finish: registered as" in lines["open"]
    assert "dry run: nothing sent" in result.output
    new = sandbox.log(member)[before:]
    assert [e["method"] for e in new] == [STATISTICS], "only the statistics were read"
    assert sorted(looked_up(sandbox, member)) == ["in-b24", "missing", "open"], \
        "a call done in the app's table is not looked up"
    assert call_row(past_day["portal_id"], "in-b24").state == "failed", "a dry run changes nothing"


def test_reprocess_registers_only_the_missing_call_once_and_twice_changes_nothing(
        app, past_day, sandbox):
    member, portal_id = past_day["member_id"], past_day["portal_id"]
    asked = app.test_cli_runner().invoke(args=[
        "calls", "reprocess", "--member-id", member, "--since", past_day["since"].isoformat(),
        "--until", past_day["until"].isoformat()], input="n\n")
    db.session.remove()
    assert asked.exit_code != 0 and "robots" in asked.output, "warns and asks first"
    assert telephony(sandbox, member, REGISTER, "missing") == [], "declined: nothing sent"

    result = run(app, member, past_day["since"], past_day["until"], "--yes")
    assert result.exit_code == 0, result.output
    assert "automation rules (robots)" in result.output
    call = wait_for(lambda: (c := settled(portal_id, "missing")) is not None
                    and c.finish_outcome == "done" and c, timeout=60)
    assert (call.state, call.register_error, call.replay) == ("ended", None, "reprocess")

    [register] = telephony(sandbox, member, REGISTER, "missing")
    assert register["params"]["SHOW"] == "0"
    assert register["params"]["CALL_START_DATE"] == past_day["base"].isoformat(), \
        "the original start, with its offset"
    assert register["params"]["USER_ID"] == "1", "the original owner"
    [finish] = telephony(sandbox, member, FINISH, "missing")
    assert (finish["params"]["ADD_TO_CHAT"], finish["params"]["STATUS_CODE"],
            finish["params"]["DURATION"], finish["params"]["USER_ID"]) == ("0", "200", "30", "2")
    assert finish["seq"] == register["seq"] + 1, "back to back"
    assert finish["batch_id"] == register["batch_id"] is not None, "in one batch (§8.15)"
    call = wait_for(lambda: (c := call_row(portal_id, "missing")).record_state == "attached"
                    and c, timeout=60)
    [attach] = telephony(sandbox, member, ATTACH, "missing")
    assert attach["seq"] > finish["seq"], "the recording after the finish"
    hist = history(sandbox, member, "missing")
    assert (hist["registered"], hist["finished"], shows(hist)) == (1, 1, []), "no card"
    assert hist["records"] == 1

    assert len(telephony(sandbox, member, REGISTER, "in-b24")) == 1, "not registered again"
    assert history(sandbox, member, "in-b24")["finished"] == 1
    in_b24 = call_row(portal_id, "in-b24")
    assert (in_b24.finish_outcome, in_b24.b24_call_id, in_b24.state) == (
        "done", history(sandbox, member, "in-b24")["call_ids"][0], "ended")

    opened = wait_for(lambda: (c := settled(portal_id, "open")) is not None
                      and c.finish_outcome == "done" and c, timeout=60)
    assert len(telephony(sandbox, member, REGISTER, "open")) == 1, "finished, not registered"
    hist = history(sandbox, member, "open")
    assert (hist["finished"], hist["call_ids"]) == (1, [opened.b24_call_id])
    [*_, last] = telephony(sandbox, member, FINISH, "open")
    assert (last["params"]["ADD_TO_CHAT"], last["params"]["STATUS_CODE"]) == ("0", "200")
    assert len(telephony(sandbox, member, REGISTER, "done")) == 1

    before = len(sandbox.log(member))
    again = run(app, member, past_day["since"], past_day["until"], "--yes")
    assert again.exit_code == 0, again.output
    assert "0 to send" in again.output
    assert sandbox.log(member)[before:] == [], "all done in the app's table: nothing asked"
    for external in ("missing", "in-b24", "open", "done"):
        assert history(sandbox, member, external)["registered"] == 1


def pbx_day(line: dict[str, Any], start: datetime) -> None:
    """Three past calls, as a PBX re-sends them after its link was down."""
    line["post"](
        event("day-1", "start", start, direction="in", phone="+4930111222",
              extensions=["101", "102"]),
        event("day-1", "ring", start + timedelta(seconds=1), extension="104"),
        event("day-1", "answer", start + timedelta(seconds=8), extension="102"),
        event("day-1", "transfer", start + timedelta(seconds=40), from_extension="102",
              to_extension="104"),
        event("day-1", "end", start + timedelta(seconds=70), status="answered", duration=62),
        event("day-2", "start", start + timedelta(minutes=3), direction="in",
              phone="+4930333444", extensions=["101", "104"]),
        event("day-2", "end", start + timedelta(minutes=3, seconds=25), status="no_answer",
              duration=0),
        event("day-3", "start", start + timedelta(minutes=6), direction="out",
              phone="+4930555666", extensions=["104"]),
        event("day-3", "end", start + timedelta(minutes=7), status="answered", duration=41))


def test_a_replayed_pbx_day_shows_no_cards_and_never_registers_twice(
        portal_line, sandbox):  # noqa: F811 - the imported fixture
    line = portal_line(fallback=None, TELEPHONY_REPLAY_AGE="900")
    member, portal_id = line["member_id"], line["portal_id"]
    start = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
    pbx_day(line, start)
    calls = ("day-1", "day-2", "day-3")
    for external in calls:
        wait_for(lambda e=external: (c := settled(portal_id, e)) is not None
                 and c.finish_outcome == "done", timeout=60)
    for external in calls:
        hist = history(sandbox, member, external)
        assert (hist["registered"], hist["finished"]) == (1, 1), external
        assert shows(hist) == [], f"{external}: a past call shows nobody a card"
        [register] = telephony(sandbox, member, REGISTER, external)
        assert register["params"]["SHOW"] == "0"
        [finish] = telephony(sandbox, member, FINISH, external)
        assert finish["params"]["ADD_TO_CHAT"] == "0", "no chat message for a past call"
    assert [e for e in sandbox.log(member) if e["method"] in (SHOW, HIDE)] == []
    assert history(sandbox, member, "day-1")["finisher"] == 4, "the last handler finishes"
    asked = [e for e in entries(sandbox, member, STATISTICS)
             if (e["params"].get("FILTER") or {}).get("EXTERNAL_CALL_ID") == "day-1"]
    [register] = telephony(sandbox, member, REGISTER, "day-1")
    assert asked and asked[0]["seq"] < register["seq"], "the statistics first"
    assert call_row(portal_id, "day-1").replay == "pbx"

    # The PBX sends the day again, to an app that no longer has these calls (restored from
    # a backup, say): Bitrix24's statistics know them, so none is registered again.
    db.session.execute(delete(Call).where(Call.portal_id == portal_id))
    db.session.execute(delete(InboxEvent).where(InboxEvent.portal_id == portal_id))
    db.session.commit()
    pbx_day(line, start)
    for external in calls:
        call = wait_for(lambda e=external: (c := call_row(portal_id, e)) is not None
                        and c.finish_outcome == "done" and c.state == "ended"
                        and quiet(portal_id, c) and c,
                        timeout=60)
        assert call.b24_call_id == history(sandbox, member, external)["call_ids"][0]
    for external in calls:
        hist = history(sandbox, member, external)
        assert (len(hist["registers"]), hist["registered"], hist["finished"]) == (1, 1, 1), \
            f"{external} registered or finished twice"
        assert shows(hist) == []


def test_a_replayed_register_whose_answer_is_lost_is_not_resent_and_says_so(
        app, portal_line, sandbox):  # noqa: F811 - the imported fixture
    line = portal_line(fallback=None, TELEPHONY_REPLAY_AGE="900")
    member, portal_id = line["member_id"], line["portal_id"]
    sandbox.set_fault(member, "executed_504", count=1, methods=[REGISTER])
    start = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
    answered(line, "lost-1", start)
    call = wait_for(lambda: (c := call_row(portal_id, "lost-1")) is not None
                    and c.state == "failed" and quiet(portal_id, c) and c, timeout=60)
    assert call.register_error.startswith("unknown outcome")
    assert "not sent again" in call.register_error
    hist = history(sandbox, member, "lost-1")
    assert (len(hist["registers"]), hist["finished"]) == (1, 0), \
        "sent once (a resend would make a second call), never finished from here"
    from app.telephony.cli import describe
    assert "may be open in Bitrix24 unfinished" in describe(call), "flask calls show says so"
    listed = run(app, member, start - timedelta(minutes=1), start + timedelta(minutes=1),
                 "--dry-run")
    assert "register+finish: its register's outcome was unknown before" in listed.output


def test_the_statistics_are_read_50_ids_a_request_and_every_page(app, portal_line, sandbox):  # noqa: F811
    """60 calls finished in Bitrix24, one of them 55 times over (a finished call is never a
    dedup target): two chunks of ids, and more pages for the chunk with the repeats."""
    line = portal_line(fallback=None)
    member, info = line["member_id"], line["info"]
    sandbox.set_bucket(member, drain=1000, burst=10000)  # the set-up's 230 requests at once

    def finished_in_bitrix24(external: str) -> str:
        url, auth = info["client_endpoint"], info["access_token"]
        reg = httpx.post(url + "telephony.externalCall.register", json={
            "auth": auth, "USER_ID": 1, "PHONE_NUMBER": "+4930123456", "TYPE": 2, "SHOW": 0,
            "EXTERNAL_CALL_ID": external}).raise_for_status().json()["result"]
        httpx.post(url + "telephony.externalCall.finish", json={
            "auth": auth, "CALL_ID": reg["CALL_ID"], "USER_ID": 1,
            "DURATION": 5}).raise_for_status()
        return str(reg["CALL_ID"])

    first = {f"s-{n:02d}": finished_in_bitrix24(f"s-{n:02d}") for n in range(60)}
    for _ in range(54):
        finished_in_bitrix24("s-00")
    from app.telephony import reprocess
    from app.tenants.models import Portal
    portal = db.session.get(Portal, line["portal_id"])
    found = reprocess.statistics(portal, [*first, "not-there"])
    assert found == first, "every call found, each with its first CALL_ID"
    asked = [e["params"] for e in entries(sandbox, member, STATISTICS)]
    # the first 50 ids have 104 rows (s-00 has 55): three pages; then the last 11 ids
    assert [len(p["FILTER"]["EXTERNAL_CALL_ID"]) for p in asked] == [50, 50, 50, 11]
    assert [str(p.get("start")) for p in asked] == ["0", "50", "100", "0"], "every page"
