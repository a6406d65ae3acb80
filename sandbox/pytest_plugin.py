"""pytest fixtures: `sandbox_server` (session) and `sandbox` (a SandboxControl; state reset after
each test). A module that overrides `sandbox_server` with an https-mode server gets a `sandbox`
that trusts its CA.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .client import SandboxControl
from .server import SandboxServer


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxServer]:
    """One sandbox cloud for the whole session, on a free loopback port.

    Tests ask for zero latency explicitly (the sandbox's own default is realistic, 50-600 ms
    a request); events keep the test-friendly default: no delay, in order.
    """
    server = SandboxServer(latency=0).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def https_sandbox_server() -> Iterator[SandboxServer]:
    """A module's own sandbox in the https mode, without latency; a module that tests the https
    path returns it from its own ``sandbox_server`` override."""
    server = SandboxServer(tls=True, latency=0).start()
    yield server
    server.stop()


@pytest.fixture
def sandbox(sandbox_server: SandboxServer) -> Iterator[SandboxControl]:
    """A control client; every portal and setting is wiped after the test."""
    control = SandboxControl(sandbox_server.url, ca_file=sandbox_server.ca_file)
    yield control
    control.reset()
    control.close()
