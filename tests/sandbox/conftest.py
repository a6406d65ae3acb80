"""Helpers for the sandbox's own tests: a portal, a REST caller, and a tiny stand-in app over real
HTTP.

The `sandbox_server` / `sandbox` fixtures come from sandbox.pytest_plugin (registered in
tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from sandbox import SandboxControl
from tests.conftest import StubHandler, StubServer

SECRET = "sandbox-secret"
USERS = [
    {"id": 1, "name": "Ada", "admin": True, "extension": "101"},
    {"id": 2, "name": "Bob", "admin": False, "extension": "102"},
    {"id": 3, "name": "Cy", "admin": False, "extension": "103", "active": False},
]


@dataclass
class Hit:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeApp:
    """A minimal HTTP app: records every request; /install answers an HTML page calling
    installFinish.
    """

    url: str = ""
    hits: list[Hit] = field(default_factory=list)
    status: int = 200
    install_html: str = (
        "<html><script src='bx24.js'></script>"
        "<script>BX24.init(function(){BX24.installFinish();});</script></html>"
    )

    def paths(self, prefix: str) -> list[Hit]:
        return [h for h in self.hits if h.path.startswith(prefix)]


@pytest.fixture
def fake_app() -> Iterator[FakeApp]:
    """A real HTTP server on loopback standing in for the app (events, installer, placements)."""
    state = FakeApp()

    class Handler(StubHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state.hits.append(Hit("POST", self.path, dict(self.headers), body))
            html = state.install_html if self.path.startswith("/install") else "<html>ok</html>"
            self.reply(state.status, html.encode(), "text/html; charset=utf-8")

        def do_GET(self) -> None:  # noqa: N802
            state.hits.append(Hit("GET", self.path, dict(self.headers), b""))
            # a recording's audio/* type, which attachRecord's RECORD_URL mode demands (§8.6)
            audio = {"mp3": "audio/mpeg", "wav": "audio/wav"}.get(self.path.rsplit(".", 1)[-1])
            self.reply(200, b"RIFF-fake-wav", audio)

    server = StubServer(Handler)
    state.url = server.url
    yield state
    server.close()


@pytest.fixture
def portal(sandbox: SandboxControl) -> dict[str, Any]:
    """A fresh standard portal with three users (admin 1, user 2, inactive 3)."""
    return sandbox.create_portal(users=USERS)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """A plain HTTP client that never follows redirects."""
    with httpx.Client(timeout=10, follow_redirects=False) as client:
        yield client


def call(
    http: httpx.Client, portal: dict[str, Any], method: str, token: str | None = None, **params: Any
) -> httpx.Response:
    """POST a JSON REST call to the portal."""
    body = {"auth": token or portal["access_token"], **params}
    return http.post(portal["client_endpoint"] + method, json=body)


def refresh(
    http: httpx.Client, sandbox: SandboxControl, refresh_token: str, secret: str = SECRET
) -> httpx.Response:
    """GET the token endpoint with a refresh grant."""
    return http.get(
        sandbox.base_url + "/oauth/token/",
        params={
            "grant_type": "refresh_token",
            "client_id": "app.sandbox",
            "client_secret": secret,
            "refresh_token": refresh_token,
        },
    )
