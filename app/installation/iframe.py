"""Iframe sessions: who opened a placement (a page of the app inside the portal), verified."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from app.bitrix import TokenSet
from app.i18n import N_
from app.installation.chains import adopt_chain
from app.installation.plan import int_or_none
from app.installation.verify import (
    IframeAuth,
    TokenRejected,
    application_token_matches,
    parse_iframe,
    user_is_admin,
    verify_iframe_token,
)
from app.tenants.models import Portal, PortalStatus
from app.tenants.status import CLEARED_BY_NEW_CHAIN


@dataclass
class IframeSession:
    """A verified iframe POST: whose portal, which user, admin or not."""

    portal: Portal
    auth: IframeAuth
    user_id: int | None
    is_admin: bool
    recovered: bool = False


def open_iframe(query: Mapping[str, str], form: Mapping[str, str]) -> IframeSession:
    """Verify a placement POST (§7.4): auth server, member_id, APPLICATION_TOKEN, admin.

    The proof is ``app.info`` for the posted AUTH_ID. APPLICATION_TOKEN is compared only
    when both the form and the portal have one, and a token from a placement form is
    never stored: any employee can post any value there with their own real AUTH_ID.
    """
    auth = parse_iframe(query, form)
    auth, info = verify_iframe_token(auth)
    portal = Portal.by_member_id(auth.member_id)
    if portal is None:
        raise TokenRejected(N_("b24relay is not installed on this portal; install it first"), 403)
    if (auth.application_token and portal.application_token
            and not application_token_matches(portal, auth.application_token)):
        raise TokenRejected(N_("APPLICATION_TOKEN does not match this portal's installation"),
                            403)
    session = IframeSession(portal, auth, int_or_none(info.get("user_id")),
                            user_is_admin(portal.client_endpoint, auth.access_token, portal))
    if session.is_admin and PortalStatus(portal.status) in CLEARED_BY_NEW_CHAIN:
        adopt_chain(portal, TokenSet.from_response({
            "access_token": auth.access_token, "refresh_token": auth.refresh_token,
            "expires_in": auth.expires_in, "server_endpoint": auth.server_endpoint,
            "scope": auth.scope or info.get("scope") or None, "user_id": session.user_id}))
        session.recovered = True
    return session
