"""What every placement view shares: verification, framing, status wording, error pages."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import Response, make_response, render_template, request
from flask_babel import lazy_gettext as _l

from app.extensions import db
from app.framing import framed_by, portal_origin_from_query
from app.i18n import shown
from app.installation.iframe import open_iframe
from app.installation.verify import InstallError
from app.tenants.models import Portal, PortalStatus
from app.tenants.status import shown_reason

PLAIN_ADVICE = {
    PortalStatus.ACTIVE.value: _l("Connected: calls and events flow."),
    PortalStatus.INSTALLING.value: _l("Installation has not finished: open the installer again "
                                      "from Bitrix24 Market."),
}


def advice(portal: Portal) -> str:
    """What the portal admin should do about the portal's state, in the page's language
    (a reason Bitrix24 worded is shown as it came)."""
    plain = PLAIN_ADVICE.get(portal.status)
    if plain is not None:
        return str(plain)
    return shown_reason(portal.status, portal.status_reason) or portal.status


def error_page(message: str, status: int, origin: str | None = None) -> Response:
    """An error page saying what went wrong, framed by ``origin`` (a verified portal).

    ``message`` is shown in the page's language when it is ``Words`` (a refusal's English
    text, which the log keeps). Without ``origin`` the request is unverified: only a portal
    the app already knows under the query's DOMAIN may frame the page, else nobody.
    """
    body = render_template("placements/error.html", message=shown(message))
    return framed_by(make_response(body, status), origin or portal_origin_from_query())


def verified(view: Callable[..., Response]) -> Callable[..., Response]:
    """Decorator: verify the iframe POST, pass the session, frame for that portal only."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Response:
        try:
            session = open_iframe(request.args, request.form)
        except InstallError as exc:
            return error_page(exc.message, exc.status)
        db.session.commit()  # the open is the unit of work (a recovered chain is kept)
        return framed_by(view(session, *args, **kwargs), session.auth.origin)

    return wrapper


# Statuses in which a portal no longer has the app: no page session or form of it is honoured.
GONE = frozenset({PortalStatus.UNINSTALLED.value, PortalStatus.PORTAL_DELETED.value,
                  PortalStatus.DISABLED.value})


def signed_portal(claims: Any) -> Portal | None:
    """The portal a signed token's claims name (``p`` its id, ``m`` its member_id), if it is
    still the same installation; None when deleted or the id now belongs to another portal."""
    portal_id = claims.get("p") if isinstance(claims, dict) else None
    portal = db.session.get(Portal, portal_id) if isinstance(portal_id, int) else None
    if portal is None or portal.member_id != claims.get("m"):
        return None
    return portal
