"""Credentials snapshots for the dispatcher: no ORM objects, no Flask context, no blocked loop.

A ``Snapshot`` is an immutable copy of what a request to one portal needs, read with SQL Core
through the app's engine and decrypted with the app's cipher, both captured when the
``CredentialStore`` is built: any thread can ``load`` one. Everything that touches the
database runs in an executor, so the event loop never waits on it.

``refreshed`` runs the existing single-flight refresh (``app.tenants.tokens.refresh``: a
Redis lock across processes and hosts, re-read after the lock, compare-and-set on
``token_version``) in the executor inside an app context. Inside one process, concurrent
callers for the same (portal, token_version) share one future, so N batches that meet
``expired_token`` together cost one executor thread and at most one refresh. A refresh that
leaves the portal held (``invalid_grant``, ``NOT_INSTALLED``...) returns a snapshot whose
``held`` is True instead of raising; a transport failure or an unclassified error of the auth
server still raises. A store belongs to one event loop (its shared futures do).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
from datetime import datetime
from typing import Any

import redis
import redis.asyncio
from cryptography.fernet import MultiFernet
from flask import Flask
from sqlalchemy import String, select, type_coerce, update

from app.crypto import fernet_from
from app.extensions import db
from app.tenants import tokens
from app.tenants.models import Portal, PortalSettings, aware, utcnow
from app.tenants.status import HELD, PortalUnavailable

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One portal's endpoint, token and status as committed when it was read."""

    portal_id: int
    member_id: str
    client_endpoint: str
    access_token: str | None
    token_version: int
    expires_at: datetime | None
    status: str
    plan: str
    # The portal's dispatcher limits (its settings; None: the app's rule): K and sequential
    # mode. They ride with the snapshot, so a batch costs no query for them; a settings save
    # tells the engines (``limits_changed``) and the portal's driver reads them again.
    max_inflight: int | None = None
    sequential: bool | None = None

    @property
    def held(self) -> bool:
        """The portal status machine holds this portal's calls (nothing may be sent)."""
        return self.status in HELD

    @property
    def expired(self) -> bool:
        """The stored expiry has passed: refresh before sending rather than after a 401."""
        return self.expires_at is not None and self.expires_at <= utcnow()

    @classmethod
    def of(cls, portal: Portal) -> Snapshot:
        """From an in-memory portal row (a direct call's; no query unless it is expired)."""
        return cls(portal.id, portal.member_id, portal.client_endpoint, portal.access_token,
                   portal.token_version or 0, aware(portal.expires_at), portal.status,
                   portal.plan or "standard")


def endpoint_values(client_endpoint: str) -> dict[str, Any]:
    """The columns a rename (302 to a new host) changes: the endpoint and its domain."""
    domain = client_endpoint.split("://", 1)[-1].split("/", 1)[0]
    return {"client_endpoint": client_endpoint, "domain": domain}


_COLUMNS = (Portal.id, Portal.member_id, Portal.client_endpoint,
            type_coerce(Portal.access_token, String),  # ciphertext: we decrypt it ourselves
            Portal.token_version, Portal.expires_at, Portal.status, Portal.plan,
            PortalSettings.max_batches_in_flight, PortalSettings.sequential)
LIMITS_CHANNEL = "b24relay:dispatch:limits"


def limits_channel(client: redis.Redis | redis.asyncio.Redis) -> str:
    """The channel a portal's new dispatcher limits are announced on (per Redis database,
    as the nudges' channel is: ``app.dispatcher.nudge.channel``)."""
    return f"{LIMITS_CHANNEL}:{client.connection_pool.connection_kwargs.get('db', 0) or 0}"


def limits_changed(client: redis.Redis, portal_id: int) -> None:
    """Tell every engine that ``portal_id``'s dispatcher limits changed (after the commit):
    its driver, if one runs, reads them again before its next round. Never raises: a lost
    message costs at most ``LIMITS_MAX_AGE`` seconds (a driver reads them that often)."""
    try:
        client.publish(limits_channel(client), str(int(portal_id)))
    except redis.RedisError as exc:
        log.warning("portal %s: new dispatcher limits not announced (%s); drivers read them "
                    "within %s s", portal_id, exc, LIMITS_MAX_AGE)


LIMITS_MAX_AGE = 10.0  # seconds a driving portal's limits are kept without a message


class CredentialStore:
    """Loads snapshots and refreshes them for async code; built once per engine (event loop)."""

    def __init__(self, app: Flask,
                 executor: concurrent.futures.Executor | None = None) -> None:
        self.app = app
        with app.app_context():
            self.engine = db.engine
        self.cipher: MultiFernet = fernet_from(app.config["TOKEN_ENCRYPTION_KEY"])
        self._own_executor = executor is None
        self.executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="b24relay-credentials")
        self._refreshing: dict[tuple[int, int], asyncio.Future[Snapshot]] = {}

    def close(self) -> None:
        """Shut down the executor if the store made it."""
        if self._own_executor:
            self.executor.shutdown(wait=True)

    def load(self, portal_id: int) -> Snapshot:
        """The portal's committed credentials (sync; no app context needed). LookupError if gone."""
        with self.engine.connect() as conn:
            row = conn.execute(select(*_COLUMNS).outerjoin(
                PortalSettings, PortalSettings.portal_id == Portal.id)
                .where(Portal.id == portal_id)).first()
        if row is None:
            raise LookupError(f"portal {portal_id} does not exist")
        pid, member_id, endpoint, secret, version, expires_at, status, plan, k, seq = row
        token = self.cipher.decrypt(secret.encode()).decode() if secret else None
        return Snapshot(pid, member_id, endpoint, token, version or 0, aware(expires_at),
                        status, plan or "standard", k, seq)

    async def aload(self, portal_id: int) -> Snapshot:
        """``load`` in the executor."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.load,
                                                                portal_id)

    async def refreshed(self, snap: Snapshot) -> Snapshot:
        """New credentials after ``expired_token``: one shared single-flight refresh."""
        key = (snap.portal_id, snap.token_version)
        future = self._refreshing.get(key)
        if future is None:
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self.executor, self._refresh, *key)
            self._refreshing[key] = future
            future.add_done_callback(lambda done: self._settle(key, done))
        return await asyncio.shield(future)

    def _settle(self, key: tuple[int, int], done: asyncio.Future[Snapshot]) -> None:
        self._refreshing.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved here too: every awaiter may have gone

    def _refresh(self, portal_id: int, seen_version: int) -> Snapshot:
        with self.app.app_context():
            try:
                portal = db.session.get(Portal, portal_id)
                if portal is None:
                    raise LookupError(f"portal {portal_id} does not exist")
                tokens.refresh(portal, seen_version)
            except PortalUnavailable as exc:
                log.warning("refresh left the portal held: %s", exc)
            finally:
                db.session.remove()
        return self.load(portal_id)

    async def moved(self, snap: Snapshot, client_endpoint: str) -> Snapshot:
        """The portal was renamed (302): store its new endpoint and domain, return the snapshot."""
        await asyncio.get_running_loop().run_in_executor(
            self.executor, self._store_endpoint, snap.portal_id, client_endpoint)
        log.info("portal %s moved to %s", snap.member_id, client_endpoint)
        return dataclasses.replace(snap, client_endpoint=client_endpoint)

    def _store_endpoint(self, portal_id: int, client_endpoint: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(Portal).where(Portal.id == portal_id)
                         .values(**endpoint_values(client_endpoint)))
