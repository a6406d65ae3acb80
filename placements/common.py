"""What every placement view shares: verification, framing, status wording, error pages."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import Response, make_response, render_template, request

from app.extensions import db
from app.framing import framed_by, portal_origin_from_query
from app.installation.iframe import open_iframe
from app.installation.verify import InstallError
from app.tenants.models import Portal, PortalStatus
from app.tenants.status import reason_for

PLAIN_ADVICE = {
    PortalStatus.ACTIVE.value: "Connected: calls and events flow.",
    PortalStatus.INSTALLING.value: "Installation has not finished: open the installer again "
                                   "from Bitrix24 Market.",
}


def advice(portal: Portal) -> str:
    """What the portal admin should do about the portal's state."""
    return (PLAIN_ADVICE.get(portal.status) or portal.status_reason
            or reason_for(portal.status) or portal.status)


def error_page(message: str, status: int, origin: str | None = None) -> Response:
    """An error page saying what went wrong, framed by ``origin`` (a verified portal).

    Without one, the request is unverified: only a portal the app already knows
    under the query's DOMAIN may frame the page, else nobody.
    """
    body = render_template("placements/error.html", message=message)
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
