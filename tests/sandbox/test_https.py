"""The sandbox's https mode: every port over TLS, a certificate only its own CA vouches for.

This module's sandbox is its own (``SandboxServer(tls=True)``), shared by its tests.
"""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from sandbox import SandboxServer
from sandbox.tls import client_context, make_certificates, server_context
from tests.conftest import StubHandler

from .conftest import USERS, call, refresh

VERIFY_FAILED = "CERTIFICATE_VERIFY_FAILED"


@pytest.fixture(scope="module")
def sandbox_server(https_sandbox_server: SandboxServer) -> SandboxServer:
    """This module's sandbox, in the https mode."""
    return https_sandbox_server



@pytest.fixture
def trusted(sandbox_server: SandboxServer) -> Iterator[httpx.Client]:
    """A client that trusts the sandbox's CA only."""
    with httpx.Client(verify=client_context(sandbox_server.ca_file), timeout=10) as client:
        yield client


def test_every_endpoint_is_https_and_the_ca_verifies_it(sandbox, trusted):
    portal = sandbox.create_portal(users=USERS)
    assert portal["protocol"] == 1
    for key in ("client_endpoint", "server_endpoint", "oauth_token_url"):
        assert urlsplit(portal[key]).scheme == "https", key
    profile = call(trusted, portal, "profile")  # a portal port
    assert profile.status_code == 200 and profile.json()["result"]["ADMIN"] is True
    pair = refresh(trusted, sandbox, portal["refresh_token"])  # the cloud port
    assert pair.status_code == 200
    assert urlsplit(pair.json()["client_endpoint"]).scheme == "https"


def test_the_certificate_names_localhost_too(sandbox_server, trusted):
    port = urlsplit(sandbox_server.url).port
    assert trusted.get(f"https://localhost:{port}/_sandbox/portals").status_code == 200


def test_a_client_without_the_ca_fails_verification(sandbox):
    portal = sandbox.create_portal(users=USERS)
    with httpx.Client(timeout=10) as default_store:
        for url in (portal["client_endpoint"] + "profile", portal["oauth_token_url"]):
            with pytest.raises(httpx.ConnectError, match=VERIFY_FAILED):
                default_store.post(url, json={"auth": portal["access_token"]})
    with pytest.raises(httpx.HTTPError):  # nor does a TLS port answer in clear text
        httpx.post(portal["client_endpoint"].replace("https:", "http:") + "profile", timeout=10)


def test_iframe_posts_say_protocol_1(sandbox, fake_app):
    portal = sandbox.create_portal(app_url=fake_app.url, users=USERS)
    result = sandbox.install_app(portal["member_id"])
    assert result["status"] == 200 and result["install_pending"]  # no script ran: pending
    hit = fake_app.paths("/install")[0]
    assert dict(parse_qsl(urlsplit(hit.path).query))["PROTOCOL"] == "1"
    assert dict(parse_qsl(hit.body.decode()))["SERVER_ENDPOINT"] == portal["server_endpoint"]


def test_a_renamed_portal_redirects_to_https(sandbox, trusted):
    portal = sandbox.create_portal(users=USERS)
    moved = sandbox.rename_portal(portal["member_id"])
    resp = call(trusted, portal, "profile")
    assert resp.status_code == 302
    assert resp.headers["location"] == moved["client_endpoint"] + "profile"
    assert moved["client_endpoint"].startswith("https://")


class _HttpsApp:
    """An app served over https with a certificate from a CA of its own (no one trusts it)."""

    def __init__(self, directory: Path) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(StubHandler):
            def do_POST(self) -> None:  # noqa: N802
                hits.append(self.path)
                self.reply(200, b"<html>BX24.installFinish()</html>", "text/html")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = server_context(make_certificates(directory))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def test_an_https_app_whose_certificate_is_not_trusted_gets_nothing(sandbox, tmp_path):
    app = _HttpsApp(tmp_path)
    try:
        portal = sandbox.create_portal(app_url=app.url, users=USERS)
        result = sandbox.install_app(portal["member_id"])
    finally:
        app.close()
    assert result["status"] is None and "certificate verify failed" in result["error"]
    assert not result["install_finished"] and app.hits == []


def test_the_ca_file_exists_while_the_server_runs():
    with SandboxServer(tls=True, latency=0) as server:
        assert server.ca_file and os.path.exists(server.ca_file)
        ca = ssl.create_default_context(cafile=server.ca_file)
        assert [c["subject"] for c in ca.get_ca_certs()]  # a CA certificate, loadable
        ca_file = server.ca_file
    assert not os.path.exists(ca_file)
