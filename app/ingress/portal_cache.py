"""Intake's per-process portal cache, kept correct by invalidation instead of a short expiry.

With 10,000 portals a 5 s expiry means almost every event misses and reads the database.
Here an entry lives until its portal changes (or ``INTAKE_PORTAL_CACHE_SECONDS``, a safety
net for changes made outside the app, such as SQL by hand):

- every committed change to a portal's application_token, status or member_id is
  published on a Redis channel: the ORM's changes from the session's flush (published
  after its commit), Core ``UPDATE``/``DELETE`` statements on ``portals`` when their
  connection goes back to the pool (after their commit);
- every process listens on that channel in a thread and drops what changed; the writer
  waits (up to ``ACK_SECONDS``) until every listener has confirmed, so when the change's
  commit returns, no process still accepts the old token;
- a process trusts its entries only while its subscription is up: on a lost connection it
  empties its cache and reads the database on every event until it has subscribed again;
- a read that overlaps an invalidation is not cached (the listener's epoch moved on).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

import redis
from flask import Flask, current_app, has_app_context
from sqlalchemy import event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool
from sqlalchemy.sql.dml import Delete, Update

from app.tenants.models import Portal

log = logging.getLogger(__name__)

WATCHED = ("application_token", "status", "member_id")
ACK_SECONDS = 1.0
EVERYTHING = "*"
_CHANGED_KEY = "b24relay_portals_changed"


class _Listener:
    """One subscription per process and channel, shared by the caches of every app there."""

    def __init__(self, url: str, channel: str, first: PortalCache) -> None:
        self.url, self.channel = url, channel
        self.caches: weakref.WeakSet[PortalCache] = weakref.WeakSet([first])
        self.lock = threading.Lock()
        self.live = False
        self.epoch = 0
        threading.Thread(target=self._run, name="portal-cache-listener", daemon=True).start()

    def _run(self) -> None:
        backoff, quiet = 0.1, False
        while not self._retired():
            try:
                self._listen()
            except Exception as exc:  # noqa: BLE001 - any failure: stop trusting, reconnect
                if self.live or not quiet:  # once per outage
                    quiet = True
                    log.warning("portal cache: subscription lost (%s); reading the database "
                                "until it is back", exc)
            self._invalidate(None)
            time.sleep(backoff)
            backoff = min(5.0, backoff * 2)

    def _retired(self) -> bool:
        """Once every app using it is gone (tests make many), the thread ends."""
        with _listeners_lock:
            if self.caches:
                return False
            _listeners.pop((os.getpid(), self.url, self.channel), None)
            return True

    def _listen(self) -> None:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=10,
                                      health_check_interval=5)
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(self.channel)
            while True:
                message = pubsub.get_message(timeout=1.0)
                if message is None:
                    if not self.caches:
                        return
                    continue
                if message["type"] == "subscribe":
                    with self.lock:
                        self.live = True
                elif message["type"] == "message":
                    change = json.loads(message["data"])
                    self._invalidate(change)
                    client.rpush(change["ack"], 1)
                    client.expire(change["ack"], 60)
        finally:
            pubsub.close()
            client.close()

    def _invalidate(self, change: dict[str, Any] | None) -> None:
        """Drop what ``change`` names from every cache (None: stop trusting, drop all)."""
        with self.lock:
            self.epoch += 1
            if change is None:
                self.live = False
            for cache in list(self.caches):
                cache.drop(change)


_listeners: dict[tuple[int, str, str], _Listener] = {}
_listeners_lock = threading.Lock()


def _listener(url: str, channel: str, cache: PortalCache) -> _Listener:
    key = (os.getpid(), url, channel)  # a forked gunicorn worker starts its own thread
    with _listeners_lock:
        found = _listeners.get(key)
        if found is None:
            found = _listeners[key] = _Listener(url, channel, cache)
        found.caches.add(cache)
    return found


class PortalCache:
    """member_id -> what intake knows of the portal, for as long as nothing changes it."""

    def __init__(self, url: str, channel: str, max_age: float) -> None:
        self.url, self.channel, self.max_age = url, channel, max_age
        self.entries: dict[str, tuple[float, Any]] = {}
        self._listener: _Listener | None = None

    @property
    def listener(self) -> _Listener:
        found = self._listener
        if found is None or found is not _listeners.get((os.getpid(), self.url, self.channel)):
            found = self._listener = _listener(self.url, self.channel, self)
            self.entries.clear()  # a fork's copy was never invalidated
        return found

    def get(self, member_id: str) -> Any | None:
        """The entry, if the subscription is up and it has not expired."""
        if not self.listener.live:
            return None
        hit = self.entries.get(member_id)
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def epoch(self) -> int:
        """Take before a database read; hand to :meth:`put` after it."""
        return self.listener.epoch

    def put(self, member_id: str, known: Any, epoch: int) -> None:
        """Cache a read, unless an invalidation arrived while it ran (or nothing listens)."""
        listener = self.listener
        with listener.lock:
            if listener.live and listener.epoch == epoch:
                self.entries[member_id] = (time.monotonic() + self.max_age, known)

    def forget(self, member_id: str) -> None:
        """Drop one entry in this process (a read found the portal gone)."""
        self.entries.pop(member_id, None)

    def drop(self, change: dict[str, Any] | None) -> None:
        """Apply an invalidation (called with the listener's lock held)."""
        if change is None or EVERYTHING in change.get("members", ()):
            self.entries.clear()
            return
        for member_id in change.get("members", ()):
            self.entries.pop(member_id, None)
        ids = set(change.get("ids", ()))
        if ids:
            for member_id in [m for m, (_, k) in self.entries.items() if k.id in ids]:
                self.entries.pop(member_id, None)


def cache() -> PortalCache:
    """This app's portal cache."""
    return current_app.extensions["ingress_portal_cache"]


# ---------------------------------------------------------------- publishing changes

class _Publisher:
    def __init__(self, url: str, channel: str) -> None:
        self.channel = channel
        self.client = redis.Redis.from_url(url, socket_connect_timeout=1,
                                           socket_timeout=ACK_SECONDS + 1)
        self.down_until = 0.0

    def publish(self, members: Iterable[str] = (), ids: Iterable[int] = ()) -> None:
        """Tell every process, and wait until each has dropped its entries."""
        ack = f"{self.channel}:ack:{secrets.token_hex(8)}"
        change = {"members": sorted(set(members)), "ids": sorted(set(ids)), "ack": ack}
        if time.monotonic() < self.down_until:
            return  # Redis is down: so are the listeners' subscriptions, they trust nothing
        try:
            listeners = self.client.publish(self.channel, json.dumps(change))
            deadline = time.monotonic() + ACK_SECONDS
            confirmed = 0
            while confirmed < listeners and (left := deadline - time.monotonic()) > 0:
                if self.client.blpop([ack], timeout=max(0.01, left)) is None:
                    break
                confirmed += 1
            self.client.delete(ack)
        except redis.RedisError as exc:  # the listeners lost Redis too: they stop trusting
            self.down_until = time.monotonic() + 1.0
            log.warning("portal cache: change of %s not published: %s", change["members"], exc)
            return
        if confirmed < listeners:
            log.warning("portal cache: %d of %d processes confirmed the change of %s within "
                        "%.1f s", confirmed, listeners, change["members"] or change["ids"],
                        ACK_SECONDS)


_fallback: list[_Publisher] = []  # for changes made outside an app context (engine threads)


def _publisher() -> _Publisher | None:
    if has_app_context():
        found = current_app.extensions.get("ingress_portal_publisher")
        if found is not None:
            return found
    return _fallback[-1] if _fallback else None


def _collect(session: Session, _context: object) -> None:
    """after_flush: the portals whose watched columns this flush changed."""
    changed: set[str] = session.info.setdefault(_CHANGED_KEY, set())
    for obj in session.deleted:
        if isinstance(obj, Portal):
            changed.add(obj.member_id)
    for obj in session.dirty:
        if not isinstance(obj, Portal):
            continue
        state = inspect(obj)
        for name in WATCHED:
            history = state.attrs[name].history
            if history.has_changes():
                changed.add(obj.member_id)
                changed.update(v for v in history.deleted if name == "member_id" and v)


def _after_commit(session: Session) -> None:
    changed = session.info.pop(_CHANGED_KEY, None)
    if changed and (publisher := _publisher()) is not None:
        publisher.publish(members=changed)


def _after_rollback(session: Session) -> None:
    session.info.pop(_CHANGED_KEY, None)


def _portal_ids(where: Any) -> list[int] | None:
    """The ids a Core statement's ``portals.id = <value>`` names (None: cannot tell)."""
    clauses = getattr(where, "clauses", None) or ([where] if where is not None else [])
    for clause in clauses:
        left, right = getattr(clause, "left", None), getattr(clause, "right", None)
        if (_is_portals(getattr(left, "table", None)) and getattr(left, "key", None) == "id"
                and isinstance(getattr(right, "value", None), int)):
            return [right.value]
    return None


def _is_portals(table: Any) -> bool:
    return getattr(table, "name", None) == Portal.__tablename__  # ORM statements annotate it


def _core_write(conn: Any, statement: Any, *_args: Any) -> None:
    """after_execute: a Core UPDATE/DELETE on portals, published when its connection returns."""
    if not isinstance(statement, (Update, Delete)) or not _is_portals(statement.table):
        return
    if isinstance(statement, Update):
        values = statement._values or {}  # None: the ORM's flush (the session hooks see it)
        if not any(getattr(k, "key", k) in WATCHED for k in values):
            return
    ids = _portal_ids(statement.whereclause)
    pending: dict[str, set] = conn.info.setdefault(_CHANGED_KEY, {"ids": set(), "all": set()})
    if ids is None:
        pending["all"].add(EVERYTHING)
    else:
        pending["ids"].update(ids)


def _checkin(_dbapi_connection: object, record: Any) -> None:
    pending = record.info.pop(_CHANGED_KEY, None)
    if pending and (publisher := _publisher()) is not None:
        publisher.publish(members=pending["all"], ids=pending["ids"])


_hooks_installed = threading.Event()


def _install_hooks() -> None:
    if _hooks_installed.is_set():
        return
    event.listen(Session, "after_flush", _collect)
    event.listen(Session, "after_commit", _after_commit)
    event.listen(Session, "after_rollback", _after_rollback)
    event.listen(Engine, "after_execute", _core_write)
    event.listen(Pool, "checkin", _checkin)
    _hooks_installed.set()


def channel_for(app: Flask) -> str:
    """The invalidation channel: per namespace and Redis database (pub/sub spans databases)."""
    url = app.config["REDIS_URL"]
    db_index = redis.connection.parse_url(url).get("db", 0)
    return f"{app.config.get('DRAMATIQ_NAMESPACE', 'b24relay')}:{db_index}:portals-changed"


def init_app(app: Flask) -> None:
    """Give the app its cache and publisher; hook portal changes (once per process)."""
    url, channel = app.config["REDIS_URL"], channel_for(app)
    app.extensions["ingress_portal_cache"] = PortalCache(
        url, channel, float(app.config.get("INTAKE_PORTAL_CACHE_SECONDS", 600)))
    publisher = _Publisher(url, channel)
    app.extensions["ingress_portal_publisher"] = publisher
    _fallback[:] = [publisher]
    _install_hooks()
