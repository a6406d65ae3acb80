"""Install tests: the app served on a real port, the sandbox portal calling it over HTTP.

``live_app`` runs the test app (its SQLite/PostgreSQL database, its Redis) with
werkzeug's threaded server, configured as ``make run`` configures it for the
sandbox: our client id/secret on the sandbox portal, the sandbox's auth server
trusted, the sandbox's stand-in BX24 library. ``APP_PUBLIC_URL`` is the live
URL, so every binding points back at this server.

Every test that builds its portal with ``make_portal`` or ``installed`` runs twice,
once per iframe POST form the sandbox portal sends (protocol §2.3): ``full``
(SERVER_ENDPOINT, APPLICATION_TOKEN, APPLICATION_SCOPE included, as the 2026 docs
list them) and ``short`` (without them, as real portals' iframe template and the
2023-2024 install POSTs).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from flask import Flask
from sqlalchemy import func, select
from werkzeug.serving import make_server

from app.extensions import db
from app.ingress import processing
from app.ingress.models import PENDING, InboxEvent
from app.tenants.models import Portal
from tests.conftest import wait_for

CLIENT_ID = "app.b24relay-test.0001"
CLIENT_SECRET = "b24relay-test-secret"
IFRAME_FORMS = ("full", "short")
USERS = [
    {"id": 1, "name": "Ada", "last_name": "Admin", "admin": True, "extension": "101"},
    {"id": 2, "name": "Bob", "admin": False, "extension": "102"},
    {"id": 3, "name": "Cy", "admin": False},
]


@dataclass
class LiveApp:
    """The app behind a real socket."""

    app: Flask
    url: str

    def http(self, **kwargs: Any) -> httpx.Client:
        """A client for this server (no redirects followed unless asked)."""
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def worker_env(self) -> dict[str, str]:
        """The extra settings a worker subprocess needs to talk to the sandbox."""
        return {k: str(self.app.config[k]) for k in
                ("B24_CLIENT_ID", "B24_CLIENT_SECRET", "B24_AUTH_SERVERS", "B24_JS_SDK_URL",
                 "APP_PUBLIC_URL")}


@pytest.fixture
def live_app(app: Flask, sandbox_server: Any) -> Iterator[LiveApp]:
    """The test app served on 127.0.0.1:<free port>, configured for the sandbox."""
    # The sandbox's auth server, with its scheme: the short iframe form names no
    # SERVER_ENDPOINT, and the first B24_AUTH_SERVERS entry is the one used then.
    cloud = urlsplit(sandbox_server.url)
    app.config.update(B24_CLIENT_ID=CLIENT_ID, B24_CLIENT_SECRET=CLIENT_SECRET,
                      B24_AUTH_SERVERS=f"{cloud.scheme}://{cloud.netloc}",
                      B24_JS_SDK_URL=f"{sandbox_server.url}/bx24.js")
    server = make_server("127.0.0.1", 0, app, threaded=True)
    url = f"http://127.0.0.1:{server.server_port}"
    app.config["APP_PUBLIC_URL"] = url
    thread = threading.Thread(target=server.serve_forever, name="live-app", daemon=True)
    thread.start()
    yield LiveApp(app, url)
    server.shutdown()
    thread.join(10)
    server.server_close()


@pytest.fixture(params=IFRAME_FORMS)
def form_kind(request: pytest.FixtureRequest) -> str:
    """The iframe POST form the sandbox portals send: each install test runs with both."""
    return str(request.param)


@pytest.fixture
def make_portal(sandbox: Any, live_app: LiveApp, form_kind: str) -> Any:
    """Factory: a sandbox portal registered for our client id, its app URL the live app."""

    def make(**extra: Any) -> dict[str, Any]:
        spec = {"users": USERS, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                "app_url": live_app.url, "iframe_form": form_kind, **extra}
        return sandbox.create_portal(**spec)

    return make


@pytest.fixture
def installed(sandbox: Any, make_portal: Any, live_app: LiveApp) -> dict[str, Any]:
    """A sandbox portal with the app installed: the installer POST, then installFinish.

    No browser runs the installer page's script here, so the explicit control call
    finishes the install in its place (tests/install/test_install_finish_browser.py
    shows the page doing it). installFinish sent ONAPPINSTALL (the installing admin's
    new chain and the application token, which the short form carries no other way);
    it is processed here as a worker would, so the portal ends in the same state with
    either form.
    """
    portal = make_portal()
    result = sandbox.install_app(portal["member_id"], live_app.url)
    assert result["status"] == 200 and result["install_pending"], result["body"]
    finished = sandbox.finish_install(portal["member_id"])
    assert [d["status"] for d in finished["onappinstall"]] == [200], finished["onappinstall"]
    process_queued("ONAPPINSTALL")
    wait_for(lambda: portal_row(portal["member_id"]).application_token
             == portal["application_token"], timeout=10)
    return {**portal, "install": result, "finish": finished}


def process_queued(event_type: str) -> list[str]:
    """Run the waiting inbox rows of ``event_type`` through inbox processing, as a worker would."""
    db.session.remove()
    rows = db.session.scalars(select(InboxEvent.id).where(
        InboxEvent.event_type == event_type, InboxEvent.status.in_(PENDING))).all()
    return [processing.process(row_id) for row_id in rows]


def portal_row(member_id: str) -> Portal | None:
    """The committed portal row, read afresh (the server thread wrote it)."""
    db.session.remove()
    return Portal.by_member_id(member_id)


def portal_count() -> int:
    """How many portal rows exist."""
    db.session.remove()
    return int(db.session.scalar(select(func.count(Portal.id))) or 0)


def iframe_form(opened: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """(url, form fields) of an iframe POST the sandbox made, to replay or tamper with."""
    return opened["url"], dict(parse_qsl(opened["form"], keep_blank_values=True))
