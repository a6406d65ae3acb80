"""Offline events mode against the sandbox portal: pull, store once, clear; recover a batch."""

from __future__ import annotations

from typing import Any

import pytest

from app.extensions import db, redis_ext
from app.ingress import offline
from app.tenants.models import Portal
from tests.conftest import wait_for
from tests.ingress.conftest import inbox_rows, make_offline_portal, statuses

CLIENT_ID, CLIENT_SECRET = "app.ingtest", "ing-secret"


@pytest.fixture
def offline_portal(app: Any, sandbox: Any) -> Portal:
    """A sandbox portal, installed and finished, in offline mode, bound to ONCRMDEALUPDATE."""
    return make_offline_portal(app, sandbox, "ONCRMDEALUPDATE", (CLIENT_ID, CLIENT_SECRET))


def _deal_updates(sandbox: Any, portal: Portal, ids: list[int]) -> None:
    for deal in ids:
        sandbox.trigger_event(portal.member_id, "ONCRMDEALUPDATE", {"FIELDS": {"ID": str(deal)}})


def test_pull_stores_each_offline_event_once_and_clears_the_queue(offline_portal, sandbox):
    _deal_updates(sandbox, offline_portal, [1, 2, 3])
    assert len(sandbox.offline_events(offline_portal.member_id)) == 3
    assert offline.pull(offline_portal) == 3
    rows = inbox_rows()
    assert [r.payload["data"]["FIELDS"]["ID"] for r in rows] == ["1", "2", "3"]
    assert {(r.source, r.event_type, r.portal_id) for r in rows} == \
        {("b24", "ONCRMDEALUPDATE", offline_portal.id)}
    assert sandbox.offline_events(offline_portal.member_id) == []
    assert offline.pull(offline_portal) == 0


def test_a_batch_reserved_before_a_crash_is_read_again_not_lost(offline_portal, sandbox):
    _deal_updates(sandbox, offline_portal, [7, 8])
    process_id, events = offline._take_batch(offline_portal)  # reserved, then the worker died
    assert len(events) == 2 and process_id
    _deal_updates(sandbox, offline_portal, [9])
    assert offline.pull(offline_portal) == 3
    assert sorted(r.payload["data"]["FIELDS"]["ID"] for r in inbox_rows()) == ["7", "8", "9"]
    assert sandbox.offline_events(offline_portal.member_id) == []
    assert redis_ext.client.get(offline._pending_key(offline_portal)) is None


def test_only_active_portals_in_offline_mode_are_pulled(offline_portal):
    assert offline.offline_portal_ids() == [offline_portal.id]
    offline_portal.settings.event_mode = "online"
    db.session.commit()
    assert offline.offline_portal_ids() == []
    assert offline.pull_portal(offline_portal.id) == 0


def test_a_worker_pulls_offline_events_periodically(offline_portal, sandbox,
                                                    start_handler_worker):
    _deal_updates(sandbox, offline_portal, [11, 12])
    start_handler_worker(periodic=True, OFFLINE_PULL_INTERVAL="1",
                         B24_CLIENT_ID=CLIENT_ID, B24_CLIENT_SECRET=CLIENT_SECRET)
    wait_for(lambda: statuses() == {"unhandled": 2}, timeout=40)  # parked: no deal handler
    assert sandbox.offline_events(offline_portal.member_id) == []
