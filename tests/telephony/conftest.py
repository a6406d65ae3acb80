"""Telephony test helpers: PBX events for one call, a sandbox portal and its row, a worker."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from app.dispatcher import nudge
from app.extensions import db
from app.tenants.models import Portal, PortalSettings, PortalStatus, utcnow
from app.tenants.users import PortalUser
from tests.conftest import wait_for

AT = "2026-11-22T16:40:{:02d}+03:00"


def pbx(call_id: str, kind: str, second: int, **fields: Any) -> dict[str, Any]:
    """One PBX call event as PBX_EVENTS.md describes it."""
    return {"call_id": call_id, "event": kind, "at": AT.format(second), **fields}


def map_extensions(portal: Portal, extensions: dict[str, int]) -> None:
    """The portal's users with these inner numbers, as the user sync stores them."""
    db.session.add_all(PortalUser(portal_id=portal.id, user_id=user, name=f"User {user}",
                                  extension=ext, active=True)
                       for ext, user in extensions.items())
    db.session.commit()


def employees(extensions: dict[str, int]) -> list[dict[str, Any]]:
    """Sandbox users for an extension map (the lowest user id is the admin)."""
    admin = min(extensions.values())
    return [{"id": user, "name": f"User {user}", "admin": user == admin, "extension": ext}
            for ext, user in extensions.items()]


def sandbox_line(sandbox: Any, users: list[dict[str, Any]], mapped: dict[str, int],
                fallback: int | None = None) -> tuple[Portal, dict[str, Any]]:
    """A sandbox portal with ``users``, the app's Portal row for it (its token chain, the
    fallback user) and the extension map ``mapped``, as an install would leave them."""
    from tests.tenants.conftest import CLIENT_ID, CLIENT_SECRET

    info = sandbox.create_portal(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, users=users)
    portal = Portal(member_id=info["member_id"], domain=info["domain"],
                    client_endpoint=info["client_endpoint"],
                    server_endpoint=info["server_endpoint"], access_token=info["access_token"],
                    refresh_token=info["refresh_token"],
                    expires_at=datetime.fromtimestamp(info["expires"], UTC), token_version=1,
                    status=PortalStatus.ACTIVE.value, installed_at=utcnow())
    portal.settings = PortalSettings(crm_create=False, default_user_id=fallback)
    db.session.add(portal)
    db.session.commit()
    map_extensions(portal, mapped)
    return portal, info


def dispatching_worker(start_worker: Any, redis_client: Any, **env: str) -> None:
    """A real worker (4 threads, periodic jobs) whose dispatcher listens for nudges."""
    env = {"DISPATCH_SWEEP_INTERVAL": "1", "DISPATCH_LINGER_MS": "0", **env}
    start_worker(threads=4, periodic=True, **env)
    wait_for(lambda: redis_client.pubsub_numsub(nudge.channel(redis_client))[0][1] >= 1,
             timeout=30)


def poster(client: Any, key: str) -> Callable[..., None]:
    """Post PBX events with the portal's API key, one request each, each after the previous
    one's 202 (PBX_EVENTS.md's order rule)."""

    def post(*events: dict[str, Any]) -> None:
        for event in events:
            response = client.post("/api/v1/calls/events", json=event,
                                   headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 202, response.get_data(as_text=True)

    return post
