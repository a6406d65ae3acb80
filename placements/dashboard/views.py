"""The live dashboard: ``GET /placements/app/dashboard`` (the page) and ``.json`` (its data).

Both take the signed page session (``placements.page_session``) and show its portal only:
nothing in the request names a portal. The page draws its numbers and charts from the same
JSON it embeds, then fetches it again every few seconds (``static/dashboard.js``), sending
the session in the ``X-B24relay-Session`` header.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, make_response

import placements.page_session as page_session
from placements.dashboard.page import collect, render
from placements.page_session import PageSession

bp = Blueprint("dashboard", __name__, template_folder="templates")


@bp.get("/placements/app/dashboard")
@page_session.page()
def dashboard(page: PageSession) -> Response:
    """The dashboard page."""
    return make_response(render(page))


@bp.get("/placements/app/dashboard.json")
@page_session.page(as_json=True)
def data(page: PageSession) -> Response:
    """The dashboard's numbers and minute series (the page's refresh)."""
    return jsonify(collect(page.portal))
