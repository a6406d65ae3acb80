"""Lifecycle and user events of a portal (protocol §2.4–2.6, §8.10).

The ingress endpoint verified the application_token (or, for a first
ONAPPINSTALL, accepted it provisionally), stored and enqueued the event; these
handlers run in a worker and must be idempotent. ``event`` is the parsed form:
``event["auth"]["member_id"]``, ``event["data"]["CLEAN"]``, ...

The application_token is no secret from a portal's users (where a portal puts
``APPLICATION_TOKEN`` into every iframe form, any employee can read it, §2.3), so
it never authorises a destructive or credential-changing event on its own:

* ONAPPUNINSTALL is acted on only once Bitrix24 itself confirms the app is gone
  (:func:`uninstall_confirmed`); a forged one is logged and changes nothing.
* A chain or application_token from ONAPPINSTALL / ONAPPUPDATE is adopted only
  when its tokens belong to a portal administrator (``user.admin``), as ``/install``
  requires; a non-admin's own tokens are logged and ignored.

:data:`HANDLERS` maps each event name to its handler; the app factory registers
the table with the ingress registry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from flask import current_app

from app.bitrix import errors
from app.dispatcher import direct
from app.extensions import db, redis_ext
from app.installation import install, lapsed, upkeep
from app.installation.plan import int_or_none
from app.installation.verify import (
    InstallError,
    application_token_matches,
    portal_endpoint,
    user_is_admin,
    verify_token,
)
from app.tenants import tokens
from app.tenants.models import Portal, PortalSettings, PortalStatus
from app.tenants.status import PortalUnavailable, ensure_callable, is_held
from app.tenants.tokens import Credentials

log = logging.getLogger(__name__)

EventHandler = Callable[[Portal | None, dict[str, Any]], None]


def _auth(event: dict[str, Any]) -> dict[str, Any]:
    auth = event.get("auth")
    return auth if isinstance(auth, dict) else {}


def _data(event: dict[str, Any]) -> dict[str, Any]:
    data = event.get("data")
    return data if isinstance(data, dict) else {}


def _verified(event: dict[str, Any]) -> dict[str, Any] | None:
    """The auth server's app.info for the event's token, or None when it does not check out."""
    auth = _auth(event)
    try:
        return verify_token(str(auth.get("server_endpoint") or ""),
                            str(auth.get("access_token") or ""),
                            str(auth.get("member_id") or ""),
                            domain=str(auth.get("domain") or ""))
    except InstallError as exc:
        if exc.status >= 500:  # the auth server did not answer: ask again later
            raise errors.TransportError(exc.message) from exc
        log.warning("%s for %s not verified: %s", event.get("event"), auth.get("member_id"),
                    exc.message)
        return None


def _from_admin(event: dict[str, Any], info: dict[str, Any]) -> bool:
    """Whether the event's tokens belong to a portal administrator (``user.admin``).

    Any employee can send an event carrying their own tokens and the application
    token from their iframe form; only an admin's chain may become the app's, as at
    ``/install``. The portal not answering is retried, never taken as a no.
    """
    auth = _auth(event)
    try:
        admin = user_is_admin(portal_endpoint(info), str(auth.get("access_token") or ""))
    except InstallError as exc:
        raise errors.TransportError(exc.message) from exc
    if not admin:
        log.warning("%s for portal %s carries the tokens of user %s, who is not an "
                    "administrator: its chain and application_token are ignored",
                    event.get("event"), auth.get("member_id"), auth.get("user_id"))
    return admin


def _store_chain(portal: Portal, auth: dict[str, Any], info: dict[str, Any]) -> None:
    """Keep the event's chain when it carries one (ONAPPINSTALL / ONAPPUPDATE: the installer)."""
    if not (auth.get("access_token") and auth.get("refresh_token")):
        return
    tokens.store_new_chain(
        portal, access_token=str(auth["access_token"]), refresh_token=str(auth["refresh_token"]),
        expires_in=int(auth.get("expires_in") or 3600),
        client_endpoint=portal_endpoint(info),
        server_endpoint=str(auth.get("server_endpoint") or portal.server_endpoint or ""),
        scope=auth.get("scope") or None, user_id=int_or_none(auth.get("user_id")))


def _portal_from_auth(auth: dict[str, Any], info: dict[str, Any]) -> Portal:
    """Create the portal a verified first contact names (the installer POST may come later)."""
    # The address comes from the auth server's answer, never from the event itself.
    endpoint = portal_endpoint(info)
    portal = Portal(member_id=str(auth["member_id"]), status=PortalStatus.INSTALLING.value,
                    domain=urlsplit(endpoint).netloc.lower(), client_endpoint=endpoint,
                    server_endpoint=str(auth.get("server_endpoint") or ""),
                    application_token=str(auth.get("application_token") or "") or None)
    portal.settings = PortalSettings()
    db.session.add(portal)
    db.session.commit()
    return portal


def on_app_install(portal: Portal | None, event: dict[str, Any]) -> None:
    """Store the application_token and chain once app.info and user.admin vouch for them."""
    info = _verified(event)
    if info is None or not _from_admin(event, info):
        return
    auth = _auth(event)
    portal = portal or Portal.by_member_id(str(auth["member_id"])) or _portal_from_auth(auth, info)
    install.record_application_token(portal, str(auth.get("application_token") or ""))
    _store_chain(portal, auth, info)


def on_app_update(portal: Portal | None, event: dict[str, Any]) -> None:
    """Re-run the idempotent setup; take a new application_token or chain from an admin only.

    The checks of the event's own tokens (app.info, user.admin) are direct: they use the
    event's chain, not the portal's. The setup itself goes through the dispatcher
    (app.installation.upkeep), submitted with this row's outcome.
    """
    if portal is None:
        return
    auth = _auth(event)
    token = str(auth.get("application_token") or "")
    new_token = bool(token) and not application_token_matches(portal, token)
    adopted = new_token or bool(auth.get("refresh_token"))
    if adopted:
        info = _verified(event)
        if info is None or not _from_admin(event, info):
            return
        install.record_application_token(portal, token)
        _store_chain(portal, auth, info)
    ensure_callable(portal)  # a held portal parks the event (held), as a direct call would
    if not _setup_due(portal) and not adopted:
        log.info("ONAPPUPDATE for portal %s: setup already re-run in the last %gs; skipped",
                 portal.member_id, _setup_interval())
        return
    upkeep.submit_setup(portal)


def _setup_interval() -> float:
    return float(current_app.config["SETUP_RERUN_INTERVAL"])


def _setup_due(portal: Portal) -> bool:
    """Whether the portal's setup may re-run now: at most once per ``SETUP_RERUN_INTERVAL``.

    Any employee holding the application_token (their iframe form carries it) can send
    ONAPPUPDATE at will, and each would re-read and re-bind the whole portal. The first in
    an interval takes a Redis key that lives that long; the others are acknowledged and
    skipped (the setup is idempotent: one run in the interval did what they would do).
    An administrator's update that brought a new token or chain always runs.
    """
    interval = _setup_interval()
    if interval <= 0:
        return True
    key = f"b24relay:setup-rerun:{portal.id}"
    return bool(redis_ext.client.set(key, "1", nx=True, px=int(interval * 1000)))


def on_app_uninstall(portal: Portal | None, event: dict[str, Any]) -> None:
    """Once Bitrix24 confirms the uninstall: mark the portal, drop its tokens; CLEAN=1 deletes data.

    Unconfirmed (the stored chain still works, or cannot be asked): a warning naming
    the portal, and nothing changes.
    """
    if portal is None:
        return
    clean = str(_data(event).get("CLEAN") or "0").strip() in {"1", "Y", "true"}
    if _held_but_askable(portal):
        _ask_held(portal, clean)
        return
    evidence = uninstall_confirmed(portal)
    if evidence is None:
        log.warning("ONAPPUNINSTALL (CLEAN=%s) for portal %s ignored: Bitrix24 did not confirm "
                    "the uninstall; nothing was changed", int(clean), portal.member_id)
        return
    log.info("portal %s: uninstall confirmed by Bitrix24 (%s)%s", portal.member_id, evidence,
             "; deleting its data" if clean else "")
    install.uninstall(portal, clean)  # committed by inbox processing with the row's outcome


def _held_but_askable(portal: Portal) -> bool:
    """A held portal (payment_required and the like) with a stored token to ask app.info with."""
    return (portal.status != PortalStatus.UNINSTALLED.value and is_held(portal.status)
            and bool(portal.access_token))


def _ask_held(portal: Portal, clean: bool) -> None:
    """A held portal's uninstall: confirmed now by ``NOT_INSTALLED``, else asked again later."""
    verdict, said = lapsed.ask(portal)
    if verdict == lapsed.CONFIRMED:
        log.info("portal %s (%s): uninstall confirmed by Bitrix24 (%s)%s", portal.member_id,
                 portal.status, said, "; deleting its data" if clean else "")
        lapsed.forget(portal.id)
        install.uninstall(portal, clean)  # committed by inbox processing with the row's outcome
        return
    lapsed.schedule(portal, clean)
    log.warning("ONAPPUNINSTALL (CLEAN=%s) for portal %s (%s) not confirmed yet (%s): asked "
                "again later; nothing was changed", int(clean), portal.member_id,
                portal.status, said)


def uninstall_confirmed(portal: Portal) -> str | None:
    """Bitrix24's own answer that the app is gone from the portal, or None.

    Asked with the stored chain (protocol §2.6: API access is revoked before
    ONAPPUNINSTALL is sent): the portal's ``app.info`` refused with ``NOT_INSTALLED``,
    ``ERROR_OAUTH``, ``APPLICATION_NOT_FOUND``, or ``invalid_token`` for a token we hold
    as unexpired (and no refresh of ours was interrupted); or, when that token has
    expired, a refresh of the stored chain answered ``NOT_INSTALLED``. A bare
    ``invalid_grant`` proves nothing (a lost chain looks the same).

    A held portal with a stored token is asked by :mod:`app.installation.lapsed` instead
    (``app.info`` only, again later until a bound). One with no stored chain (e.g. after
    an earlier confirmed uninstall) cannot be asked: None, and the caller leaves it
    unchanged; a real uninstall then shows on the next reinstall or call. The
    portal not answering raises a transient error (the event is retried), never a
    confirmation.
    """
    if portal.status != PortalStatus.UNINSTALLED.value and is_held(portal.status):
        log.warning("portal %s is %s: its chain cannot confirm an uninstall",
                    portal.member_id, portal.status)
        return None
    if not (portal.access_token and portal.refresh_token):
        log.warning("portal %s has no stored chain to confirm an uninstall with",
                    portal.member_id)
        return None
    creds = Credentials.of(portal)
    if not creds.expired:
        try:
            return _ask_portal(creds, trust_invalid_token=portal.refresh_started_at is None)
        except errors.TokenExpired:
            pass  # the stored expiry was optimistic: ask the auth server with a refresh
    return _ask_by_refresh(portal, creds)


def _ask_portal(creds: Credentials, trust_invalid_token: bool) -> str | None:
    """The portal's ``app.info`` with the stored, unexpired access token; evidence or None.

    Only this app holds its chain, so ``invalid_token`` for it means Bitrix24 revoked
    it, unless a refresh of ours was interrupted (``refresh_started_at`` still set):
    that may have spent the chain, and then the token dies the same way.
    """
    endpoint = creds.client_endpoint
    for _ in range(direct.MAX_MOVES + 1):
        try:
            direct.call_with_token(endpoint, creds.access_token or "", "app.info")
        except errors.PortalMoved as moved:
            endpoint = moved.new_client_endpoint  # renamed: ask it at its new address
            continue
        except errors.NotInstalled as exc:
            return f"app.info: {exc.code}"
        except errors.InvalidToken as exc:
            if trust_invalid_token and exc.code.lower() == "invalid_token":
                return f"app.info: {exc.code} for an unexpired access token"
            return None
        except errors.TokenExpired:
            raise
        except errors.ApiError as exc:
            if (exc.http_status or 0) >= 500 or exc.http_status == 429:
                # Rate limit or outage, whatever its code: ask again later (a transient
                # error to inbox processing), never a verdict.
                raise errors.TransportError(f"app.info at {endpoint}: {exc}",
                                            exc.http_status) from exc
            log.warning("app.info refused at %s (%s): not a sign of an uninstall", endpoint, exc)
            return None
        return None  # the app's token works: it is installed
    raise errors.TransportError(f"portal redirected more than {direct.MAX_MOVES} times")


def _ask_by_refresh(portal: Portal, creds: Credentials) -> str | None:
    """Refresh the stored chain (single-flight, the new pair is kept); evidence or None."""
    try:
        fresh = tokens.refresh(portal, creds.token_version)
    except PortalUnavailable as exc:
        if exc.status == PortalStatus.UNINSTALLED.value:
            return f"token refresh: {exc.reason}"
        return None
    if fresh.status == PortalStatus.UNINSTALLED.value:
        return "Bitrix24 answered NOT_INSTALLED before (portal status uninstalled)"
    return None  # refreshed (installed), or the chain is lost (auth_failed): no proof


def _user_id(event: dict[str, Any]) -> int | None:
    data = _data(event)
    fields = named if isinstance(named := data.get("FIELDS"), dict) else data
    return int_or_none(fields.get("ID"))


def on_user_add(portal: Portal | None, event: dict[str, Any]) -> None:
    """Read the new user's extension into the map: ``user.get`` through the dispatcher.

    The handler calls no Bitrix24: it submits the command with this row's outcome, and
    app.installation.upkeep.user_fetched upserts the user once the answer is in.
    """
    user_id = _user_id(event)
    if portal is None or user_id is None:
        return
    ensure_callable(portal)
    upkeep.submit_user_fetch(portal, user_id)


# Registered with the ingress registry by the app factory (app/__init__.py).
HANDLERS: dict[str, EventHandler] = {
    "ONAPPINSTALL": on_app_install,
    "ONAPPUPDATE": on_app_update,
    "ONAPPUNINSTALL": on_app_uninstall,
    "ONUSERADD": on_user_add,
}
