"""Idle portals get one refresh to keep their chain alive; no other portal does."""

from __future__ import annotations

from datetime import timedelta

from app.tenants import service
from app.tenants.models import PortalStatus, utcnow
from tests.conftest import wait_for
from tests.tenants.conftest import reload_portal


def _portals(make_portal):
    long_ago, lately = utcnow() - timedelta(days=40), utcnow() - timedelta(days=2)
    idle, _ = make_portal(last_refresh_at=long_ago, last_activity_at=long_ago)
    never_used, _ = make_portal(last_refresh_at=long_ago)
    busy, _ = make_portal(last_refresh_at=long_ago, last_activity_at=lately)
    fresh, _ = make_portal(last_refresh_at=lately)
    held, _ = make_portal(last_refresh_at=long_ago, status=PortalStatus.AUTH_FAILED.value)
    return {"idle": idle, "never_used": never_used, "busy": busy, "fresh": fresh, "held": held}


def _versions(portals):
    return {name: reload_portal(p.member_id).token_version for name, p in portals.items()}


def test_idle_refresh_picks_only_active_portals_quiet_for_30_days(make_portal, sandbox):
    portals = _portals(make_portal)
    assert sorted(service.refresh_idle_portals()) == sorted(
        [portals["idle"].member_id, portals["never_used"].member_id])
    assert _versions(portals) == {"idle": 2, "never_used": 2, "busy": 1, "fresh": 1, "held": 1}
    refreshes = {name: sandbox.counters(p.member_id)["refreshes"] for name, p in portals.items()}
    assert refreshes == {"idle": 1, "never_used": 1, "busy": 0, "fresh": 0, "held": 0}
    assert service.refresh_idle_portals() == []  # just refreshed: not idle any more


def test_the_periodic_actor_runs_it_in_a_real_worker(make_portal, sandbox, start_worker):
    portals = _portals(make_portal)
    worker = start_worker(periodic=True)  # the scheduler enqueues every periodic job on boot
    expected = {"idle": 2, "never_used": 2, "busy": 1, "fresh": 1, "held": 1}
    wait_for(lambda: _versions(portals) == expected, timeout=30)
    assert sum(sandbox.counters(p.member_id)["refreshes"] for p in portals.values()) == 2
    assert worker.proc.poll() is None, worker.output()
