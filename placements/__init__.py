"""Pages shown inside the Bitrix24 portal: one blueprint per placement.

``settings`` is the app's own page (the DEFAULT placement); ``widgets`` serves
what ``placement.bind`` put into the portal (the TELEPHONY_ANALYTICS_MENU
dashboard, the CALL_CARD tab). Every page verifies the iframe POST server-side
and may be framed by its own portal only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, url_for

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

assets = Blueprint("placement_assets", __name__, template_folder="templates",
                   static_folder=str(STATIC_DIR), static_url_path="/placements/static")


def init_app(app: Flask) -> None:
    """Register the placement blueprints and their shared assets."""
    from placements.calls.views import bp as calls_bp
    from placements.dashboard.views import bp as dashboard_bp
    from placements.dead.views import bp as dead_bp
    from placements.settings.views import bp as settings_bp
    from placements.widgets.views import bp as widgets_bp

    app.register_blueprint(assets)
    app.context_processor(_page_helpers)
    app.register_blueprint(settings_bp)
    app.register_blueprint(widgets_bp)
    app.register_blueprint(calls_bp)
    app.register_blueprint(dead_bp)
    app.register_blueprint(dashboard_bp)


def page_url(endpoint: str, page: Any, **values: Any) -> str:
    """A link to another page of the app that carries the page session (placements.page_session)."""
    from placements.page_session import FIELD

    return url_for(endpoint, **{FIELD: page.token, **values})


def _page_helpers() -> dict[str, Any]:
    """``page_url`` and ``sections(page)``, the navigation, for every placement template."""
    from flask import current_app

    from placements.page_session import SECTIONS

    def sections(page: Any) -> list[tuple[str, str]]:
        """The sections registered that this page's user may open: (endpoint, label)."""
        return [(endpoint, str(label)) for endpoint, label, admin_only in SECTIONS
                if endpoint in current_app.view_functions
                and (page.is_admin or not admin_only)]

    return {"page_url": page_url, "sections": sections}
