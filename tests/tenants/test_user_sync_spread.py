"""The periodic user sync spreads its portals over the interval instead of firing them all at
once, enqueues each live portal once, and never causes a token refresh."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import dramatiq

from app.dispatcher.models import OutboxCommand
from app.extensions import db
from app.tenants.models import PortalStatus, utcnow
from tests.conftest import wait_for
from tests.dispatcher.conftest import rows
from tests.ingress.conftest import make_portal

INTERVAL_MS = 6 * 3600 * 1000  # workers/install.py USER_SYNC_SECONDS
LIVE = 300


def _delayed_syncs(app: Any, redis_client: Any) -> list[dict[str, Any]]:
    """The sync_portal_users messages waiting in the broker's delay queue."""
    key = f"{app.config['DRAMATIQ_NAMESPACE']}:default.DQ.msgs"
    found = [json.loads(raw) for raw in redis_client.hvals(key)]
    return [m for m in found if m["actor_name"] == "sync_portal_users"]


def test_live_portals_are_spread_over_the_interval_once_each(app, redis_client, start_worker):
    soon = utcnow() + timedelta(hours=1)
    live = {make_portal(expires_at=soon).id for _ in range(LIVE)}
    make_portal(expires_at=utcnow() - timedelta(minutes=5))  # expired: never synced on a timer
    make_portal(expires_at=soon, status=PortalStatus.AUTH_FAILED.value)
    # Two processes, each with its periodic thread: the tick is still taken once.
    start_worker(processes=2, periodic=True, DISPATCH_ENABLED="0")

    messages = wait_for(lambda: (m := _delayed_syncs(app, redis_client)) and len(m) >= LIVE
                        and m, timeout=60)
    assert sorted(m["args"][0] for m in messages) == sorted(live)  # each live portal once
    assert all(m["kwargs"] == {"live_only": True} for m in messages)
    delays = [m["options"]["eta"] - m["message_timestamp"] for m in messages]
    assert all(0 <= d < INTERVAL_MS + 1000 for d in delays)
    # Flat: each sixth of the interval gets about a sixth of the portals (50; binomial sd 6.5).
    sixths = [sum(1 for d in delays if k * INTERVAL_MS / 6 <= d < (k + 1) * INTERVAL_MS / 6)
              for k in range(6)]
    assert all(25 <= n <= 75 for n in sixths), sixths
    assert max(delays) > INTERVAL_MS * 0.9 and min(delays) < INTERVAL_MS * 0.1


def test_a_scheduled_sync_skips_a_portal_whose_token_expired_by_its_turn(app, redis_client,
                                                                       start_worker):
    stale = make_portal(expires_at=utcnow() - timedelta(minutes=1))
    fresh = make_portal(expires_at=utcnow() + timedelta(hours=1))
    start_worker(DISPATCH_ENABLED="0")
    broker = app.extensions["broker"]
    for portal in (stale, fresh):
        broker.enqueue(dramatiq.Message(queue_name="default", actor_name="sync_portal_users",
                                        args=(portal.id,), kwargs={"live_only": True},
                                        options={}))
    wait_for(lambda: rows(fresh.id))
    ready = f"{app.config['DRAMATIQ_NAMESPACE']}:default.msgs"
    wait_for(lambda: redis_client.hlen(ready) == 0)  # the stale one was handled too
    assert [r.method for r in rows(fresh.id)] == ["user.get"]
    db.session.expire_all()
    assert db.session.query(OutboxCommand).filter_by(portal_id=stale.id).count() == 0
