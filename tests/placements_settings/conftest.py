"""The settings and self-diagnosis pages over real HTTP: the live app, the sandbox portal that
opens them as its iframe, the test database and Redis (fixtures of tests/install/conftest.py).

Pages are read the way the portal's iframe reads them; helpers pull out the page session and
each form's single-use token, as a browser would post them.
"""

from __future__ import annotations

import html
import re
from typing import Any

import httpx
import pytest

from tests.install.conftest import (  # noqa: F401 - fixtures used by this directory's tests
    LiveApp,
    installed,
    live_app,
    make_portal,
)

ADMIN, EMPLOYEE = 1, 2


@pytest.fixture
def form_kind() -> str:
    """These pages read no iframe form field the two forms differ in: one form is enough."""
    return "full"


def session_of(body: str) -> str:
    """The page session a page's links carry (``s=``)."""
    match = re.search(r'[?&]s=([^&"]+)', body)
    assert match, body
    return html.unescape(match.group(1))


def form_token(body: str, form_id: str = "settings-form") -> str:
    """The single-use token of the form with id ``form_id``."""
    match = re.search(rf'<form [^>]*id="{form_id}".*?name="form_token" value="([^"]+)"', body,
                      re.S)
    assert match, (form_id, body)
    return match.group(1)


def open_page(sandbox: Any, member_id: str, user_id: int = ADMIN) -> str:
    """The settings page as the portal's iframe shows it to ``user_id``."""
    opened = sandbox.open_placement(member_id, user_id=user_id)
    assert opened["status"] == 200, opened["body"]
    return str(opened["body"])


def post(app_server: LiveApp, path: str, session: str | None, **form: str) -> httpx.Response:
    """A form post to one of the pages' endpoints, with the page session in its URL."""
    with app_server.http() as http:
        return http.post(path, params={"s": session} if session else None, data=form)


def install_another(sandbox: Any, new_portal: Any, app_server: LiveApp, **extra: Any
                    ) -> dict[str, Any]:
    """A second installed portal (installFinish as the installer page's script sends it)."""
    other = new_portal(**extra)
    assert sandbox.install_app(other["member_id"], app_server.url)["status"] == 200
    sandbox.finish_install(other["member_id"])
    return dict(other)
