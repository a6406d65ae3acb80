"""Tenants test helpers: the app with OAuth credentials and a portal living in the sandbox."""

from __future__ import annotations

from typing import Any

import pytest

from app.extensions import db
from app.tenants.models import Portal, PortalStatus, utcnow

CLIENT_ID = "app.t1test"
CLIENT_SECRET = "t1-secret"


@pytest.fixture
def oauth_app(app: Any) -> Any:
    """The test app, registered with the sandbox as CLIENT_ID/CLIENT_SECRET."""
    app.config.update(B24_CLIENT_ID=CLIENT_ID, B24_CLIENT_SECRET=CLIENT_SECRET)
    return app


@pytest.fixture
def make_portal(oauth_app: Any, sandbox: Any) -> Any:
    """Factory: a sandbox portal plus its Portal row holding the admin's first chain."""

    def make(plan: str = "standard", bucket: dict[str, float] | None = None,
             **columns: Any) -> tuple[Portal, dict[str, Any]]:
        extra = {"bucket": bucket} if bucket else {}
        info = sandbox.create_portal(plan=plan, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                                     **extra)
        portal = Portal(member_id=info["member_id"], domain=info["domain"],
                        client_endpoint=info["client_endpoint"],
                        server_endpoint=info["server_endpoint"],
                        access_token=info["access_token"], refresh_token=info["refresh_token"],
                        expires_at=utcnow().replace(microsecond=0).fromtimestamp(
                            info["expires"], utcnow().tzinfo),
                        token_version=1, status=PortalStatus.ACTIVE.value,
                        installed_at=utcnow(), **columns)
        db.session.add(portal)
        db.session.commit()
        return portal, info

    return make
