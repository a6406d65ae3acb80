"""The dashboard page's data and HTML, shared by its own views and the TELEPHONY_ANALYTICS_MENU
widget (placements/widgets): a module of its own, since blueprints never import each other's
views."""

from __future__ import annotations

from typing import Any

from flask import Response, make_response, render_template
from flask_babel import lazy_gettext as _l

import placements.page_session as page_session
from app.dashboard import build
from app.installation.iframe import IframeSession
from app.telephony import summary
from app.tenants.models import Portal
from placements.page_session import PageSession

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


def widget(session: IframeSession) -> Response:
    """The TELEPHONY_ANALYTICS_MENU widget: the dashboard, with a fresh page session."""
    token = page_session.issue(session.portal, session.user_id, session.is_admin,
                               session.auth.lang)
    return make_response(render(page_session.from_token(token)))
