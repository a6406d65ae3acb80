"""Offline events against the stricter sandbox (issue #11 point 6): ids are strings, so "10"
comes after "9"; records are cleared by those ids; TIMESTAMP_X carries the portal's offset.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from app.dispatcher.direct import call_method
from app.ingress import offline
from app.tenants.models import Portal
from tests.ingress.conftest import inbox_rows, make_offline_portal

CLIENT_ID, CLIENT_SECRET = "app.ingtest", "ing-secret"


@pytest.fixture
def moscow_portal(app: Any, sandbox: Any) -> Portal:
    """An offline-mode portal three hours east of UTC, bound to ONCRMDEALADD offline."""
    return make_offline_portal(app, sandbox, "ONCRMDEALADD", (CLIENT_ID, CLIENT_SECRET),
                          time_zone="+03:00")


def _add_deals(portal: Portal, count: int) -> None:
    for n in range(count):
        call_method(portal, "crm.deal.add", {"fields": {"TITLE": f"deal {n}"}})


def test_a_batch_is_stored_in_numeric_id_order_whatever_order_it_came_in(moscow_portal,
                                                                         sandbox):
    _add_deals(moscow_portal, 11)
    process_id, events = offline._take_batch(moscow_portal)
    assert [e["ID"] for e in events][8:] == ["9", "10", "11"]  # strings
    random.Random(4).shuffle(events)  # ties in TIMESTAMP_X come back in no promised order
    assert offline._store_batch(moscow_portal, process_id, events) == 11
    assert [r.payload["offline"]["id"] for r in inbox_rows()] == [str(n) for n in range(1, 12)]
    [clear] = sandbox.log(moscow_portal.member_id, method="event.offline.clear")
    assert sorted(clear["params"]["id"], key=int) == [str(n) for n in range(1, 12)]
    assert sandbox.offline_events(moscow_portal.member_id) == []


def test_timestamp_x_is_read_with_the_portals_offset(moscow_portal):
    before = int(time.time())
    _add_deals(moscow_portal, 1)
    assert offline.pull(moscow_portal) == 1
    [row] = inbox_rows()
    stamp = row.payload["offline"]["timestamp_x"]
    assert stamp.endswith("+03:00")
    assert before <= int(row.payload["ts"]) <= int(time.time())  # unix seconds, like online ts


def test_a_timestamp_without_an_offset_gives_no_instant():
    assert offline.unix_ts("2026-03-07T10:20:30") is None
    assert offline.unix_ts("2026-03-07T10:20:30+03:00") == str(
        int(datetime(2026, 3, 7, 7, 20, 30, tzinfo=UTC).timestamp()))
