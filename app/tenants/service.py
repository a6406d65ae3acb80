"""The tenants API the rest of the app uses (names are a contract).

``get_portal``, ``call_method``, ``call_batch``, ``store_new_chain``,
``set_status`` and ``PortalUnavailable``. A call takes the portal explicitly,
refreshes its tokens only when the stored expiry has passed or Bitrix24 says
``expired_token`` (single-flight, see ``tokens``), follows a portal rename
(302) and moves the portal through the status machine (see ``status``).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

import redis
from flask import current_app
from sqlalchemy import func, or_, select

from app.bitrix import BatchResult, RestClient, errors, tls
from app.dispatcher.bucket import RateBucket, scaled_plans
from app.extensions import db, redis_ext
from app.tenants import status as portal_status
from app.tenants import tokens
from app.tenants.models import Portal, PortalStatus, aware, utcnow
from app.tenants.status import PortalUnavailable, set_status
from app.tenants.tokens import Credentials, store_new_chain

__all__ = ["PortalUnavailable", "call_batch", "call_method", "get_portal", "idle_portals",
           "refresh_idle_portals", "refresh_now", "set_status", "store_new_chain"]

log = logging.getLogger(__name__)
T = TypeVar("T")
ACTIVITY_GRANULARITY = timedelta(minutes=15)  # last_activity_at is written at most this often
MAX_MOVES = 3
BUCKET_MAX_WAIT = 30.0  # past this a direct call goes anyway and Bitrix24 decides
_client_lock = threading.Lock()
_clients: dict[str, RestClient] = {}  # by B24_CA_BUNDLE ("" = the default trust store)
_client_pid = 0


def get_portal(member_id: str) -> Portal | None:
    """The portal installed under ``member_id``, or None."""
    return Portal.by_member_id(member_id)


def rest_client() -> RestClient:
    """The process's shared REST client: one pool per CA bundle, rebuilt after a fork."""
    global _client_pid
    bundle = current_app.config.get("B24_CA_BUNDLE") or ""
    client = _clients.get(bundle) if _client_pid == os.getpid() else None
    if client is None:
        with _client_lock:
            if _client_pid != os.getpid():
                _clients.clear()
                _client_pid = os.getpid()
            client = _clients.get(bundle)
            if client is None:
                client = _clients[bundle] = RestClient(verify=tls.trust(bundle))
                atexit.register(client.close)
    return client


def call_method(portal: Portal, method: str, params: Mapping[str, Any] | None = None) -> Any:
    """Call one REST method on the portal and return its ``result``."""
    body = _send(portal, lambda creds: rest_client().call(creds.client_endpoint, method, params,
                                                         creds.access_token or ""))
    return body.get("result")


def call_batch(portal: Portal, commands: Mapping[str, tuple[str, Mapping[str, Any]]],
               halt: bool = False) -> BatchResult:
    """Send up to 50 ``{key: (method, params)}`` commands as one batch; errors are per command."""
    return _send(portal, lambda creds: rest_client().batch(creds.client_endpoint, commands,
                                                           creds.access_token or "", halt=halt))


def _send(portal: Portal, send: Callable[[Credentials], T]) -> T:
    """Run ``send`` with valid credentials: refresh on expiry, follow renames, apply statuses."""
    portal_status.ensure_callable(portal)
    creds = Credentials.of(portal)
    if creds.expired:
        creds = _refreshed(portal, creds)
    refreshed, moves = False, 0
    while True:
        _pace(portal)
        try:
            result = send(creds)
        except errors.QueryLimitExceeded:
            _fill(portal)
            raise
        except (errors.TokenExpired, errors.InvalidToken):
            if refreshed:
                raise
            creds, refreshed = _refreshed(portal, creds), True
        except errors.PortalMoved as moved:
            moves += 1
            if moves > MAX_MOVES:
                raise
            creds = _moved(portal, creds, moved.new_client_endpoint)
        except errors.ApiError as exc:
            portal_status.apply_error(portal, exc)
            raise
        else:
            _touch(portal)
            return result


def _rate_bucket() -> RateBucket:
    """The app's view of the per-portal buckets the dispatcher uses too."""
    ext = current_app.extensions
    if "rate_bucket" not in ext:
        scale = float(current_app.config["DISPATCH_BUCKET_SCALE"])
        ext["rate_bucket"] = RateBucket(redis_ext.client, plans=scaled_plans(scale))
    return ext["rate_bucket"]


def _pace(portal: Portal) -> None:
    """Take the portal's rate token before each request, waiting for it (shared budget)."""
    deadline = time.monotonic() + BUCKET_MAX_WAIT
    try:
        while (wait := _rate_bucket().take(portal.member_id, portal.plan)) > 0:
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
        _rate_bucket().fill(portal.member_id, portal.plan)
    except redis.RedisError as exc:
        log.warning("portal %s: rate bucket not filled (%s)", portal.member_id, exc)


def _refreshed(portal: Portal, creds: Credentials) -> Credentials:
    fresh = tokens.refresh(portal, creds.token_version)
    portal_status.ensure_callable(portal)
    return fresh


def _moved(portal: Portal, creds: Credentials, client_endpoint: str) -> Credentials:
    """The portal was renamed: store its new endpoint and domain, then repeat the call."""
    domain = client_endpoint.split("://", 1)[-1].split("/", 1)[0]
    portal_status.write(portal, {"client_endpoint": client_endpoint, "domain": domain})
    log.info("portal %s moved to %s", portal.member_id, client_endpoint)
    return Credentials(creds.access_token, client_endpoint, creds.token_version,
                       creds.expires_at, creds.status)


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


def refresh_now(portal: Portal) -> Credentials:
    """Refresh the portal's chain now through the single-flight path (CLI, idle job)."""
    portal_status.ensure_callable(portal)
    return _refreshed(portal, Credentials.of(portal))


def idle_portals(days: int | None = None) -> list[Portal]:
    """Active portals with neither a refresh nor activity in the last ``days`` days."""
    if days is None:
        days = int(current_app.config["IDLE_REFRESH_DAYS"])
    cutoff = utcnow() - timedelta(days=days)
    renewed = func.coalesce(Portal.last_refresh_at, Portal.installed_at, Portal.created_at)
    query = select(Portal).where(
        Portal.status == PortalStatus.ACTIVE.value, Portal.refresh_token.is_not(None),
        renewed < cutoff,
        or_(Portal.last_activity_at.is_(None), Portal.last_activity_at < cutoff),
    ).order_by(renewed)
    return list(db.session.scalars(query))


def refresh_idle_portals(days: int | None = None, limit: int = 500) -> list[str]:
    """Keep idle chains alive (a refresh token dies after 180 days unused); returns member_ids."""
    done: list[str] = []
    for portal in idle_portals(days)[:limit]:
        try:
            refresh_now(portal)
        except (errors.BitrixError, PortalUnavailable) as exc:
            log.warning("idle refresh of %s failed: %s", portal.member_id, exc)
            continue
        done.append(portal.member_id)
    return done
