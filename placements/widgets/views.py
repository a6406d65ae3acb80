"""Widgets bound with ``placement.bind``: the call-analytics dashboard and the call-card tab."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, abort, make_response, render_template

from app.installation.iframe import IframeSession
from app.installation.plan import PLACEMENTS
from app.telephony import story
from app.tenants.models import Portal
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
    extra = _call_card(portal, options) if name == "call-card" else {}
    body = render_template(template, portal=portal, advice=advice(portal),
                           options=options,
                           extensions=extension_map(portal),
                           lines=(portal.settings.lines if portal.settings else []), **extra)
    return make_response(body)


# ------------------------------------------------------------------ the call card (CALL_CARD)


def _call_card(portal: Portal, options: dict[str, Any]) -> dict[str, Any]:
    """The call card's story (issue 24 point 9): the portal's call of the options' CALL_ID,
    or None when the app does not know that call (not one of its calls, or not yet)."""
    call_id = str(options.get("CALL_ID") or "")
    row = story.by_b24_call_id(portal.id, call_id) if call_id else None
    return {"story": shown(portal, story.story(row)) if row is not None else None}
