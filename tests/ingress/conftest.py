"""Ingress test helpers: a portal with an application token, event delivery, inbox reads."""

from __future__ import annotations

import functools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, insert, select, text

from app.dispatcher.direct import call_method
from app.extensions import db
from app.ingress import auth, enqueuer
from app.ingress.formparse import encode_form
from app.ingress.models import InboxEvent
from app.tenants.models import Portal, PortalSettings, PortalStatus, utcnow
from tests.conftest import ROOT, WorkerProcess, child_env, wait_for


def make_portal(**overrides: Any) -> Portal:
    """An installed portal with a known application_token."""
    member_id = overrides.pop("member_id", uuid.uuid4().hex)
    portal = Portal(member_id=member_id, domain=f"{member_id[:8]}.bitrix24.test",
                    client_endpoint=f"https://{member_id[:8]}.bitrix24.test/rest/",
                    application_token=overrides.pop("application_token", secrets.token_hex(16)),
                    status=overrides.pop("status", PortalStatus.ACTIVE.value), **overrides)
    portal.settings = PortalSettings()
    db.session.add(portal)
    db.session.commit()
    return portal


def b24_body(member_id: str, token: str | None, event: str = "ONCRMDEALUPDATE",
             data: dict[str, Any] | None = None, ts: str = "1736405807",
             handler_id: str = "201") -> str:
    """A form body as Bitrix24 sends it (protocol §3.4)."""
    auth_block: dict[str, Any] = {"access_token": "s6p6eclrvim6da22", "expires": "1736409407",
                                  "domain": "x.bitrix24.test", "member_id": member_id,
                                  "user_id": "15"}
    if token is not None:
        auth_block["application_token"] = token
    return encode_form({"event": event, "event_handler_id": handler_id,
                        "data": data if data is not None else {"FIELDS": {"ID": "759"}},
                        "ts": ts, "auth": auth_block})


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


class Deliver:
    """Post events to the app like Bitrix24 or the PBX would."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def b24(self, portal: Portal, token: str | None = "", **kw: Any) -> Any:
        if token == "":
            token = portal.application_token
        return self.client.post("/b24/events", data=b24_body(portal.member_id, token, **kw),
                                headers=FORM)

    def pbx(self, key: str | None, body: Any) -> Any:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self.client.post("/api/v1/calls/events", json=body, headers=headers)


@pytest.fixture
def portal(app: Any) -> Portal:
    return make_portal()


@pytest.fixture
def deliver(client: Any) -> Deliver:
    return Deliver(client)


@pytest.fixture
def api_key(portal: Portal) -> str:
    return auth.issue_api_key(portal)


def add_inbox_row(status: str, portal: Portal | None = None, **values: Any) -> int:
    """Insert an inbox row as intake or a worker would have left it; returns its id.

    Without ``portal`` the row belongs to no portal (member_id ``m…``); ``values`` override
    any column (``event_type`` also names the payload's event).
    """
    event_type = values.pop("event_type", "TESTEFFECT")
    row = {"portal_id": portal.id if portal else None,
           "member_id": portal.member_id if portal else "m" * 32, "source": "b24",
           "event_type": event_type, "dedupe_key": uuid.uuid4().hex,
           "payload": {"event": event_type, "data": {}}, "unverified": False,
           "status": status, "attempts": 0, **values}
    row_id = db.session.execute(insert(InboxEvent).values(**row)
                                .returning(InboxEvent.id)).scalar_one()
    db.session.commit()
    return row_id


def inbox_count() -> int:
    db.session.rollback()
    return db.session.scalar(select(func.count()).select_from(InboxEvent)) or 0


def inbox_rows() -> list[InboxEvent]:
    db.session.rollback()
    return list(db.session.scalars(select(InboxEvent).order_by(InboxEvent.id)))


def queued_messages(redis_client: Any, app: Any, queue: str = "events") -> int:
    """Messages waiting in the Dramatiq Redis queue (nobody is consuming in these tests),
    once intake's enqueuer has sent what it holds."""
    assert enqueuer.drain(app)
    ns = app.config["DRAMATIQ_NAMESPACE"]
    return redis_client.llen(f"{ns}:{queue}")


def queued_rows(redis_client: Any, app: Any) -> list[int]:
    """The inbox rows the waiting event messages name (one message may name several)."""
    assert enqueuer.drain(app)
    ns = app.config["DRAMATIQ_NAMESPACE"]
    ids = redis_client.lrange(f"{ns}:events", 0, -1)
    rows: list[int] = []
    for raw in redis_client.hmget(f"{ns}:events.msgs", ids) if ids else []:
        named = json.loads(raw)["args"][0]
        rows.extend(named if isinstance(named, list) else [named])
    return sorted(rows)


EFFECTS_DDL = "CREATE TABLE ingress_test_effects (inbox_id INTEGER NOT NULL, pid INTEGER NOT NULL)"


@pytest.fixture
def effects(app: Any) -> Iterator[Callable[[], dict[int, int]]]:
    """The effects table the test handlers write; returns a reader {inbox_id: times}."""
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS ingress_test_effects"))
        conn.execute(text(EFFECTS_DDL))

    def read() -> dict[int, int]:
        db.session.rollback()
        rows = db.session.execute(text("SELECT inbox_id, COUNT(*) FROM ingress_test_effects "
                                       "GROUP BY inbox_id")).all()
        return {inbox_id: n for inbox_id, n in rows}

    yield read
    db.session.rollback()
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS ingress_test_effects"))


HANDLER_MODULES = ("workers", "tests.ingress.effect_handlers")


@pytest.fixture
def start_handler_worker(start_worker: Callable[..., WorkerProcess]
                         ) -> Callable[..., WorkerProcess]:
    """Factory: real worker processes with the app's actors plus the test handlers."""
    return functools.partial(start_worker, modules=HANDLER_MODULES)


def statuses() -> dict[str, int]:
    """Inbox rows per status."""
    db.session.rollback()
    rows = db.session.execute(select(InboxEvent.status, func.count())
                              .group_by(InboxEvent.status)).all()
    return {status: n for status, n in rows}


class Gunicorn:
    """The web tier as the Procfile starts it (gunicorn.conf.py), on a free loopback port."""

    def __init__(self, config: dict[str, Any], **extra_env: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = child_env(config, **{"BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": "1",
                                   "WEB_THREADS": "2", **extra_env})
        self.log = Path(config["INSTANCE_PATH"]) / f"gunicorn-{port}.log"
        self._log_fh = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT, env=env, stdout=self._log_fh, stderr=subprocess.STDOUT,
            start_new_session=True)
        wait_for(self._answers, timeout=30)

    def _answers(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text(errors="replace")
        try:
            return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """Stop gunicorn and its workers (their process group)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log_fh.close()


@pytest.fixture
def gunicorn(app: Any) -> Iterator[Gunicorn]:
    """The test app's database and Redis served by a real gunicorn."""
    server = Gunicorn(app.config)
    yield server
    server.stop()


def make_offline_portal(app: Any, sandbox: Any, event: str, client: tuple[str, str],
                   **portal_spec: Any) -> Any:
    """A sandbox portal, installed and finished, in offline mode, bound offline to ``event``."""
    client_id, client_secret = client
    app.config.update(B24_CLIENT_ID=client_id, B24_CLIENT_SECRET=client_secret)
    info = sandbox.create_portal(client_id=client_id, client_secret=client_secret, **portal_spec)
    sandbox.finish_install(info["member_id"])
    portal = Portal(member_id=info["member_id"], domain=info["domain"],
                    client_endpoint=info["client_endpoint"],
                    server_endpoint=info["server_endpoint"], access_token=info["access_token"],
                    refresh_token=info["refresh_token"],
                    expires_at=datetime.fromtimestamp(info["expires"], UTC), token_version=1,
                    status=PortalStatus.ACTIVE.value, installed_at=utcnow())
    portal.settings = PortalSettings(event_mode="offline")
    db.session.add(portal)
    db.session.commit()
    call_method(portal, "event.bind", {"event": event, "event_type": "offline"})
    return portal
