"""Dashboard test helpers: sandbox portals with their rows and a dispatcher engine in this
process (the dispatcher's and the tenants' fixtures), and a page session for a portal."""

from __future__ import annotations

from typing import Any

from tests.dispatcher.conftest import start_engine  # noqa: F401 - fixture
from tests.tenants.conftest import make_portal, oauth_app  # noqa: F401 - fixtures


def session_for(portal: Any, user_id: int = 1, is_admin: bool = True, lang: str = "en") -> str:
    """A page-session token, as the verified iframe POST would have issued it."""
    from placements import page_session

    return page_session.issue(portal, user_id, is_admin, lang)
