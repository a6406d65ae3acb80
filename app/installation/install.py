"""Installing the app into a portal, and uninstalling it (protocol §2.2–2.6).

The ``/install`` flow:

1. :func:`app.installation.verify.parse_iframe` reads the installer's iframe POST, short
   form or full (§2.3).
2. :func:`app.installation.verify.verify_iframe_token` asks the *auth server*
   (``app.info``) whose token it is: our ``client_id`` and the posted ``member_id``, or
   nothing is created. The auth server must be one we trust (``B24_AUTH_SERVERS``) when the
   POST names it; a POST that names none is checked at the portal's stored auth server,
   then at each trusted one, until one knows the token.
3. :func:`install` creates or updates the Portal keyed by member_id and stores the
   installer's chain encrypted (``store_new_chain``), and the application token when the
   installer form carries one.
4. :func:`app.installation.setup.setup_portal` binds what the setup plan says is missing.

Transactions: these functions add and flush; the caller that owns the unit of work commits
once (the ``/install`` view; inbox processing for the uninstall event). ``store_new_chain``
(app/tenants/tokens.py) still commits on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from sqlalchemy import CursorResult, delete

from app.extensions import db
from app.i18n import N_
from app.installation.plan import SetupReport, int_or_none
from app.installation.setup import SetupFailed, setup_portal
from app.installation.verify import (
    IframeAuth,
    TokenRejected,
    application_token_matches,
    portal_endpoint,
    user_is_admin,
    verify_iframe_token,
)
from app.tenants import tokens
from app.tenants.models import Portal, PortalSettings, PortalStatus, utcnow
from app.tenants.status import is_held, reason_for

IN_WORKERS_HANDS = "processing"  # an inbox row claimed by a worker (app.ingress.processing)


def install(auth: IframeAuth) -> tuple[Portal, SetupReport]:
    """Verify the installer POST, create or update its portal, and set it up.

    The caller commits, also when :class:`SetupFailed` is raised: the portal then
    keeps the reason (``status_reason``) the settings page shows.
    """
    auth, info = verify_iframe_token(auth)
    client_endpoint = portal_endpoint(info)  # verify_iframe_token checked its host is DOMAIN
    if not user_is_admin(client_endpoint, auth.access_token):
        raise TokenRejected(N_("only a portal administrator can install b24relay"), 403)
    portal = _upsert_portal(auth, info, client_endpoint)
    tokens.store_new_chain(
        portal, access_token=auth.access_token, refresh_token=auth.refresh_token,
        expires_in=auth.expires_in, client_endpoint=client_endpoint,
        server_endpoint=auth.server_endpoint, scope=auth.scope or info.get("scope") or None,
        user_id=int_or_none(info.get("user_id")))
    try:
        report = setup_portal(portal, installer_id=int_or_none(info.get("user_id")))
    except SetupFailed as exc:
        db.session.rollback()
        portal.status_reason = f"Setup did not finish: {exc.message}"[:2000]
        db.session.flush()
        raise
    mark_installed(portal)
    return portal, report


def _upsert_portal(auth: IframeAuth, info: Mapping[str, Any], client_endpoint: str) -> Portal:
    """The portal row for this member_id, created once (flushed)."""
    portal = Portal.by_member_id(auth.member_id)
    if portal is None:
        portal = Portal(member_id=auth.member_id, status=PortalStatus.INSTALLING.value)
        db.session.add(portal)
    portal.domain = auth.domain
    portal.client_endpoint = client_endpoint
    portal.server_endpoint = auth.server_endpoint
    if auth.application_token:
        # The installer was verified as an admin (app.info + user.admin): it may set the
        # token. The short form carries none; ONAPPINSTALL brings it (app.installation.events).
        portal.application_token = auth.application_token
    elif portal.status == PortalStatus.UNINSTALLED.value:
        # A new installation has a new token (§3.7): the old one died with the uninstall,
        # and without it this install's ONAPPINSTALL is a first contact, checked by app.info.
        portal.application_token = None
    portal.app_status = (str((info.get("install") or {}).get("status") or "") or None)
    portal.language = auth.lang or portal.language
    if portal.settings is None:
        portal.settings = PortalSettings()
    if portal.status != PortalStatus.DISABLED.value and is_held(portal.status):
        # A verified install supersedes uninstalled/auth_failed/...: set it up again.
        portal.status, portal.status_reason = PortalStatus.INSTALLING.value, None
    db.session.flush()
    return portal


def mark_installed(portal: Portal) -> None:
    """Setup is done: the portal is active (flushed)."""
    if portal.installed_at is None or portal.status != PortalStatus.ACTIVE.value:
        portal.installed_at = utcnow()
    _set_status(portal, PortalStatus.ACTIVE)


def _set_status(portal: Portal, status: PortalStatus) -> None:
    """Move the portal to ``status`` in the caller's unit of work (status.set_status commits)."""
    portal.status, portal.status_reason = status.value, reason_for(status)
    portal.status_changed_at = utcnow()
    db.session.flush()


def record_application_token(portal: Portal, token: str) -> bool:
    """Store a (verified) application_token (flushed); True when it changed."""
    if not token or application_token_matches(portal, token):
        return False
    portal.application_token = token
    db.session.flush()
    return True


def uninstall(portal: Portal, clean: bool) -> None:
    """Mark the portal uninstalled and drop its tokens; ``clean`` deletes its data too.

    The application_token goes too (its keyed hash with it, app/ingress/token_hash.py): the
    copy an employee kept from an iframe form would otherwise still store events for the
    uninstalled (or wiped) tenant. A reinstall's verified ONAPPINSTALL brings the new one.
    """
    portal.access_token = None
    portal.refresh_token = None
    portal.expires_at = None
    portal.application_token = None
    _set_status(portal, PortalStatus.UNINSTALLED)
    if clean:
        delete_portal_data(portal)


def delete_portal_data(portal: Portal) -> int:
    """Delete every row keyed by this portal's id, in every table; the portal row stays.

    Rows a worker holds (status ``processing``: the inbox row of the ONAPPUNINSTALL being
    handled among them) are left to that worker, which finishes them in its own unit of
    work (scrubbed of secrets, later pruned): deleting the row under it would make inbox
    processing discard the whole unit of work, this deletion included, as a lost claim.
    """
    deleted = 0
    for table in reversed(db.metadata.sorted_tables):
        if "portal_id" in table.c:
            stmt = delete(table).where(table.c.portal_id == portal.id)
            if "status" in table.c:
                stmt = stmt.where(table.c.status != IN_WORKERS_HANDS)
            deleted += cast(CursorResult, db.session.execute(stmt)).rowcount or 0  # DML
    db.session.flush()
    db.session.expire(portal)
    return deleted
