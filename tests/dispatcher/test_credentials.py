"""Credentials snapshots: read without a Flask context, refreshed once for many coroutines, held
portals reported, renames stored; against the sandbox portal and the real database."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
from datetime import UTC, datetime
from typing import Any

import flask
import pytest

from app.bitrix import AsyncRestClient
from app.dispatcher.credentials import CredentialStore, Snapshot
from app.extensions import db
from app.tenants.models import Portal, PortalStatus

CLIENT_ID, CLIENT_SECRET = "app.d2creds", "d2-secret"


class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    """A real thread pool that counts the jobs it was given."""

    def __init__(self) -> None:
        super().__init__(max_workers=8)
        self.submitted = 0

    def submit(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        self.submitted += 1
        return super().submit(*args, **kwargs)


@pytest.fixture
def portal(app: Any, sandbox: Any) -> tuple[Portal, dict[str, Any]]:
    """A standard sandbox portal and its Portal row (encrypted tokens, version 1)."""
    app.config.update(B24_CLIENT_ID=CLIENT_ID, B24_CLIENT_SECRET=CLIENT_SECRET)
    info = sandbox.create_portal(client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                                 bucket={"drain": 100, "burst": 1000})
    row = Portal(member_id=info["member_id"], domain=info["domain"],
                 client_endpoint=info["client_endpoint"],
                 server_endpoint=info["server_endpoint"], access_token=info["access_token"],
                 refresh_token=info["refresh_token"],
                 expires_at=datetime.fromtimestamp(info["expires"], UTC), token_version=1,
                 status=PortalStatus.ACTIVE.value)
    row.set_plan("enterprise")
    db.session.add(row)
    db.session.commit()
    return row, info


@pytest.fixture
def store(app: Any) -> Any:
    made = CredentialStore(app, CountingExecutor())
    yield made
    made.executor.shutdown(wait=True)


def outside_flask(work: Any) -> Any:
    """Run ``work`` in a fresh thread, where no Flask context exists; return its result."""
    out: dict[str, Any] = {}

    def run() -> None:
        out["context"] = flask.has_app_context()
        try:
            out["value"] = work()
        except BaseException as exc:  # handed back to the test
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert out["context"] is False
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_snapshot_is_read_and_decrypted_without_an_app_context(portal, store):
    row, info = portal
    pid, expires = row.id, datetime.fromtimestamp(info["expires"], UTC)
    snap = outside_flask(lambda: store.load(pid))
    assert snap == Snapshot(pid, info["member_id"], info["client_endpoint"],
                            info["access_token"], 1, expires, "active", "enterprise")
    assert not snap.held and not snap.expired
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.access_token = "x"  # type: ignore[misc]
    assert outside_flask(lambda: asyncio.run(store.aload(pid))) == snap
    with pytest.raises(LookupError):
        store.load(pid + 1000)


def test_concurrent_refreshes_share_one(portal, store, sandbox):
    row, info = portal
    sandbox.expire_tokens(info["member_id"])
    stale = store.load(row.id)

    async def main() -> tuple[list[Snapshot], dict[str, Any]]:
        fresh = await asyncio.gather(*(store.refreshed(stale) for _ in range(20)))
        rest = AsyncRestClient()
        try:
            body = await rest.call(fresh[0].client_endpoint, "user.current", None,
                                   fresh[0].access_token or "")
        finally:
            await rest.aclose()
        return fresh, body

    fresh, body = outside_flask(lambda: asyncio.run(main()))
    assert len(set(fresh)) == 1 and fresh[0].token_version == 2
    assert fresh[0].access_token != stale.access_token and body["result"]["ID"] == "1"
    assert sandbox.counters(info["member_id"])["refreshes"] == 1
    assert store.executor.submitted == 1  # one thread did it for all twenty


def test_refresh_that_loses_the_chain_returns_a_held_snapshot(portal, store, sandbox):
    row, info = portal
    row.refresh_token = "spent-elsewhere"  # a refresh token Bitrix24 answers invalid_grant to
    db.session.commit()
    snap = asyncio.run(store.refreshed(store.load(row.id)))
    assert snap.held and snap.status == PortalStatus.AUTH_FAILED.value


def test_refresh_of_an_uninstalled_app_returns_a_held_snapshot(portal, store, sandbox):
    row, info = portal
    sandbox.uninstall_app(info["member_id"])
    snap = asyncio.run(store.refreshed(store.load(row.id)))
    assert snap.held and snap.status == PortalStatus.UNINSTALLED.value


def test_a_renamed_portal_is_stored_and_the_snapshot_follows(portal, store, sandbox):
    row, info = portal
    new = sandbox.rename_portal(info["member_id"])["client_endpoint"]
    snap = asyncio.run(store.moved(store.load(row.id), new))
    assert snap.client_endpoint == new and store.load(row.id) == snap
    db.session.expire_all()
    assert db.session.get(Portal, row.id).domain == new.split("/")[2]
