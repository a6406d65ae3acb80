"""A refresher killed with SIGKILL mid-refresh never wedges the portal.

A real caller process refreshes through a small token-endpoint relay in this
test (its ``B24_OAUTH_TOKEN_URL``); the relay parks the request at a chosen
point and the test SIGKILLs the process there:

* before the auth server saw the request: after the lock's TTL the next caller
  refreshes with the same, still valid, refresh token; the portal stays active;
* after the auth server rotated the chain (the answer never reached the process):
  the stored refresh token is spent, so the next caller gets ``invalid_grant``
  and the portal becomes ``auth_failed`` with a reason naming the interrupted
  refresh (no loop, no second spend); the next admin iframe open stores a fresh
  chain (``store_new_chain``) and calls work again.
"""

from __future__ import annotations

import os
import signal

import pytest

from app.dispatcher import direct
from app.extensions import redis_ext
from app.tenants import service, tokens
from app.tenants.models import PortalStatus
from app.tenants.status import PortalUnavailable
from tests.conftest import wait_for
from tests.tenants.conftest import reload_portal

LOCK_TTL = 2.0


def _kill_mid_refresh(portal, sandbox, spawn_callers, relay) -> None:
    """Start a refresh in a real process, SIGKILL it while the relay holds the request."""
    sandbox.expire_tokens(portal.member_id)
    caller = spawn_callers(portal.member_id, 1, B24_OAUTH_TOKEN_URL=relay.url,
                           CALLER_CONFIG=f'{{"B24_REFRESH_LOCK_TTL": {LOCK_TTL}}}')
    caller.wait_ready()
    caller.go()
    assert (relay.rotated if relay.forward else relay.arrived).wait(20)
    os.kill(caller.proc.pid, signal.SIGKILL)
    caller.proc.wait(10)
    row = reload_portal(portal.member_id)
    assert row.refresh_started_at is not None  # the marker was committed before the request
    assert row.token_version == 1 and row.status == PortalStatus.ACTIVE.value
    lock = tokens.lock_key(portal.member_id)
    assert redis_ext.client.exists(lock)  # the dead process still "holds" the lock...
    wait_for(lambda: not redis_ext.client.exists(lock), timeout=LOCK_TTL + 3)  # ...until its TTL


def test_killed_before_the_auth_server_saw_it_next_caller_refreshes(
        make_portal, sandbox, spawn_callers, relay_factory):
    portal, info = make_portal()
    _kill_mid_refresh(portal, sandbox, spawn_callers, relay_factory(forward=False))
    assert sandbox.counters(portal.member_id)["refreshes"] == 0

    assert direct.call_method(service.get_portal(portal.member_id), "user.current")["ID"] == "1"
    row = reload_portal(portal.member_id)
    assert row.status == PortalStatus.ACTIVE.value
    assert row.token_version == 2 and row.refresh_started_at is None
    counters = sandbox.counters(portal.member_id)
    assert counters["refreshes"] == 1
    assert counters["violations"]["refresh_token_reuse"] == 0


def test_killed_after_rotation_holds_portal_with_reason_until_a_new_chain(
        make_portal, sandbox, spawn_callers, relay_factory):
    portal, _ = make_portal()
    _kill_mid_refresh(portal, sandbox, spawn_callers, relay_factory(forward=True))
    assert sandbox.counters(portal.member_id)["refreshes"] == 1  # rotated; answer lost

    with pytest.raises(PortalUnavailable) as exc_info:
        direct.call_method(service.get_portal(portal.member_id), "user.current")
    assert exc_info.value.status == PortalStatus.AUTH_FAILED.value
    row = reload_portal(portal.member_id)
    assert row.status == PortalStatus.AUTH_FAILED.value
    assert "refresh was interrupted" in row.status_reason
    assert "Open the app in Bitrix24 once as an administrator" in row.status_reason
    # exactly one spend of the dead token was tried, and held calls send nothing more
    assert sandbox.counters(portal.member_id)["violations"]["refresh_token_reuse"] == 1
    with pytest.raises(PortalUnavailable):
        direct.call_method(row, "user.current")
    assert sandbox.counters(portal.member_id)["violations"]["refresh_token_reuse"] == 1

    fresh = sandbox.issue_tokens(portal.member_id)  # the next admin iframe open
    service.store_new_chain(row, access_token=fresh["access_token"],
                            refresh_token=fresh["refresh_token"], expires_in=3600)
    assert direct.call_method(row, "user.current")["ID"] == "1"
    assert reload_portal(portal.member_id).status == PortalStatus.ACTIVE.value
