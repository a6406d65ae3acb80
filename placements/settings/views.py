"""The app's own page (DEFAULT placement): the portal's state and its settings.

``POST /placements/settings`` from the portal iframe is verified server-side
(§7.4); an administrator gets a form carrying a signed, short-lived, single-use
token (:mod:`placements.settings.form_token`), so saving needs no cookie inside
the cross-site iframe.

When Bitrix24 answers the admin check with the portal's state (unpaid, uninstalled,
deleted) the page still opens, read-only, with that state and what to do about it.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, make_response, render_template, request

from app.extensions import db
from app.framing import framed_by
from app.ingress import inbox, provisional
from app.ingress.retention import Retention
from app.installation import upkeep
from app.installation.iframe import open_iframe
from app.installation.plan import removed_lines
from app.installation.verify import InstallError, PortalHeld
from app.queue import enqueue
from app.tenants.models import Portal, PortalSettings
from app.tenants.users import extension_map
from placements.common import advice, error_page
from placements.settings import form_token

log = logging.getLogger(__name__)
bp = Blueprint("settings", __name__, template_folder="templates")

EVENT_MODES = ("online", "offline")
MAX_LINES = 40
DEAD_LETTERS_SHOWN = 10
AWAITING_TOKEN = ("Waiting for Bitrix24's install event; events are kept and checked when it "
                  "arrives.")


def _settings(portal: Portal) -> PortalSettings:
    if portal.settings is None:
        portal.settings = PortalSettings()
        db.session.commit()
    return portal.settings


def render(portal: Portal, *, is_admin: bool, user_id: int | None, notice: str = "",
           error: str = "", recovered: bool = False, lines_text: str | None = None) -> str:
    """The settings page for ``portal``; an admin's carries a fresh single-use form token."""
    settings = _settings(portal)
    return render_template(
        "settings/settings.html", portal=portal, settings=settings, advice=_advice(portal),
        inbox_counts=_inbox_counts(portal) if is_admin else {},
        dead=inbox.dead_letters(portal.id, DEAD_LETTERS_SHOWN) if is_admin else [],
        dead_days=int(Retention.from_config().dead_days),
        is_admin=is_admin, token=form_token.issue(portal, user_id) if is_admin else "",
        lines_text=_lines_text(settings) if lines_text is None else lines_text,
        extensions=sorted(extension_map(portal).items()), notice=notice, error=error,
        recovered=recovered, modes=EVENT_MODES)


def _advice(portal: Portal) -> str:
    """The status line's advice; "connected" only once events can be verified."""
    if provisional.awaiting_token(portal):
        return AWAITING_TOKEN
    return advice(portal)


def _inbox_counts(portal: Portal) -> dict[str, int]:
    return {**inbox.depth(portal.id), provisional.STATUS: provisional.kept(portal.id)}


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


def _show() -> Response:
    """Verify the iframe POST (as ``placements.common.verified``) and show the page."""
    try:
        session = open_iframe(request.args, request.form)
    except PortalHeld as exc:
        if exc.portal is None:
            return error_page(exc.message, exc.status)
        # Not about the user: the portal is unpaid, uninstalled or gone. Say so, read-only.
        db.session.commit()
        return framed_by(make_response(render(exc.portal, is_admin=False, user_id=None)),
                         exc.portal.origin)
    except InstallError as exc:
        return error_page(exc.message, exc.status)
    db.session.commit()  # the open is the unit of work (a recovered chain is kept)
    notice = "The app is connected again." if session.recovered else ""
    body = render(session.portal, is_admin=session.is_admin, user_id=session.user_id,
                  notice=notice, recovered=session.recovered)
    return framed_by(make_response(body), session.auth.origin)


def _lines_text(settings: PortalSettings) -> str:
    return "\n".join(f"{line.get('number')} {line.get('name') or ''}".strip()
                     for line in settings.lines or [])


def _save() -> Response:
    try:
        grant = form_token.redeem(request.form.get("form_token", ""))
    except form_token.FormRefused as exc:
        # A token we signed names its portal: that portal frames the refusal. A forged one: nobody.
        return error_page(exc.message, exc.status, exc.portal.origin if exc.portal else None)
    portal, user_id = grant.portal, grant.user_id
    settings = _settings(portal)
    before = list(settings.lines or [])
    try:
        setup_needed = _apply_form(settings)
    except ValueError as exc:  # nothing written; the admin's text comes back with the error
        body = render(portal, is_admin=True, user_id=user_id, error=str(exc),
                      lines_text=request.form.get("lines", ""))
        return framed_by(make_response(body, 400), portal.origin)
    removed = removed_lines(before, settings.lines)
    if removed:  # deleted from Bitrix24 with the save: committed together (§8.2)
        upkeep.submit_line_deletes(portal, removed)
    db.session.commit()
    log.info("settings of portal %s saved by user %s", portal.member_id, user_id)
    if setup_needed:  # lines to add or rename, or events to rebind for the new event mode
        enqueue("setup_portal", portal.id)
    body = render(portal, is_admin=True, user_id=user_id, notice="Settings saved.")
    return framed_by(make_response(body), portal.origin)


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
    """Copy the form into ``settings``; True when the lines, the event mode or the CRM
    setting changed (each line's CRM_AUTO_CREATE follows crm_create)."""
    mode = request.form.get("event_mode", settings.event_mode)
    if mode not in EVENT_MODES:
        raise ValueError("event mode must be online or offline")
    lines = parse_lines(request.form.get("lines", ""))
    crm_create = request.form.get("crm_create") == "1"
    changed = (lines != (settings.lines or []) or mode != settings.event_mode
               or crm_create != bool(settings.crm_create))
    settings.event_mode = mode
    settings.lines = lines
    settings.crm_create = crm_create
    return changed
