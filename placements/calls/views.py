"""Call lookup (issue 24 point 5): find a call, and read its whole story.

``GET /placements/app/calls?q=...`` finds the session's portal's calls by phone (normalised
as telephony registers numbers), PBX call id or Bitrix24 ``CALL_ID``;
``GET /placements/app/calls/<id>`` shows one: its PBX events, the commands sent for it,
their outcomes and times (app/telephony/story.py). Administrators only: the calls carry
customers' phone numbers and names, which the portal's own call log shows each employee
only for their calls. Another portal's call is 404, as one that does not exist.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, make_response, render_template, request
from flask_babel import gettext as _

from app.telephony import story
from app.tenants.models import Portal
from placements import page_session
from placements.common import error_page
from placements.dead import redact

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


def shown(portal: Portal, told: story.Story) -> dict[str, Any]:
    """A story as the pages show it: events and commands with their secrets hidden."""
    secrets = redact.portal_secrets(portal)
    return {
        "call": told.call,
        "notes": [redact.text(n, secrets) for n in told.notes],
        "events": [{"id": e.id, "kind": e.event_type, "status": e.status,
                    "attempts": e.attempts, "received_at": e.received_at,
                    "processed_at": e.processed_at, "at": str(e.payload.get("at") or ""),
                    "error": redact.text(e.error, secrets),
                    "body": redact.pretty(e.payload, secrets)} for e in told.events],
        "commands": [{"id": c.id, "method": c.method, "status": c.status,
                      "outcome": c.outcome or "", "attempts": c.attempts,
                      "submitted_at": c.submitted_at, "first_sent_at": c.first_sent_at,
                      "completed_at": c.completed_at,
                      "reason": redact.text(_said(c), secrets),
                      "body": redact.pretty(c.params, secrets)} for c in told.commands],
    }


def _said(command: Any) -> str:
    """A command's reason and Bitrix24's error, in one line."""
    error = command.error if isinstance(command.error, dict) else {}
    said = ": ".join(str(v) for v in (error.get("error"), error.get("error_description")) if v)
    return "; ".join(part for part in (command.reason, said) if part)
