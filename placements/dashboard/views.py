"""The live dashboard: ``GET /placements/app/dashboard`` (the page) and ``.json`` (its data).

Both take the signed page session (``placements.page_session``) and show its portal only:
nothing in the request names a portal. The page draws its numbers and charts from the same
JSON it embeds, then fetches it again every few seconds (``static/dashboard.js``), sending
the session in the ``X-B24relay-Session`` header.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, make_response, render_template
from flask_babel import lazy_gettext as _l

from app.dashboard import build
from app.installation.iframe import IframeSession
from app.telephony import summary
from app.tenants.models import Portal
from placements import page_session
from placements.page_session import PageSession

bp = Blueprint("dashboard", __name__, template_folder="templates")

REFRESH_SECONDS = 3
# Words for the values the JSON carries as codes (call states, end statuses, originates).
LABELS = {
    "incomplete": _l("waiting for its start"), "ringing": _l("ringing"),
    "answered": _l("answered"), "ended": _l("ended"), "skipped": _l("skipped"),
    "unroutable": _l("nobody to ring"), "failed": _l("failed"),
    "choosing": _l("choosing an employee"), "register": _l("registering"),
    "pending": _l("being sent"), "sent": _l("sent to the PBX"),
    "joined": _l("call connected"), "refused": _l("refused"),
    "command": _l("command"), "event": _l("event"),
}


def collect(portal: Portal) -> dict[str, Any]:
    """The dashboard's JSON: the dispatcher's side and today's calls."""
    return {**build(portal), "calls": summary.today(portal.id)}


def render(page: PageSession) -> str:
    """The dashboard page for this session (the widget's template extends the page's)."""
    return render_template("widgets/dashboard.html", page=page, data=collect(page.portal),
                           labels={k: str(v) for k, v in LABELS.items()},
                           refresh=REFRESH_SECONDS)


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


def widget(session: IframeSession) -> Response:
    """The TELEPHONY_ANALYTICS_MENU widget: the dashboard, with a fresh page session."""
    token = page_session.issue(session.portal, session.user_id, session.is_admin,
                               session.auth.lang)
    return make_response(render(page_session.from_token(token)))
