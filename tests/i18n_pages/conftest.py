"""Pages in the reader's language: a sandbox portal whose users read it in Russian or English
(the sandbox puts each user's language into the iframe's LANG, as Bitrix24 does).

The install suite's fixtures (a live app, the sandbox portal calling it over HTTP); one iframe
form: what language a page speaks does not depend on it.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.install.conftest import (  # noqa: F401 - fixtures used by this directory's tests
    LiveApp,
    live_app,
    make_portal,
)

ADA, BORIS, VERA = 1, 2, 3  # an English admin, a Russian admin, a Russian employee
USERS = [
    {"id": ADA, "name": "Ada", "last_name": "Admin", "admin": True, "extension": "101"},
    {"id": BORIS, "name": "Борис", "admin": True, "extension": "102", "lang": "ru"},
    {"id": VERA, "name": "Вера", "admin": False, "extension": "103", "lang": "ru"},
]


@pytest.fixture
def form_kind() -> str:
    """The language of a page does not depend on the iframe form: one form is enough."""
    return "full"


@pytest.fixture
def portal(sandbox: Any, make_portal: Any, live_app: LiveApp) -> str:  # noqa: F811
    """An installed portal (installed by the English admin): its member_id."""
    made = make_portal(users=USERS)
    assert sandbox.install_app(made["member_id"], live_app.url)["status"] == 200
    sandbox.finish_install(made["member_id"])
    return str(made["member_id"])


def open_as(sandbox: Any, member_id: str, user_id: int) -> dict[str, Any]:
    """The settings page as the portal's iframe shows it to ``user_id`` (in their LANG)."""
    return dict(sandbox.open_placement(member_id, user_id=user_id))
