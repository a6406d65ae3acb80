"""The app against an https portal: the sandbox's TLS mode, trusted through ``B24_CA_BUNDLE``.

Every port of this module's sandbox speaks TLS with a certificate from a CA made when
it starts; iframe POSTs say ``PROTOCOL=1`` and every endpoint is https. The app trusts
that CA only because ``B24_CA_BUNDLE`` names it: without it, nothing the app would
store may come from those servers. Each test runs with both iframe forms (conftest).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from flask import Flask

from app.bitrix import errors
from app.config import ConfigError
from app.dispatcher import direct
from sandbox import SandboxServer
from tests.install.conftest import iframe_form, portal_count, portal_row


@pytest.fixture(scope="module")
def sandbox_server(https_sandbox_server: SandboxServer) -> SandboxServer:
    """This module's sandbox, in the https mode (it replaces the session's http one here)."""
    return https_sandbox_server



@pytest.fixture
def app(app: Flask, sandbox_server: SandboxServer) -> Flask:
    """The test app, trusting the sandbox's CA for every outgoing call."""
    app.config["B24_CA_BUNDLE"] = sandbox_server.ca_file
    return app


def _https(url: str | None) -> bool:
    return urlsplit(url or "").scheme == "https"


def test_install_refresh_and_rest_over_https(sandbox, installed, live_app):
    member_id = installed["member_id"]
    # The installer verified the token at the https auth server and asked user.admin over
    # https; ONAPPINSTALL was verified the same way (the fixture waited for its token).
    row = portal_row(member_id)
    assert row is not None and row.status == "active"
    assert _https(row.client_endpoint) and _https(row.server_endpoint)
    assert row.client_endpoint == installed["client_endpoint"]
    assert sandbox.log(member_id, method="event.bind")  # the setup calls reached the portal

    before = sandbox.counters(member_id)["refreshes"]
    old_refresh = row.refresh_token
    sandbox.expire_tokens(member_id)
    profile = direct.call_method(row, "profile")  # refresh at the https auth server, then REST
    assert profile["ADMIN"] is True
    assert sandbox.counters(member_id)["refreshes"] == before + 1
    assert portal_row(member_id).refresh_token != old_refresh


def test_pages_are_framed_by_the_https_portal(sandbox, installed, live_app):
    url, form = iframe_form(sandbox.open_placement(installed["member_id"]))
    assert dict(parse_qsl(urlsplit(url).query))["PROTOCOL"] == "1"
    resp = httpx.post(url, data=form, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Security-Policy"] == \
        f"frame-ancestors https://{installed['domain']}"


def test_without_the_ca_bundle_the_install_is_refused(sandbox, make_portal, live_app):
    live_app.app.config["B24_CA_BUNDLE"] = None  # httpx's default store: the CA is unknown
    portal = make_portal()
    result = sandbox.install_app(portal["member_id"], live_app.url)
    assert result["status"] == 502, result["body"]
    assert "untrusted TLS certificate" in result["body"]
    assert "installFinish" not in result["body"]  # the page won't finish the install
    assert portal_count() == 0  # no portal, no tokens
    assert sandbox.log(portal["member_id"]) == []  # nothing went to the portal either


def test_without_the_ca_bundle_no_refresh_is_spent(sandbox, installed, live_app):
    member_id = installed["member_id"]
    before: Any = portal_row(member_id)
    refreshes = sandbox.counters(member_id)["refreshes"]
    live_app.app.config["B24_CA_BUNDLE"] = None
    sandbox.expire_tokens(member_id)
    with pytest.raises(errors.TransportError, match="untrusted TLS certificate"):
        direct.call_method(before, "profile")
    after = portal_row(member_id)
    assert (after.refresh_token, after.token_version) == (before.refresh_token,
                                                         before.token_version)
    assert sandbox.counters(member_id)["refreshes"] == refreshes  # the chain was never spent


@pytest.mark.parametrize("content", [None, "not a certificate"], ids=["missing", "garbage"])
def test_a_ca_bundle_that_cannot_load_stops_the_app(make_app, tmp_path, content):
    bundle = tmp_path / "ca.pem"
    if content is not None:
        bundle.write_text(content)
    with pytest.raises(ConfigError, match="B24_CA_BUNDLE"):
        make_app(B24_CA_BUNDLE=str(bundle))
