"""A user sync whose read dies says so (issue 20, point 3): the dead ``user.get`` page's
outcome reaches the sync's own handler, which leaves the sync failed with Bitrix24's
error, shown by ``flask portals show``; a later sync that succeeds clears it.

Real worker (its engine and its settle actor), real sandbox portal over loopback.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from app.dispatcher import nudge
from app.extensions import db
from app.installation import upkeep
from app.tenants.models import Portal
from app.tenants.users import PortalUser
from tests.conftest import wait_for
from tests.tenants.conftest import reload_portal

pytestmark = pytest.mark.timeout(120)


def _sync_reaches(member_id: str, status: str) -> Portal | None:
    portal = reload_portal(member_id)
    return portal if portal is not None and portal.users_sync_status == status else None


def _show(app: Any, member_id: str) -> str:
    result = app.test_cli_runner().invoke(args=["portals", "show", member_id])
    assert result.exit_code == 0, result.output
    return result.output


def _users(portal_id: int) -> int:
    db.session.rollback()
    return int(db.session.scalar(select(func.count(PortalUser.id))
                                 .where(PortalUser.portal_id == portal_id)) or 0)


def test_a_dead_user_sync_read_leaves_the_sync_failed_and_shown(
        oauth_app, make_portal, sandbox, start_worker, redis_client):
    portal, info = make_portal()
    member = info["member_id"]
    sandbox.set_fault(member, "http_500")  # every request fails until cleared
    # No retry horizon: the first failure is final, so the read dies at once.
    start_worker(threads=2, periodic=True, DISPATCH_SWEEP_INTERVAL="1",
                 DISPATCH_RETRY_HORIZON_HOURS="0")
    wait_for(lambda: redis_client.pubsub_numsub(nudge.channel(redis_client))[0][1] >= 1,
             timeout=30)

    upkeep.submit_user_sync(portal)
    db.session.commit()
    assert reload_portal(member).users_sync_status == "running"
    failed = wait_for(lambda: _sync_reaches(member, "failed"), timeout=60)
    assert "INTERNAL_SERVER_ERROR" in (failed.users_sync_error or "")
    assert failed.users_sync_error.startswith("user.get dead")
    shown = _show(oauth_app, member)
    assert "users sync:" in shown and "failed" in shown
    assert "INTERNAL_SERVER_ERROR" in shown
    assert _users(portal.id) == 0

    sandbox.clear_faults(member)
    upkeep.submit_user_sync(reload_portal(member))
    db.session.commit()
    done = wait_for(lambda: _sync_reaches(member, "done"), timeout=60)
    assert done.users_sync_error is None
    assert _users(portal.id) >= 1
    lines = dict(line.split(":", 1) for line in _show(oauth_app, member).splitlines())
    assert lines["users sync error"].strip() == "-" and lines["users sync"].split()[0] == "done"
