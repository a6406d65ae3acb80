"""The signed page session: how a page of the app, once opened by a verified iframe POST,
reaches its other pages and its JSON inside the portal's third-party iframe.

Bitrix24 verifies the user once, with the iframe POST (``placements.common.verified``).
Cookies of ours are not usable in a third-party iframe, so the page carries the session:
a token signed with ``SECRET_KEY`` naming the portal (id and member_id), the user, whether
they are an administrator, and their language. Links and ``fetch`` calls send it back, as
the ``s`` query or form field or the ``X-B24relay-Session`` header.

What reaches the browser is readable there, so the token grants no more than its holder
already had: one portal, that user's role, for :data:`TTL_SECONDS` (the hour Bitrix24 gives
the iframe's own AUTH_ID). A change also needs the single-use form token
(``placements.settings.form_token``): that is the CSRF check, and a replay changes nothing.
Every view answers 401 for a missing, forged or expired session, and is framed by the
session's portal only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

from flask import Response, current_app, jsonify, make_response, request
from flask_babel import lazy_gettext as _l
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from app.framing import framed_by
from app.i18n import N_, language_of, shown, use_language
from app.tenants.models import Portal
from placements.common import GONE, error_page, signed_portal

SALT = "b24relay-page-session"
TTL_SECONDS = 60 * 60
HEADER = "X-B24relay-Session"
FIELD = "s"

class SessionRefused(Exception):
    """No usable page session: ``status`` 401 (missing, forged, expired) or 403 (not allowed).

    ``message`` is ``Words``: English in a log, the page's language where it is shown."""

    def __init__(self, message: str, status: int = 401, portal: Portal | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.portal = message, status, portal


@dataclass(frozen=True)
class PageSession:
    """A verified page session: this portal, this user, their role and language."""

    portal: Portal
    user_id: int | None
    is_admin: bool
    lang: str
    token: str


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt=SALT)


def issue(portal: Portal, user_id: int | None, is_admin: bool, lang: str | None) -> str:
    """A page-session token for a user whose iframe POST was just verified."""
    return _serializer().dumps({"p": portal.id, "m": portal.member_id, "u": user_id,
                                "a": bool(is_admin), "l": language_of(lang),
                                "t": int(time.time())})


def from_token(raw: str) -> PageSession:
    """The session a token carries; raises :class:`SessionRefused` saying why not."""
    if not raw:
        raise SessionRefused(N_("This page opens inside Bitrix24: reopen the app from your "
                                "portal."))
    try:
        claims = _serializer().loads(raw, max_age=TTL_SECONDS)
    except SignatureExpired:
        _speak_as_claimed(raw)
        raise SessionRefused(N_("The page expired: reopen the app from your Bitrix24 "
                                "portal.")) from None
    except BadSignature:
        _speak_as_claimed(raw)
        raise SessionRefused(N_("The page's session is not valid: reopen the app from your "
                                "Bitrix24 portal.")) from None
    if isinstance(claims, dict):
        use_language(str(claims.get("l") or ""))  # a refusal below speaks the user's language
    portal = signed_portal(claims)
    if portal is None:
        raise SessionRefused(N_("The app is no longer installed on this portal."))
    if portal.status in GONE:
        raise SessionRefused(N_("The app is no longer installed on this portal."), 403, portal)
    user_id = claims.get("u") if isinstance(claims.get("u"), int) else None
    return PageSession(portal, user_id, bool(claims.get("a")), language_of(claims.get("l")),
                       raw)


def _speak_as_claimed(raw: str) -> None:
    """Refuse a token in the language it names, though it is expired or forged: the
    language is the only claim used, and it changes no more than the refusal's words."""
    _valid, claims = _serializer().loads_unsafe(raw)
    if isinstance(claims, dict):
        use_language(str(claims.get("l") or ""))


def current() -> PageSession:
    """The page session this request carries (header, then form, then query)."""
    raw = (request.headers.get(HEADER) or request.form.get(FIELD)
           or request.args.get(FIELD) or "")
    session = from_token(raw)
    use_language(session.lang)
    return session


def _refusal(exc: SessionRefused, as_json: bool) -> Response:
    origin = exc.portal.origin if exc.portal else None
    if as_json:
        return framed_by(make_response(jsonify(error=shown(exc.message)), exc.status), origin)
    return error_page(exc.message, exc.status, origin)


def page(*, admin: bool = False, as_json: bool = False
         ) -> Callable[[Callable[..., Response]], Callable[..., Response]]:
    """Decorator: the view gets the verified :class:`PageSession`; framed by its portal only.

    ``admin=True``: a session of a user who is not a portal administrator gets 403.
    ``as_json=True``: refusals are JSON (``{"error": ...}``) instead of an error page.
    """

    def decorate(view: Callable[..., Response]) -> Callable[..., Response]:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Response:
            try:
                session = current()
                if admin and not session.is_admin:
                    raise SessionRefused(N_("Only a portal administrator can do this."), 403,
                                         session.portal)
            except SessionRefused as exc:
                return _refusal(exc, as_json)
            response = make_response(view(session, *args, **kwargs))
            response.headers["Referrer-Policy"] = "no-referrer"  # the token rides in URLs
            response.headers["Cache-Control"] = "no-store"
            return framed_by(response, session.portal.origin)

        return wrapper

    return decorate


# The app's sections inside the portal, in the order of its navigation: (endpoint, label,
# for administrators only). A section appears once its blueprint registers the endpoint, and
# an administrators' section only in an administrator's navigation (its views refuse others).
SECTIONS = (
    ("settings.settings_page", _l("Settings"), False),
    ("dashboard.dashboard", _l("Dashboard"), False),
    ("calls.lookup", _l("Calls"), True),
    ("dead.dead_letters", _l("Dead letters"), True),
    ("settings.diagnosis", _l("Check the connection"), False),
)
