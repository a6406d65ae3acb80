"""The extension map is refreshed on ONUSERADD and by the periodic user sync, and inactive
users leave it (issue 22 point 5, protocol §8.10: no user-update event exists, and
register/finish reject inactive users).

Real HTTP: the sandbox portal delivers ONUSERADD to the live app; a real worker runs the
inbox handler, the sync actor, the dispatcher and the outcome handlers.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import delete, update

from app.extensions import db
from app.queue import enqueue
from app.tenants.users import PortalUser, extension_map, set_override
from tests.conftest import wait_for
from tests.install.conftest import LiveApp, portal_row, process_queued
from tests.install.test_events import engines_listening

pytestmark = pytest.mark.timeout(180)

USERS = [{"id": 1, "name": "Ada", "admin": True, "extension": "101"},
         {"id": 2, "name": "Bob", "extension": "102"},
         {"id": 3, "name": "Cy", "extension": "103"},
         {"id": 4, "name": "Dee", "extension": "104", "active": False}]
CURRENT = {"101": 1, "102": 2, "103": 3}


@pytest.fixture
def portal(sandbox: Any, make_portal: Any, live_app: LiveApp, start_worker: Any,
           redis_client: Any) -> dict[str, Any]:
    """A portal with the app installed (its users synced at install) and a listening worker."""
    info = make_portal(users=USERS)
    member = info["member_id"]
    assert sandbox.install_app(member, live_app.url)["status"] == 200
    sandbox.finish_install(member)
    process_queued("ONAPPINSTALL")
    wait_for(lambda: portal_row(member).application_token, timeout=10)
    start_worker(threads=2, DISPATCH_SWEEP_INTERVAL="1", DISPATCH_LINGER_MS="0",
                 **live_app.worker_env())
    wait_for(lambda: engines_listening(redis_client), timeout=30)
    return info


def _map(member_id: str) -> dict[str, int]:
    return extension_map(portal_row(member_id))


def test_install_maps_active_users_only(portal):
    assert _map(portal["member_id"]) == CURRENT


def test_onuseradd_brings_the_new_users_extension(portal, sandbox):
    member = portal["member_id"]
    row = portal_row(member)
    # Cy as before the install's sync could see them: not in the map yet.
    db.session.execute(delete(PortalUser).where(PortalUser.portal_id == row.id,
                                                PortalUser.user_id == 3))
    db.session.commit()
    assert "103" not in _map(member)
    assert sandbox.trigger_event(member, "ONUSERADD", {"FIELDS": {"ID": "3"}})["statuses"] == [200]
    wait_for(lambda: _map(member) == CURRENT, timeout=60)


def test_the_periodic_sync_refreshes_extensions_and_drops_inactive_users(portal):
    member = portal["member_id"]
    row = portal_row(member)
    # A stale map: Bob's old extension, Dee still active (deactivated since the last sync).
    db.session.execute(update(PortalUser).where(PortalUser.portal_id == row.id,
                                                PortalUser.user_id == 2).values(extension="199"))
    db.session.execute(update(PortalUser).where(PortalUser.portal_id == row.id,
                                                PortalUser.user_id == 4).values(active=True))
    set_override(row, "20004", 4)
    db.session.commit()
    portal_id = row.id
    assert _map(member) == {"101": 1, "199": 2, "103": 3, "104": 4, "20004": 4}
    enqueue("sync_portal_users", portal_id)  # what the periodic job sends for each portal
    wait_for(lambda: _map(member) == CURRENT, timeout=60)
