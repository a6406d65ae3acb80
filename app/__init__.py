"""b24relay: a multi-tenant Bitrix24 app joining a company's PBX to its portal."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dotenv import load_dotenv
from flask import Flask
from flask.sessions import SessionInterface
from werkzeug.middleware.proxy_fix import ProxyFix

from app import config as config_mod
from app import crypto, i18n, logs, metrics, queue, telephony
from app.dispatcher import direct
from app.dispatcher import metrics as dispatch_metrics
from app.extensions import configure_database, db, migrate, redis_ext

MIGRATIONS_DIR = str(Path(__file__).resolve().parent.parent / "migrations")


class NoCookieSession(SessionInterface):
    """The app keeps no cookie session: Bitrix24 and the PBX authenticate every request.

    Placement forms and the OAuth state carry signed tokens of their own (placements/,
    installation/views.py), so Flask's signed-cookie session is never read; skipping it
    saves building a signing serializer on every event (about 5% of intake's CPU).
    """

    def open_session(self, app: Flask, request: Any) -> None:
        return None  # Flask then uses a NullSession, which refuses writes

    def save_session(self, app: Flask, session: Any, response: Any) -> None:
        return None


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the app: settings, extensions, models, blueprints, CLI — in that order."""
    load_dotenv(override=False)
    instance = Path((config or {}).get("INSTANCE_PATH") or config_mod.instance_dir())
    app = Flask(__name__, instance_path=str(instance), instance_relative_config=False)
    app.config.update(config_mod.from_environment(instance))
    app.config.update(config or {})
    config_mod.validate(app.config)
    logging.basicConfig(level=app.config["LOG_LEVEL"],
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logs.keep_records_to_one_line()  # a sender's newline or escape cannot forge a log line
    # httpx logs full URLs at INFO; token requests carry client_secret and refresh_token there.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)

    app.session_interface = NoCookieSession()
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)  # type: ignore[method-assign]
    configure_database(app)
    db.init_app(app)
    migrate.init_app(app, db, directory=MIGRATIONS_DIR, render_as_batch=True)
    redis_ext.init_app(app)
    crypto.init_app(app)
    i18n.init_app(app)  # the portal's LANG: Russian or English
    queue.init_app(app)
    metrics.init_app(app)
    dispatch_metrics.init_app(app)
    direct.init_app(app)  # the REST clients of calls a person waits on

    _import_models()
    _register_event_handlers()
    telephony.init_app(app)  # PBX call events -> Bitrix24 calls (app/telephony/)
    _register_blueprints(app)
    _register_cli(app)
    return app


def _import_models() -> None:
    """Every model module, so metadata and Alembic see all tables."""
    from app.dispatcher import models as _dispatcher  # noqa: F401
    from app.ingress import models as _ingress  # noqa: F401
    from app.installation import models as _installation  # noqa: F401
    from app.tenants import models as _tenants  # noqa: F401
    from app.tenants import users as _tenant_users  # noqa: F401


def _register_event_handlers() -> None:
    """The installation's lifecycle and user event handlers, into the ingress handler registry;
    their outcome handlers, into the dispatcher's."""
    from app.dispatcher import register_outcome_handlers
    from app.ingress import registry
    from app.installation.events import HANDLERS
    from app.installation.upkeep import OUTCOME_HANDLERS

    registry.register(HANDLERS)
    register_outcome_handlers(OUTCOME_HANDLERS)


def _register_blueprints(app: Flask) -> None:
    """Health and metrics, intake (and its lane), install/OAuth, and the pages shown inside the
    portal."""
    import placements
    from app.health import bp as health_bp
    from app.ingress import lane as intake_lane
    from app.ingress.views import bp as ingress_bp
    from app.installation.views import bp as installation_bp
    from app.telephony.views import bp as telephony_bp

    app.register_blueprint(health_bp)
    app.register_blueprint(ingress_bp)
    intake_lane.init_app(app)  # outermost WSGI layer: the common event, answered without Flask
    app.register_blueprint(installation_bp)
    app.register_blueprint(telephony_bp)  # GET /api/v1/calls/route (the PBX asks whose client)
    placements.init_app(app)


def _register_cli(app: Flask) -> None:
    """``flask portals …`` (list, show, refresh, disable, enable, resume, settings, check,
    setup, api-key),
    ``flask inbox …``, ``flask outbox …`` (show, dead, replay), ``flask dispatcher run``."""
    from app.dispatcher.cli import dispatcher_cli, outbox_cli
    from app.ingress.cli import api_key_command, inbox_cli
    from app.installation.cli import check_portal, portal_settings, resume_portal, setup_portal
    from app.tenants.cli import portals_cli

    portals_cli.add_command(resume_portal)
    portals_cli.add_command(portal_settings)
    portals_cli.add_command(check_portal)
    portals_cli.add_command(setup_portal)
    portals_cli.add_command(api_key_command)
    app.cli.add_command(portals_cli)
    app.cli.add_command(inbox_cli)
    app.cli.add_command(outbox_cli)
    app.cli.add_command(dispatcher_cli)
