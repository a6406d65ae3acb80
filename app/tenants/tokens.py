"""Token storage and the single-flight refresh (protocol §1.5, §1.6).

Bitrix24 refresh tokens are single-use: each refresh spends the old pair and
returns a new one. Two refreshers presenting the same refresh token lose the
portal, so per portal exactly one refresh runs at a time across every process
and host:

1. a Redis lock ``b24relay:refresh:<member_id>`` (TTL 30 s, so a killed holder
   frees it), waited for at most 15 s;
2. after acquiring it, the row is re-read: if ``token_version`` moved on since
   the caller saw it, someone else refreshed and the caller just uses the row;
3. ``refresh_started_at`` is committed before the request leaves;
4. the answer is committed by Authlib's ``update_token`` callback, conditionally
   on the version the refresh started from, before anyone uses it; an older
   answer never overwrites a newer row (``store_new_chain`` may have won).

SIGKILL mid-refresh: the lock expires by TTL. If the process died before the
auth server saw the request, the next caller refreshes normally with the same,
still valid, token. If it died after the auth server rotated the chain but
before the commit, the stored token is spent: the next refresher gets
``invalid_grant``, sees ``refresh_started_at`` still set and marks the portal
``auth_failed`` with a reason saying so; the next admin iframe open or a
reinstall stores a fresh chain through :func:`store_new_chain`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from flask import current_app
from redis.exceptions import LockError
from sqlalchemy import case, select
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm.attributes import flag_modified

from app.bitrix import OAuthClient, TokenSet, errors, tls
from app.extensions import db, redis_ext
from app.tenants import metrics
from app.tenants import status as portal_status
from app.tenants.models import Portal, PortalStatus, aware, utcnow

log = logging.getLogger(__name__)

POLL = 0.05
DEFAULT_SERVER_ENDPOINT = "https://oauth.bitrix.info/rest/"


class RefreshPending(errors.TransportError):
    """Another process is refreshing this portal and did not finish within the wait."""


def lock_key(member_id: str) -> str:
    """The Redis key of a portal's refresh lock."""
    return f"b24relay:refresh:{member_id}"


def lock_ttl() -> float:
    """Seconds a refresh lock lives unless renewed (``B24_REFRESH_LOCK_TTL``)."""
    return float(current_app.config["B24_REFRESH_LOCK_TTL"])


@dataclass(frozen=True)
class Credentials:
    """What a call needs, as one consistent snapshot of the portal row."""

    access_token: str | None
    client_endpoint: str
    token_version: int
    expires_at: datetime | None
    status: str

    @classmethod
    def of(cls, portal: Portal) -> Credentials:
        """From the in-memory portal (no query unless its attributes are expired)."""
        return cls(portal.access_token, portal.client_endpoint, portal.token_version or 0,
                   aware(portal.expires_at), portal.status)

    @property
    def expired(self) -> bool:
        """The stored expiry has passed (the only time a call refreshes up front)."""
        return self.expires_at is not None and self.expires_at <= utcnow()


_ROW = (Portal.access_token, Portal.refresh_token, Portal.client_endpoint,
        Portal.server_endpoint, Portal.token_version, Portal.expires_at, Portal.status,
        Portal.status_reason, Portal.refresh_started_at)


def _read(portal_id: int) -> dict[str, Any]:
    """The token columns as committed now, in a transaction of their own."""
    with db.engine.connect() as conn:
        row = conn.execute(select(*_ROW).where(Portal.id == portal_id)).one()
    return dict(row._mapping)


def reload(portal: Portal) -> Credentials:
    """Re-read the committed row, mirror it onto ``portal`` and return its credentials."""
    values = _read(portal.id)
    portal_status.sync(portal, values)
    return Credentials.of(portal)


def oauth_client() -> OAuthClient:
    """The app's OAuth client from its configuration."""
    cfg = current_app.config
    return OAuthClient(cfg["B24_CLIENT_ID"] or "", cfg["B24_CLIENT_SECRET"] or "",
                       token_url=cfg["B24_OAUTH_TOKEN_URL"],
                       verify=tls.trust(cfg["B24_CA_BUNDLE"]))


def refresh(portal: Portal, seen_version: int) -> Credentials:
    """Single-flight refresh of the chain the caller saw at ``seen_version``; fresh credentials."""
    cfg = current_app.config
    lock = redis_ext.client.lock(lock_key(portal.member_id), timeout=lock_ttl())
    deadline = time.monotonic() + float(cfg["B24_REFRESH_LOCK_WAIT"])
    while True:
        if lock.acquire(blocking=False):
            try:
                return _refresh_locked(portal, seen_version, lock)
            finally:
                _release(lock)
        time.sleep(POLL)
        if not lock.locked():
            creds = reload(portal)
            if creds.token_version != seen_version or portal_status.is_held(creds.status):
                return creds
        if time.monotonic() > deadline:
            raise RefreshPending(f"portal {portal.member_id}: another refresh is still running")


def _release(lock: Any) -> None:
    try:
        lock.release()
    except LockError:  # held past its TTL; whoever holds it now keeps it
        log.warning("refresh lock %s expired before release", lock.name)


def _refresh_locked(portal: Portal, seen_version: int, lock: Any) -> Credentials:
    row = _read(portal.id)
    if row["token_version"] != seen_version or portal_status.is_held(row["status"]):
        portal_status.sync(portal, row)
        return Credentials.of(portal)
    if not row["refresh_token"]:
        _chain_lost(portal, seen_version, "No refresh token is stored. ")
        return reload(portal)
    interrupted = row["refresh_started_at"] is not None
    portal_status.write(portal, {"refresh_started_at": utcnow()}, seen_version)
    outcome = "error"
    try:
        _spend(portal, row, seen_version, lock)
        outcome = "refreshed"
    except errors.InvalidGrant as exc:
        outcome = "chain_lost"
        _chain_lost(portal, seen_version, portal_status.INTERRUPTED if interrupted else "",
                    f"{exc.code} {exc.description}".strip())
    except errors.ApiError as exc:
        outcome = _refused(portal, seen_version, exc)
        portal_status.apply_error(portal, exc)
        raise
    except errors.TransportError:
        outcome = "no_answer"
        raise
    finally:
        metrics.REFRESHES.labels(outcome).inc()
    return reload(portal)


def _refused(portal: Portal, seen_version: int, exc: errors.ApiError) -> str:
    """An answered refusal rotated nothing: keep the stored token, log it; the metric outcome.

    A refused client (``wrong_client``, even on HTTP 200, or ``invalid_client``) is our own
    misconfiguration, not the tenant's: the portal keeps its status and its chain, and the
    operator is told at error level.
    """
    portal_status.write(portal, {"refresh_started_at": None}, seen_version)
    if isinstance(exc, errors.InvalidClient):
        log.error("portal %s: the auth server refused the app's client credentials (%s); "
                  "check B24_CLIENT_ID and B24_CLIENT_SECRET. The portal keeps its status and "
                  "its tokens.", portal.member_id, exc)
        return "client_rejected"
    target = portal_status.transition_for(exc)
    log.warning("portal %s: refresh refused: %s", portal.member_id, exc)
    return target.value if target else "refused"


def _spend(portal: Portal, row: dict[str, Any], seen_version: int, lock: Any) -> TokenSet:
    """The refresh request; one retry with the same token if the answer was lost in transit.

    Before the retry the lock's TTL is renewed, so no other process can take the lock and
    present the same refresh token while the retry is in flight; if the lock was already
    lost, there is no retry.
    """
    server = row["server_endpoint"] or DEFAULT_SERVER_ENDPOINT
    client = oauth_client()

    def commit(tokens: TokenSet) -> None:
        _commit_refreshed(portal, seen_version, tokens)

    try:
        return client.refresh(server, row["refresh_token"], update_token=commit)
    except errors.TransportError as exc:
        try:
            lock.extend(lock_ttl(), replace_ttl=True)
        except LockError:
            log.error("refresh of %s lost in transit and its lock expired; not retrying",
                      portal.member_id)
            raise exc from None
        log.warning("refresh of %s lost in transit (%s); retrying once", portal.member_id, exc)
        return client.refresh(server, row["refresh_token"], update_token=commit)


def _commit_refreshed(portal: Portal, seen_version: int, tokens: TokenSet) -> None:
    """Authlib's update_token: store the new pair before anything uses it."""
    now = utcnow()
    values: dict[str, Any] = {
        "access_token": tokens.access_token, "refresh_token": tokens.refresh_token,
        "expires_at": tokens.expires_at, "token_version": seen_version + 1,
        "last_refresh_at": now, "refresh_started_at": None,
    }
    if tokens.client_endpoint:
        values["client_endpoint"] = tokens.client_endpoint
    if tokens.scope:
        values["scope"] = tokens.scope
    if tokens.status:
        values["app_status"] = tokens.status
    if not portal_status.write(portal, values, seen_version):
        log.warning("portal %s: a newer chain was stored during the refresh; answer discarded",
                    portal.member_id)
    else:
        log.info("portal %s: tokens refreshed (version %d)", portal.member_id, seen_version + 1)


def _chain_lost(portal: Portal, seen_version: int, why: str, detail: str | None = None) -> None:
    reason = why + portal_status.REASONS[PortalStatus.AUTH_FAILED]
    if detail:
        reason += f" (Bitrix24: {detail})"
    portal_status.record(portal, PortalStatus.AUTH_FAILED, reason, only_if_version=seen_version)
    log.error("portal %s: refresh chain lost: %s", portal.member_id, reason)


def store_new_chain(portal: Portal, *, access_token: str, refresh_token: str, expires_in: int,
                    client_endpoint: str | None = None, server_endpoint: str | None = None,
                    scope: str | None = None, user_id: int | None = None) -> None:
    """Store a fresh chain (install, ONAPPINSTALL, admin iframe open) and commit the session.

    Bumps ``token_version`` so that a refresh of the old chain still in flight
    discards its answer, and clears ``auth_failed`` (also ``payment_required`` and
    ``access_denied``: an admin could open the app, so it works again).
    """
    now = utcnow()
    portal.access_token, portal.refresh_token = access_token, refresh_token
    portal.expires_at = now + timedelta(seconds=int(expires_in))
    portal.last_refresh_at, portal.refresh_started_at = now, None
    flag_modified(portal, "refresh_started_at")  # another process may have set it meanwhile
    for key, value in (("client_endpoint", client_endpoint), ("server_endpoint", server_endpoint),
                       ("scope", scope), ("auth_user_id", user_id)):
        if value:
            setattr(portal, key, value)
    state = sa_inspect(portal)
    if state.persistent:
        # SQL expressions, not the in-memory values: another process may have moved them.
        portal.token_version = Portal.token_version + 1
        if not state.attrs.status.history.has_changes():  # the caller's own choice wins
            cleared = Portal.status.in_([s.value for s in portal_status.CLEARED_BY_NEW_CHAIN])
            portal.status = case((cleared, PortalStatus.ACTIVE.value), else_=Portal.status)
            portal.status_reason = case((cleared, None), else_=Portal.status_reason)
            portal.status_changed_at = case((cleared, now), else_=Portal.status_changed_at)
    else:
        portal.token_version = (portal.token_version or 0) + 1
        if portal.status and PortalStatus(portal.status) in portal_status.CLEARED_BY_NEW_CHAIN:
            portal.status, portal.status_reason = PortalStatus.ACTIVE.value, None
    if portal not in db.session:
        db.session.add(portal)
    db.session.commit()
