"""The app's own page (DEFAULT placement): the portal's state and its settings.

``POST /placements/settings`` from the portal iframe is verified server-side
(§7.4); an administrator gets a form carrying a signed, short-lived token, so
saving needs no cookie inside the cross-site iframe.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, make_response, render_template, request
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from app.extensions import db
from app.ingress import inbox
from app.ingress.retention import Retention
from app.queue import enqueue
from app.tenants import install
from app.tenants.models import Portal, PortalSettings
from app.tenants.users import extension_map
from app.tenants.views import framed_by
from placements.common import advice, error_page, verified

bp = Blueprint("settings", __name__, template_folder="templates")

FORM_SALT = "b24relay-settings-form"
FORM_TTL_SECONDS = 30 * 60
EVENT_MODES = ("online", "offline")
MAX_LINES = 40
DEAD_LETTERS_SHOWN = 10


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt=FORM_SALT)


def form_token(portal: Portal, user_id: int | None) -> str:
    """A signed token that lets this admin save this portal's settings for a while."""
    return _serializer().dumps({"p": portal.id, "m": portal.member_id, "u": user_id})


def _settings(portal: Portal) -> PortalSettings:
    if portal.settings is None:
        portal.settings = PortalSettings()
        db.session.commit()
    return portal.settings


def render(portal: Portal, *, is_admin: bool, user_id: int | None, notice: str = "",
           error: str = "", recovered: bool = False) -> str:
    """The settings page for ``portal``."""
    settings = _settings(portal)
    return render_template(
        "settings/settings.html", portal=portal, settings=settings, advice=advice(portal),
        inbox_counts=inbox.depth(portal.id) if is_admin else {},
        dead=inbox.dead_letters(portal.id, DEAD_LETTERS_SHOWN) if is_admin else [],
        dead_days=int(Retention.from_config().dead_days),
        is_admin=is_admin, token=form_token(portal, user_id) if is_admin else "",
        lines_text="\n".join(f"{line.get('number')} {line.get('name') or ''}".strip()
                             for line in settings.lines or []),
        extensions=sorted(extension_map(portal).items()), notice=notice, error=error,
        recovered=recovered, modes=EVENT_MODES)


@bp.get("/placements/settings")
def settings_get() -> Response:
    """Opened outside the portal: there is nothing to verify, so say where to open it."""
    return error_page("This page opens inside Bitrix24 (Applications → b24relay).", 400)


@bp.post("/placements/settings")
def settings_post() -> Response:
    """The iframe POST from the portal, or the admin's form submission."""
    if "form_token" in request.form:
        return _save()
    return _show()


@verified
def _show(session: install.IframeSession) -> Response:
    notice = "The app is connected again." if session.recovered else ""
    return make_response(render(session.portal, is_admin=session.is_admin,
                                user_id=session.user_id, notice=notice,
                                recovered=session.recovered))


def _form_claims() -> dict[str, Any] | None:
    try:
        return _serializer().loads(request.form.get("form_token", ""), max_age=FORM_TTL_SECONDS)
    except (BadSignature, SignatureExpired):
        return None


def _save() -> Response:
    claims = _form_claims()
    portal = db.session.get(Portal, claims["p"]) if claims else None
    if portal is None or portal.member_id != claims.get("m"):
        return error_page("The form expired or was tampered with; reopen the app.", 403)
    origin = portal.origin
    try:
        setup_needed = _apply_form(_settings(portal))
    except ValueError as exc:
        body = render(portal, is_admin=True, user_id=claims.get("u"), error=str(exc))
        return framed_by(make_response(body, 400), origin)
    db.session.commit()
    if setup_needed:  # new lines to add, or events to rebind for the new event mode
        enqueue("setup_portal", portal.id)
    body = render(portal, is_admin=True, user_id=claims.get("u"), notice="Settings saved.")
    return framed_by(make_response(body), origin)


def parse_lines(text: str) -> list[dict[str, str]]:
    """``NUMBER [name]`` per line → ``[{"number", "name"}]``; raises ValueError when malformed."""
    lines: list[dict[str, str]] = []
    seen: set[str] = set()
    for raw in text.splitlines():
        raw = raw.strip()
        if not raw:
            continue
        number, _, name = raw.partition(" ")
        if len(number) > 32 or not number.replace("+", "", 1).replace("-", "").isalnum():
            raise ValueError(f"line number {number[:40]!r} is not valid")
        if number not in seen:
            seen.add(number)
            lines.append({"number": number, "name": name.strip()[:100] or number})
    if len(lines) > MAX_LINES:
        raise ValueError(f"at most {MAX_LINES} lines")
    return lines


def _apply_form(settings: PortalSettings) -> bool:
    """Copy the form into ``settings``; True when the lines or the event mode changed."""
    mode = request.form.get("event_mode", settings.event_mode)
    if mode not in EVENT_MODES:
        raise ValueError("event mode must be online or offline")
    lines = parse_lines(request.form.get("lines", ""))
    changed = lines != (settings.lines or []) or mode != settings.event_mode
    settings.event_mode = mode
    settings.lines = lines
    settings.crm_create = request.form.get("crm_create") == "1"
    return changed
