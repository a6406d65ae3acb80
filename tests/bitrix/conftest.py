"""The Bitrix24 client on its own: a sandbox portal, a RestClient, no Flask, no database."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from app.bitrix import OAuthClient, RestClient

CLIENT_ID, CLIENT_SECRET = "app.libtest", "lib-secret"


@pytest.fixture
def portal(sandbox: Any) -> dict[str, Any]:
    """A sandbox portal with a big bucket; includes the admin's first token pair."""
    return sandbox.create_portal(client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                                 bucket={"drain": 100, "burst": 1000})


@pytest.fixture
def rest() -> Iterator[RestClient]:
    client = RestClient()
    yield client
    client.close()


@pytest.fixture
def oauth() -> OAuthClient:
    return OAuthClient(CLIENT_ID, CLIENT_SECRET)
