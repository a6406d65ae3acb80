"""The dispatcher's direct path: calls a person waits on, sent now instead of queued.

The ``/install`` setup, iframe verification, the blocked-portal probe, the offline-events
pull, the self-diagnosis and the CLI cannot wait for the outbox. They call ``call_method`` /
``call_batch`` here, which share the engine's ground: the same single-flight refresh
(``app.tenants.tokens.refresh``), the same per-portal Redis ``RateBucket`` (a direct call
takes a real-time token), the same rename handling (``credentials.endpoint_values``) and
the same verdict table (``policy.classify``):

=========  ======================================================================
verdict    a direct call...
=========  ======================================================================
RATE       fills the portal's bucket (every sender waits) and raises
REFRESH    refreshes once through the single-flight path and sends again
MOVED      stores the new endpoint and sends again (at most ``MAX_MOVES`` times)
any other  lets the portal status machine judge (``status.apply_error``: a HOLD
           raises ``PortalUnavailable``) and raises the error
=========  ======================================================================

A call refreshes up front only when the stored expiry has passed. Per-command errors of a
batch stay in its ``BatchResult``. ``timed_batch`` also says when the request left and how
long it took on the wire (the self-diagnosis reports both). ``call_with_token``
sends with a token that is not a stored chain (a viewing user's own token, an uninstall
check): no refresh, no pacing, no status. One REST client per CA bundle per app, rebuilt
after a fork (``init_app``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, TypeVar

import redis
from flask import Flask, current_app

from app.bitrix import BatchResult, RestClient, errors, tls
from app.dispatcher.bucket import RateBucket, scaled_plans
from app.dispatcher.credentials import Snapshot, endpoint_values
from app.dispatcher.policy import Verdict, classify
from app.extensions import redis_ext
from app.tenants import status as portal_status
from app.tenants import tokens
from app.tenants.models import Portal, aware, utcnow

__all__ = ["MAX_MOVES", "Timed", "call_batch", "call_method", "call_with_token", "init_app",
           "pace", "send", "timed_batch"]

log = logging.getLogger(__name__)
T = TypeVar("T")
EXTENSION = "b24relay.direct"
ACTIVITY_GRANULARITY = timedelta(minutes=15)  # last_activity_at is written at most this often
MAX_MOVES = 3
BUCKET_MAX_WAIT = 30.0  # past this a direct call goes anyway and Bitrix24 decides


class Clients:
    """An app's direct-call clients: a REST pool per CA bundle and the portals' rate bucket.

    The pools are made on first use and made again in a forked child (a pool's sockets
    must not be shared with the parent); each is closed when the app's holder goes away
    or at exit.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = 0
        self._rest: dict[str, RestClient] = {}  # by B24_CA_BUNDLE ("" = the default store)
        self._bucket: RateBucket | None = None

    def rest(self, bundle: str) -> RestClient:
        """The pool for ``bundle`` in this process."""
        client = self._rest.get(bundle) if self._pid == os.getpid() else None
        if client is not None:
            return client
        with self._lock:
            if self._pid != os.getpid():
                self._rest, self._pid = {}, os.getpid()
            client = self._rest.get(bundle)
            if client is None:
                client = self._rest[bundle] = RestClient(verify=tls.trust(bundle))
                weakref.finalize(self, client.close)
            return client

    def bucket(self) -> RateBucket:
        """The per-portal buckets the engine takes from too (same keys, same plans)."""
        if self._bucket is None:
            scale = float(current_app.config["DISPATCH_BUCKET_SCALE"])
            self._bucket = RateBucket(redis_ext.client, plans=scaled_plans(scale))
        return self._bucket


def init_app(app: Flask) -> None:
    """Give the app its direct-call clients (nothing connects until a call)."""
    app.extensions[EXTENSION] = Clients()


def _clients() -> Clients:
    return current_app.extensions[EXTENSION]


def rest_client() -> RestClient:
    """This process's REST client for the app's CA bundle (one connection pool)."""
    return _clients().rest(current_app.config["B24_CA_BUNDLE"] or "")


def call_method(portal: Portal, method: str, params: Mapping[str, Any] | None = None) -> Any:
    """Call one REST method on the portal now and return its ``result``."""
    body = _send(portal, lambda snap: rest_client().call(snap.client_endpoint, method, params,
                                                        snap.access_token or ""))
    return body.get("result")


def call_batch(portal: Portal, commands: Mapping[str, tuple[str, Mapping[str, Any]]],
               halt: bool = False) -> BatchResult:
    """Send up to 50 ``{key: (method, params)}`` commands as one batch; errors are per command."""
    return _send(portal, lambda snap: rest_client().batch(snap.client_endpoint, commands,
                                                          snap.access_token or "", halt=halt))


@dataclass(frozen=True)
class Timed(Generic[T]):
    """An answer with when its request left (our clock, epoch seconds) and how long it took on
    the wire: the last try's, after any refresh or move, the wait for a rate token left out."""

    answer: T
    sent_at: float
    seconds: float


def timed_batch(portal: Portal, commands: Mapping[str, tuple[str, Mapping[str, Any]]]
                ) -> Timed[BatchResult]:
    """``call_batch`` (no halt), timed: the self-diagnosis reports one round trip."""
    return _timed(portal, lambda snap: rest_client().batch(
        snap.client_endpoint, commands, snap.access_token or ""))


def _timed(portal: Portal, request: Callable[[Snapshot], T]) -> Timed[T]:
    clock: list[float] = [0.0, 0.0]

    def timed(snap: Snapshot) -> T:
        clock[0], start = time.time(), time.perf_counter()
        try:
            return request(snap)
        finally:
            clock[1] = time.perf_counter() - start

    answer = _send(portal, timed)
    return Timed(answer, clock[0], clock[1])


def call_with_token(client_endpoint: str, access_token: str, method: str,
                    params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One request with a token that is not a stored chain; the whole body, errors raised."""
    return rest_client().call(client_endpoint, method, params, access_token)


def send(portal: Portal, request: Callable[[Snapshot], T]) -> T:
    """Run ``request`` (one or more calls made with the snapshot's token) on this path's
    ground: valid credentials, a rate token first, each error acted on by its verdict, and
    the whole of ``request`` run again after a refresh or a move (app/dispatcher/upload.py)."""
    return _send(portal, request)


def pace(portal: Portal) -> None:
    """Take the portal's rate token, waiting for it: for a second request inside ``send``."""
    _pace(portal)


def _send(portal: Portal, send: Callable[[Snapshot], T]) -> T:
    """Run ``send`` with valid credentials, acting on each error by its verdict."""
    portal_status.ensure_callable(portal)
    snap = Snapshot.of(portal)
    if snap.expired:
        snap = _refreshed(portal, snap)
    refreshed, moves = False, 0
    while True:
        _pace(portal)
        try:
            result = send(snap)
        except errors.BitrixError as exc:
            verdict = classify(exc)
            if verdict is Verdict.REFRESH and not refreshed:
                snap, refreshed = _refreshed(portal, snap), True
            elif verdict is Verdict.MOVED and moves < MAX_MOVES:
                assert isinstance(exc, errors.PortalMoved)
                snap, moves = _moved(portal, snap, exc.new_client_endpoint), moves + 1
            else:
                _judge(portal, verdict, exc)
                raise
        else:
            _touch(portal)
            return result


def _judge(portal: Portal, verdict: Verdict, error: errors.BitrixError) -> None:
    """An error the call gives up on: fill the bucket on RATE, else let the status machine
    judge an API error (raises ``PortalUnavailable`` when the portal is held now)."""
    if verdict is Verdict.RATE:
        _fill(portal)
    elif isinstance(error, errors.ApiError) and verdict is not Verdict.REFRESH:
        portal_status.apply_error(portal, error)


def _pace(portal: Portal) -> None:
    """Take the portal's rate token before each request, waiting for it (shared budget)."""
    deadline = time.monotonic() + BUCKET_MAX_WAIT
    try:
        while (wait := _clients().bucket().take(portal.member_id, portal.plan)) > 0:
            if time.monotonic() + wait > deadline:
                log.warning("portal %s: no rate token within %.0f s; sending anyway",
                            portal.member_id, BUCKET_MAX_WAIT)
                return
            time.sleep(wait)
    except redis.RedisError as exc:  # the budget is bookkeeping; Bitrix24 still enforces it
        log.warning("portal %s: rate bucket unavailable (%s); sending unpaced",
                    portal.member_id, exc)


def _fill(portal: Portal) -> None:
    """Bitrix24 said QUERY_LIMIT_EXCEEDED: everyone sharing the bucket waits."""
    try:
        _clients().bucket().fill(portal.member_id, portal.plan)
    except redis.RedisError as exc:
        log.warning("portal %s: rate bucket not filled (%s)", portal.member_id, exc)


def _refreshed(portal: Portal, snap: Snapshot) -> Snapshot:
    """The single-flight refresh of the chain ``snap`` was read from; held: raises."""
    tokens.refresh(portal, snap.token_version)
    portal_status.ensure_callable(portal)
    return Snapshot.of(portal)


def _moved(portal: Portal, snap: Snapshot, client_endpoint: str) -> Snapshot:
    """The portal was renamed: store its new endpoint and domain, then repeat the call."""
    portal_status.write(portal, endpoint_values(client_endpoint))
    log.info("portal %s moved to %s", portal.member_id, client_endpoint)
    return Snapshot.of(portal)


def _touch(portal: Portal) -> None:
    """Record activity cheaply: at most once per ACTIVITY_GRANULARITY per portal, across hosts."""
    last = aware(portal.last_activity_at)
    now = utcnow()
    if last is not None and now - last < ACTIVITY_GRANULARITY:
        return
    key = f"b24relay:activity:{portal.member_id}"
    try:
        if not redis_ext.client.set(key, 1, nx=True,
                                    ex=int(ACTIVITY_GRANULARITY.total_seconds())):
            return
    except redis.RedisError as exc:  # bookkeeping must never fail a call that succeeded
        log.warning("activity of %s not recorded: %s", portal.member_id, exc)
        return
    portal_status.write(portal, {"last_activity_at": now})
