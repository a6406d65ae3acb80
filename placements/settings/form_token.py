"""The admin's settings-form token: signed, bound to one portal and one user, single-use.

The settings form is posted from inside the portal's iframe, where no cookie of
ours is usable, so the page itself carries the authorisation. Whatever reaches
the browser is readable there, so the token is worth little once seen:

* it names the portal (id and member_id) and the admin user it was issued to;
  a save writes that portal and no other;
* it lives :data:`TTL_SECONDS` (15 minutes: time to type a list of lines, half
  the former 30, and well under the hour Bitrix24 gives the iframe's own token);
* its nonce is spent in Redis (``SET NX``, kept for the token's whole life) before
  anything is written, so a replay, or a second tab posting the same page, is
  refused and changes nothing; every page rendered after a save carries a new one;
* the portal must still have the app (not uninstalled, deleted or switched off)
  and the user must not have been deactivated since (both read from the
  database; no Bitrix24 call: the admin check itself, ``user.admin``, ran when
  the page was opened, at most :data:`TTL_SECONDS` earlier).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any

import redis
from flask import current_app
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from app.extensions import redis_ext
from app.i18n import N_
from app.tenants.models import Portal
from app.tenants.status import reason_for
from app.tenants.users import find_user
from placements.common import GONE, signed_portal

log = logging.getLogger(__name__)

SALT = "b24relay-settings-form"
TTL_SECONDS = 15 * 60
# The spent mark outlives the token by a margin: another host's clock may run behind ours.
CLOCK_SKEW_SECONDS = 60
TAMPERED = N_("The form was tampered with; reopen the app from your Bitrix24 portal.")


class FormRefused(Exception):
    """The token cannot be honoured; ``portal`` is set once its signature checked out.

    ``message`` is ``Words``: English in a log, the page's language where it is shown."""

    def __init__(self, message: str, status: int = 403, portal: Portal | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.portal = message, status, portal


@dataclass(frozen=True)
class FormGrant:
    """What a redeemed token allows: one save of ``portal``'s settings by ``user_id``."""

    portal: Portal
    user_id: int | None


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt=SALT)


def spent_key(nonce: str) -> str:
    """The Redis key that marks a token's nonce as used."""
    return f"b24relay:settings-form:spent:{nonce}"


def issue(portal: Portal, user_id: int | None) -> str:
    """A token that lets this admin save this portal's settings once, within the TTL."""
    return _serializer().dumps({"p": portal.id, "m": portal.member_id, "u": user_id,
                                "n": secrets.token_urlsafe(16)})


def redeem(raw: str) -> FormGrant:
    """Check the token and spend it; raises :class:`FormRefused` saying why not."""
    claims = _claims(raw)
    portal = signed_portal(claims)
    if portal is None:
        raise FormRefused(TAMPERED)
    user_id = claims.get("u") if isinstance(claims.get("u"), int) else None
    _still_allowed(portal, user_id)
    _spend(str(claims.get("n") or ""), portal)
    return FormGrant(portal, user_id)


def _claims(raw: str) -> dict[str, Any]:
    serializer = _serializer()
    try:
        claims = serializer.loads(raw, max_age=TTL_SECONDS)
    except SignatureExpired as exc:  # the signature is ours: say so inside that portal's frame
        old = serializer.load_payload(exc.payload) if exc.payload else {}
        portal = signed_portal(old) if isinstance(old, dict) else None
        raise FormRefused(N_("The form expired (it is valid for %(minutes)d minutes); reopen "
                             "the app from your Bitrix24 portal.", minutes=TTL_SECONDS // 60),
                          portal=portal) from None
    except BadSignature:
        raise FormRefused(TAMPERED) from None
    if not isinstance(claims, dict) or not claims.get("n"):  # issued before tokens had a nonce
        raise FormRefused(N_("The form is out of date; reopen the app from your Bitrix24 "
                             "portal."))
    return claims


def _still_allowed(portal: Portal, user_id: int | None) -> None:
    if portal.status in GONE:
        raise FormRefused(N_("%(reason)s Nothing was saved.", reason=reason_for(portal.status)),
                          portal=portal)
    if user_id is not None:
        user = find_user(portal, user_id)
        if user is not None and not user.active:
            raise FormRefused(N_("Your Bitrix24 account is deactivated; nothing was saved."),
                              portal=portal)


def _spend(nonce: str, portal: Portal) -> None:
    """Mark the nonce used, atomically across hosts; the loser of a race is refused."""
    try:
        first = redis_ext.client.set(spent_key(nonce), portal.id, nx=True,
                                     ex=TTL_SECONDS + CLOCK_SKEW_SECONDS)
    except redis.RedisError as exc:
        log.warning("settings form of portal %s not checked: %s", portal.member_id, exc)
        raise FormRefused(N_("The form could not be checked just now; nothing was saved. "
                             "Try again in a minute."), 503, portal) from exc
    if not first:
        log.warning("settings form of portal %s posted again: refused", portal.member_id)
        raise FormRefused(N_("This form was already used; reopen the app from your Bitrix24 "
                             "portal."), portal=portal)
