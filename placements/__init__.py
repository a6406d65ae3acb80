"""Pages shown inside the Bitrix24 portal: one blueprint per placement.

``settings`` is the app's own page (the DEFAULT placement); ``widgets`` serves
what ``placement.bind`` put into the portal (the TELEPHONY_ANALYTICS_MENU
dashboard, the CALL_CARD tab). Every page verifies the iframe POST server-side
and may be framed by its own portal only.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Flask

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

assets = Blueprint("placement_assets", __name__, template_folder="templates",
                   static_folder=str(STATIC_DIR), static_url_path="/placements/static")


def init_app(app: Flask) -> None:
    """Register the placement blueprints and their shared assets."""
    from placements.settings.views import bp as settings_bp
    from placements.widgets.views import bp as widgets_bp

    app.register_blueprint(assets)
    app.register_blueprint(settings_bp)
    app.register_blueprint(widgets_bp)
