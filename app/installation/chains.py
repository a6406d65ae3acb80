"""Fresh chains from an administrator: the OAuth code flow (§1.2) and an admin's iframe open.

Either replaces the app's stored chain, and so may lift ``auth_failed`` and the other
statuses a new chain clears; only a portal administrator's chain is ever kept.
"""

from __future__ import annotations

import hmac

from app.bitrix import TokenSet
from app.bitrix.errors import ApiError, BitrixError
from app.installation.verify import InstallError, TokenRejected, oauth_client, user_is_admin
from app.tenants import tokens
from app.tenants.models import Portal


def adopt_chain(portal: Portal, token: TokenSet) -> None:
    """Keep a verified fresh chain (``store_new_chain`` also lifts ``auth_failed``)."""
    tokens.store_new_chain(portal, access_token=token.access_token,
                            refresh_token=token.refresh_token, expires_in=token.expires_in,
                            client_endpoint=token.client_endpoint,
                            server_endpoint=token.server_endpoint or portal.server_endpoint,
                            scope=token.scope, user_id=token.user_id)


def connect_with_code(portal: Portal, code: str) -> None:
    """OAuth code flow: exchange ``code`` at the portal's token URL and keep the chain."""
    try:
        token = oauth_client().exchange_code(portal.server_endpoint or "", code)
    except ApiError as exc:
        raise TokenRejected(f"Bitrix24 refused the code ({exc.code}: {exc.description})") from exc
    except BitrixError as exc:
        raise InstallError(f"the Bitrix24 authorization server did not answer ({exc})",
                           502) from exc
    if not token.member_id or not hmac.compare_digest(str(token.member_id), portal.member_id):
        raise TokenRejected("the code was issued for another portal (member_id missing or "
                            "different)", 403)
    # Any portal user can finish this flow: only an administrator's chain may replace the app's.
    if not user_is_admin(token.client_endpoint or portal.client_endpoint, token.access_token):
        raise TokenRejected("only a portal administrator can reconnect b24relay; "
                            "nothing was changed", 403)
    adopt_chain(portal, token)
