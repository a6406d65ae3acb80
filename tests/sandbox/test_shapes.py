"""Smaller shape differences (issue #11 point 6): placement.bind errors at HTTP 200,
placement.unbind counting 2 per handler, offline-event ids as strings, dates in the portal's
time zone.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from sandbox.client import SandboxError

from .conftest import call
from .test_sandbox_events import installed

HANDLER = "http://app.example.test/placements/"


def test_placement_bind_errors_come_with_http_200(portal, http):
    resp = call(http, portal, "placement.bind", PLACEMENT="NO_SUCH_PLACE", HANDLER=HANDLER)
    assert resp.status_code == 200
    assert resp.json()["error"] == "ERROR_PLACEMENT_NOT_FOUND" and "result" not in resp.json()
    missing = call(http, portal, "placement.bind", HANDLER=HANDLER)
    assert (missing.status_code, missing.json()["argument"]) == (200, "PLACEMENT")


def test_a_placement_bind_error_in_a_batch_is_a_result_not_a_result_error(portal, http):
    cmd = {"ok": f"placement.bind?PLACEMENT=CALL_CARD&HANDLER={HANDLER}",
           "bad": f"placement.bind?PLACEMENT=PAGE_BACKGROUND_WORKER&HANDLER={HANDLER}"}
    res = call(http, portal, "batch", cmd=cmd).json()["result"]
    assert res["result_error"] == []
    assert res["result"]["ok"] is True
    assert res["result"]["bad"]["error"] == "EMPTY_ERROR_HANDLER_URL"


def test_a_portal_can_lack_a_placement(sandbox, http):
    p = sandbox.create_portal(missing_placements=["CALL_CARD"])
    resp = call(http, p, "placement.bind", PLACEMENT="CALL_CARD", HANDLER=HANDLER)
    assert (resp.status_code, resp.json()["error"]) == (200, "ERROR_PLACEMENT_NOT_FOUND")
    assert "CALL_CARD" not in call(http, p, "placement.list").json()["result"]


def test_placement_unbind_counts_two_per_handler(portal, http):
    for suffix in ("a", "b"):
        call(http, portal, "placement.bind", PLACEMENT="LEFT_MENU", HANDLER=HANDLER + suffix)
    one = call(http, portal, "placement.unbind", PLACEMENT="LEFT_MENU", HANDLER=HANDLER + "a")
    assert one.json()["result"] == {"count": 2}
    rest = call(http, portal, "placement.unbind", PLACEMENT="LEFT_MENU")
    assert rest.json()["result"] == {"count": 2}
    none = call(http, portal, "placement.unbind", PLACEMENT="LEFT_MENU")
    assert none.json()["result"] == {"count": 0}


def test_offline_event_ids_are_strings_in_numeric_order(sandbox, fake_app, http):
    p = installed(sandbox, fake_app)
    call(http, p, "event.bind", event="ONCRMDEALADD", event_type="offline")
    for n in range(11):
        call(http, p, "crm.deal.add", fields={"TITLE": f"d{n}"})
    listed = call(http, p, "event.offline.list").json()["result"]
    assert [e["ID"] for e in listed] == [str(n) for n in range(1, 12)]
    later = call(http, p, "event.offline.get", clear=0, filter={">=ID": "9"}).json()["result"]
    assert [e["ID"] for e in later["events"]] == ["9", "10", "11"]
    cleared = call(http, p, "event.offline.clear", process_id=later["process_id"], id=["10"])
    assert cleared.json()["result"] is True
    assert "10" not in [e["ID"] for e in call(http, p, "event.offline.list").json()["result"]]


def _offset(stamp: str) -> timedelta | None:
    return datetime.fromisoformat(stamp).utcoffset()


def test_every_date_carries_the_portals_offset(sandbox, fake_app, http):
    p = installed(sandbox, fake_app, time_zone="+03:00")
    three = timedelta(hours=3)
    call(http, p, "event.bind", event="ONCRMDEALADD", event_type="offline")
    deal = call(http, p, "crm.deal.add", fields={"TITLE": "x"}).json()
    assert _offset(deal["time"]["date_start"]) == three == _offset(deal["time"]["date_finish"])
    got = call(http, p, "crm.deal.get", id=deal["result"]).json()["result"]
    assert _offset(got["DATE_CREATE"]) == three == _offset(got["DATE_MODIFY"])
    [event] = call(http, p, "event.offline.list").json()["result"]
    assert _offset(event["TIMESTAMP_X"]) == three
    reg = call(http, p, "telephony.externalCall.register", USER_ID=1, PHONE_NUMBER="+4930123",
               TYPE=2, CALL_START_DATE="2026-03-07T10:20:30+00:00").json()["result"]
    fin = call(http, p, "telephony.externalCall.finish", CALL_ID=reg["CALL_ID"], USER_ID=1)
    assert fin.json()["result"]["CALL_START_DATE"] == "2026-03-07T13:20:30+03:00"
    batch = call(http, p, "batch", cmd={"a": "app.info"}).json()
    assert _offset(batch["time"]["date_start"]) == three
    assert _offset(batch["result"]["result_time"]["a"]["date_start"]) == three


def test_portals_default_to_berlin_time_and_refuse_unknown_zones(sandbox, portal, http):
    assert portal["time_zone"] == "Europe/Berlin"
    stamp = call(http, portal, "app.info").json()["time"]["date_start"]
    assert _offset(stamp) in (timedelta(hours=1), timedelta(hours=2))
    with pytest.raises(SandboxError, match="unknown time zone"):
        sandbox.create_portal(time_zone="Mars/Olympus")
