"""Widgets bound with ``placement.bind``: the call-analytics dashboard and the call-card tab."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, abort, make_response, render_template

from app.installation.iframe import IframeSession
from app.installation.plan import PLACEMENTS
from app.telephony import story
from app.tenants.users import extension_map
from placements.calls.shown import shown
from placements.common import advice, verified
from placements.dashboard import page as dashboard_page

bp = Blueprint("widgets", __name__, template_folder="templates")

WIDGETS = {path.rsplit("/", 1)[1]: code for code, (path, _) in PLACEMENTS.items()}


def _options(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@bp.post("/placements/<name>")
def widget(name: str) -> Response:
    """One bound widget; unknown names are 404."""
    if name not in WIDGETS:
        abort(404)
    return _render(name)


@verified
def _render(session: IframeSession, name: str) -> Response:
    if name == "dashboard":  # TELEPHONY_ANALYTICS_MENU opens the live dashboard
        return dashboard_page.widget(session)
    portal = session.portal
    template = "widgets/" + name.replace("-", "_") + ".html"
    options = _options(session.auth.placement_options)
    extra = _call_card(session, options) if name == "call-card" else {}
    body = render_template(template, portal=portal, advice=advice(portal),
                           options=options,
                           extensions=extension_map(portal),
                           lines=(portal.settings.lines if portal.settings else []), **extra)
    return make_response(body)


# ------------------------------------------------------------------ the call card (CALL_CARD)


def _call_card(session: IframeSession, options: dict[str, Any]) -> dict[str, Any]:
    """The call card's story (issue 24 point 9): the portal's call of the options' CALL_ID,
    or None when the app does not know that call (not one of its calls, or not yet).

    PLACEMENT_OPTIONS is a form field the employee's browser posts, so any CALL_ID can be
    put there: an employee sees the story of a call whose card was theirs (they owned it,
    it rang or was shown to them, they answered or handled it); an administrator any."""
    portal = session.portal
    call_id = str(options.get("CALL_ID") or "")
    row = story.by_b24_call_id(portal.id, call_id) if call_id else None
    if row is not None and not (session.is_admin or _took_part(row, session.user_id)):
        return {"story": None, "not_yours": True}
    return {"story": shown(portal, story.story(row)) if row is not None else None}


def _took_part(call: Any, user_id: int | None) -> bool:
    """Whether ``user_id`` had this call's card: owner, ringing, shown, answerer or handler."""
    if user_id is None:
        return False
    people = {call.owner_user_id, call.answerer_user_id, call.handler_user_id,
              *(call.ringing or []), *(call.shown or []), *(call.hidden or [])}
    return user_id in people
