"""Who may frame a page: ``frame-ancestors`` for the pages Bitrix24 shows in its iframe.

One module for every blueprint that answers an iframe POST (``/install`` and the
placements). A page may be framed by a portal only once the app knows that
portal is real:

* after verification, by the verified portal's origin (the caller passes it);
* before it (an error answered to an unverified POST), by the origin of a portal
  already known to the app under the query's ``DOMAIN``: a Portal row exists only
  after an earlier verified install or ONAPPINSTALL, so its domain was checked
  against the auth server's ``app.info``;
* otherwise by nobody (``frame-ancestors 'none'`` and ``X-Frame-Options: DENY``),
  so a forged POST naming an attacker's ``DOMAIN`` cannot get our page into the
  attacker's frame.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from flask import Response, request
from sqlalchemy import select

from app.extensions import db
from app.tenants.models import Portal

NOBODY = "'none'"


def valid_host(value: str) -> bool:
    """Whether ``value`` is a bare ``host[:port]`` (what DOMAIN must be)."""
    try:
        parts = urlsplit(f"//{value}")
        return bool(parts.hostname) and parts.netloc == value and not parts.path
    except ValueError:
        return False


def framed_by(response: Response, origin: str | None) -> Response:
    """Let ``origin`` (a verified or known portal) frame ``response``; None: nobody may."""
    if origin:
        # X-Frame-Options cannot name an origin (ALLOW-FROM is dead): CSP alone says who.
        response.headers.pop("X-Frame-Options", None)
    else:
        response.headers["X-Frame-Options"] = "DENY"  # for browsers without CSP level 2
    response.headers["Content-Security-Policy"] = f"frame-ancestors {origin or NOBODY}"
    return response


def query_domain() -> str | None:
    """The query's ``DOMAIN`` when it is a plain host name; nothing about it is verified."""
    domain = (request.args.get("DOMAIN") or "").strip().lower()
    return domain if domain and valid_host(domain) else None


def known_portal_origin(domain: str | None) -> str | None:
    """The stored origin of a portal the app already knows under ``domain``, else None."""
    if not domain:
        return None
    portal = db.session.scalars(
        select(Portal).where(Portal.domain == domain).order_by(Portal.id.desc())).first()
    return portal.origin if portal is not None else None


def portal_origin_from_query() -> str | None:
    """Who may frame an answer given before verification: the known portal ``DOMAIN`` names."""
    return known_portal_origin(query_domain())


def frameable(view: Callable[..., Response]) -> Callable[..., Response]:
    """Decorator: the answer may be framed by the known portal the query names, else by nobody.

    Decided after the view ran, so a successful install (whose portal row the view
    has just written from the verified POST) is framed by that verified origin.
    """

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Response:
        return framed_by(view(*args, **kwargs), portal_origin_from_query())

    return wrapper
