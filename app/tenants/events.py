"""Lifecycle and user events of a portal (protocol §2.4–2.6, §8.10).

The ingress endpoint verified the application_token (or, for a first
ONAPPINSTALL, accepted it provisionally), stored and enqueued the event; these
handlers run in a worker and must be idempotent. ``event`` is the parsed form:
``event["auth"]["member_id"]``, ``event["data"]["CLEAN"]``, ...
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from app.extensions import db
from app.ingress.registry import on
from app.tenants import install, service
from app.tenants.models import Portal, PortalSettings, PortalStatus

log = logging.getLogger(__name__)


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
        return install.verify_token(str(auth.get("server_endpoint") or ""),
                                    str(auth.get("access_token") or ""),
                                    str(auth.get("member_id") or ""),
                                    domain=str(auth.get("domain") or ""))
    except install.InstallError as exc:
        log.warning("%s for %s not verified: %s", event.get("event"), auth.get("member_id"),
                    exc.message)
        return None


def _store_chain(portal: Portal, auth: dict[str, Any], info: dict[str, Any]) -> None:
    """Keep the event's chain when it carries one (ONAPPINSTALL / ONAPPUPDATE: the installer)."""
    if not (auth.get("access_token") and auth.get("refresh_token")):
        return
    service.store_new_chain(
        portal, access_token=str(auth["access_token"]), refresh_token=str(auth["refresh_token"]),
        expires_in=int(auth.get("expires_in") or 3600),
        client_endpoint=install.portal_endpoint(info),
        server_endpoint=str(auth.get("server_endpoint") or portal.server_endpoint or ""),
        scope=auth.get("scope") or None, user_id=install.int_or_none(auth.get("user_id")))


def _portal_from_auth(auth: dict[str, Any], info: dict[str, Any]) -> Portal:
    """Create the portal a verified first contact names (the installer POST may come later)."""
    # The address comes from the auth server's answer, never from the event itself.
    endpoint = install.portal_endpoint(info)
    portal = Portal(member_id=str(auth["member_id"]), status=PortalStatus.INSTALLING.value,
                    domain=urlsplit(endpoint).netloc.lower(), client_endpoint=endpoint,
                    server_endpoint=str(auth.get("server_endpoint") or ""),
                    application_token=str(auth.get("application_token") or "") or None)
    portal.settings = PortalSettings()
    db.session.add(portal)
    db.session.commit()
    return portal


@on("ONAPPINSTALL")
def on_app_install(portal: Portal | None, event: dict[str, Any]) -> None:
    """Store the application_token and chain once app.info confirms they are ours."""
    info = _verified(event)
    if info is None:
        return
    auth = _auth(event)
    portal = portal or Portal.by_member_id(str(auth["member_id"])) or _portal_from_auth(auth, info)
    install.record_application_token(portal, str(auth.get("application_token") or ""))
    _store_chain(portal, auth, info)


@on("ONAPPUPDATE")
def on_app_update(portal: Portal | None, event: dict[str, Any]) -> None:
    """Re-run the idempotent setup; take a new application_token once verified."""
    if portal is None:
        return
    auth = _auth(event)
    token = str(auth.get("application_token") or "")
    new_token = bool(token) and not install.application_token_matches(portal, token)
    if new_token or auth.get("refresh_token"):
        info = _verified(event)
        if info is None:
            return
        install.record_application_token(portal, token)
        _store_chain(portal, auth, info)
    install.setup_portal(portal)


@on("ONAPPUNINSTALL")
def on_app_uninstall(portal: Portal | None, event: dict[str, Any]) -> None:
    """Mark the portal uninstalled and drop its tokens; CLEAN=1 deletes its data."""
    if portal is None:
        return
    clean = str(_data(event).get("CLEAN") or "0").strip() in {"1", "Y", "true"}
    install.uninstall(portal, clean)


def _user_id(event: dict[str, Any]) -> int | None:
    data = _data(event)
    fields = data.get("FIELDS") if isinstance(data.get("FIELDS"), dict) else data
    return install.int_or_none(fields.get("ID"))


@on("ONUSERADD")
def on_user_add(portal: Portal | None, event: dict[str, Any]) -> None:
    """Read the new user's extension into the map."""
    user_id = _user_id(event)
    if portal is None or user_id is None:
        return
    install.refresh_user(portal, user_id)
