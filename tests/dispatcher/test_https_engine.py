"""The dispatcher against an https portal whose CA the app trusts through ``B24_CA_BUNDLE``
(the sandbox's TLS mode), as the direct calls in app/dispatcher/direct.py already do."""

from __future__ import annotations

import pytest
from flask import Flask

from app.dispatcher import submit
from app.extensions import db
from sandbox import SandboxServer
from tests.dispatcher.conftest import settled


@pytest.fixture(scope="module")
def sandbox_server(https_sandbox_server: SandboxServer) -> SandboxServer:
    """This module's sandbox, in the https mode (it replaces the session's http one here)."""
    return https_sandbox_server



@pytest.fixture
def app(app: Flask, sandbox_server: SandboxServer) -> Flask:
    """The test app, trusting the sandbox's CA for every outgoing call."""
    app.config["B24_CA_BUNDLE"] = sandbox_server.ca_file
    return app


def test_engine_sends_to_an_https_portal_trusted_through_the_ca_bundle(
        make_portal, sandbox, start_engine):
    portal, info = make_portal()
    assert portal.client_endpoint.startswith("https://")
    start_engine(DISPATCH_LINGER_MS="0")
    command = submit(portal.id, "crm.contact.list", {"filter": {"ID": 1}})
    db.session.commit()
    (row,) = settled(portal.id, 1, timeout=5)
    assert row.id == command and row.status == "done", row.error
    assert len(sandbox.log(info["member_id"])) == 1
