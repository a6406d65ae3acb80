"""Tenants test helpers: the app with OAuth credentials and a portal living in the sandbox."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.extensions import db
from app.tenants import service
from app.tenants.models import Portal, PortalStatus, utcnow
from tests.conftest import ROOT, StubHandler, StubServer, child_env

CLIENT_ID = "app.t1test"
CLIENT_SECRET = "t1-secret"


@pytest.fixture
def oauth_app(app: Any) -> Any:
    """The test app, registered with the sandbox as CLIENT_ID/CLIENT_SECRET."""
    app.config.update(B24_CLIENT_ID=CLIENT_ID, B24_CLIENT_SECRET=CLIENT_SECRET)
    return app


@pytest.fixture
def make_portal(oauth_app: Any, sandbox: Any) -> Any:
    """Factory: a sandbox portal plus its Portal row holding the admin's first chain."""

    def make(plan: str = "standard", bucket: dict[str, float] | None = None,
             scope: str | None = None, **columns: Any) -> tuple[Portal, dict[str, Any]]:
        extra: dict[str, Any] = {"bucket": bucket} if bucket else {}
        if scope:
            extra["scope"] = scope
        info = sandbox.create_portal(plan=plan, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                                     **extra)
        fields = {"member_id": info["member_id"], "domain": info["domain"],
                  "client_endpoint": info["client_endpoint"],
                  "server_endpoint": info["server_endpoint"],
                  "access_token": info["access_token"], "refresh_token": info["refresh_token"],
                  "expires_at": datetime.fromtimestamp(info["expires"], UTC),
                  "token_version": 1, "status": PortalStatus.ACTIVE.value,
                  "installed_at": utcnow(), **columns}
        portal = Portal(**fields)
        portal.set_plan(plan)  # the row's plan and rate limit, as the sandbox portal's
        db.session.add(portal)
        db.session.commit()
        return portal, info

    return make


def reload_portal(member_id: str) -> Portal | None:
    """The portal row as committed now: the session's copies are expired, then looked up."""
    db.session.expire_all()
    return service.get_portal(member_id)


class CallerProcess:
    """A real app process (tests/tenants/caller_proc.py) calling one portal from N threads."""

    def __init__(self, env: dict[str, str], member_id: str, threads: int, log: Path) -> None:
        self.log = log
        self._log_fh = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.tenants.caller_proc", member_id, str(threads)],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log_fh, text=True)

    def wait_ready(self) -> None:
        """Block until every thread has loaded the portal and waits for `go`."""
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        assert line.strip() == "READY", self.log.read_text()

    def go(self) -> None:
        """Release the threads."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def report(self) -> dict[str, Any]:
        """The JSON summary the process prints when every thread is done."""
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        assert line, self.log.read_text()
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()
        self._log_fh.close()


@pytest.fixture
def spawn_callers(oauth_app: Any, tmp_path: Path) -> Iterator[Any]:
    """Factory: start caller processes for a portal; all are killed after the test."""
    started: list[CallerProcess] = []

    def spawn(member_id: str, threads: int = 1, **env: str) -> CallerProcess:
        proc = CallerProcess(child_env(oauth_app.config, **env), member_id, threads,
                             tmp_path / f"caller-{len(started)}.log")
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        proc.close()


class TokenRelay:
    """A token endpoint in front of the sandbox's that parks each request at a chosen point.

    ``forward=True``: pass the request on (the chain rotates), then hold the answer
    until ``release`` and drop it. ``forward=False``: hold the request, never pass it
    on. ``forward="after_release"``: hold the request, pass it on once released and
    answer normally.
    """

    def __init__(self, upstream: str, forward: bool | str) -> None:
        self.upstream, self.forward = upstream, forward
        self.arrived, self.rotated, self.release = (threading.Event(), threading.Event(),
                                                    threading.Event())
        relay = self

        class Handler(StubHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                relay.arrived.set()
                if relay.forward == "after_release":
                    relay.release.wait(30)
                if relay.forward:
                    query = self.path.split("?", 1)[1]
                    answer = httpx.get(f"{relay.upstream}?{query}", timeout=10)
                    relay.rotated.set()
                if relay.forward == "after_release":
                    self.reply(answer.status_code, answer.content, "application/json")
                    return
                relay.release.wait(30)
                self.close_connection = True

        self.server = StubServer(Handler)
        self.url = f"{self.server.url}/oauth/token/"

    def close(self) -> None:
        self.release.set()
        self.server.close()


@pytest.fixture
def relay_factory(sandbox: Any) -> Iterator[Any]:
    """Factory: TokenRelays in front of the sandbox's token endpoint, closed after the test."""
    made: list[TokenRelay] = []

    def make(forward: bool | str) -> TokenRelay:
        relay = TokenRelay(f"{sandbox.base_url}/oauth/token/", forward)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.close()
