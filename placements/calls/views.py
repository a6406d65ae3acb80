"""Call lookup (issue 24 point 5): find a call, and read its whole story.

``GET /placements/app/calls?q=...`` finds the session's portal's calls by phone (normalised
as telephony registers numbers), PBX call id or Bitrix24 ``CALL_ID``;
``GET /placements/app/calls/<id>`` shows one: its PBX events, the commands sent for it,
their outcomes and times (app/telephony/story.py). Administrators only: the calls carry
customers' phone numbers and names, which the portal's own call log shows each employee
only for their calls. Another portal's call is 404, as one that does not exist.
"""

from __future__ import annotations

from flask import Blueprint, Response, make_response, render_template, request
from flask_babel import gettext as _

import placements.page_session as page_session
from app.telephony import story
from placements.calls.shown import shown
from placements.common import error_page

bp = Blueprint("calls", __name__, template_folder="templates")

QUERY_LIMIT = 128


@bp.get("/placements/app/calls")
@page_session.page(admin=True)
def lookup(page: page_session.PageSession) -> Response:
    """The search form and, for a query, the calls it finds (newest first)."""
    query = request.args.get("q", "").strip()[:QUERY_LIMIT]
    found = story.find(page.portal.id, query) if query else []
    return make_response(render_template("calls/lookup.html", page=page, query=query,
                                         found=found, limit=story.FOUND_LIMIT))


@bp.get("/placements/app/calls/<int:call_id>")
@page_session.page(admin=True)
def call(page: page_session.PageSession, call_id: int) -> Response:
    """One call's whole story; 404 for a call that is not this portal's."""
    row = story.call_of(page.portal.id, call_id)
    if row is None:
        return error_page(_("This portal has no such call."), 404, page.portal.origin)
    return make_response(render_template("calls/call.html", page=page,
                                          story=shown(page.portal, story.story(row))))


