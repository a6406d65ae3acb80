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

import placements.page_session as page_session
from app.extensions import db
from app.framing import framed_by
from app.ingress import inbox, provisional
from app.ingress.retention import Retention
from app.installation import settings_form
from app.installation.iframe import open_iframe
from app.installation.verify import InstallError, PortalHeld
from app.tenants.models import Portal, PortalSettings
from app.tenants.users import extension_map
from placements.common import advice, error_page
from placements.settings import form_token

log = logging.getLogger(__name__)
bp = Blueprint("settings", __name__, template_folder="templates")

DEAD_LETTERS_SHOWN = 10
AWAITING_TOKEN = ("Waiting for Bitrix24's install event; events are kept and checked when it "
                  "arrives.")


def _settings(portal: Portal) -> PortalSettings:
    if portal.settings is None:
        portal.settings = PortalSettings()
        db.session.commit()
    return portal.settings


def render(portal: Portal, *, is_admin: bool, user_id: int | None, notice: str = "",
           error: str = "", recovered: bool = False, lines_text: str | None = None,
           lang: str | None = None) -> str:
    """The settings page for ``portal``; an admin's carries a fresh single-use form token."""
    settings = _settings(portal)
    page = (page_session.from_token(page_session.issue(portal, user_id, is_admin,
                                                       lang or portal.language))
            if user_id is not None else None)
    return render_template(
        "settings/settings.html", page=page, portal=portal, settings=settings,
        advice=_advice(portal),
        inbox_counts=_inbox_counts(portal) if is_admin else {},
        dead=inbox.dead_letters(portal.id, DEAD_LETTERS_SHOWN) if is_admin else [],
        dead_days=int(Retention.from_config().dead_days),
        is_admin=is_admin, token=form_token.issue(portal, user_id) if is_admin else "",
        lines_text=settings_form.lines_text(settings) if lines_text is None else lines_text,
        extensions=sorted(extension_map(portal).items()), notice=notice, error=error,
        recovered=recovered, modes=settings_form.EVENT_MODES)


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
                  notice=notice, recovered=session.recovered, lang=session.auth.lang)
    return framed_by(make_response(body), session.auth.origin)


def _save() -> Response:
    try:
        grant = form_token.redeem(request.form.get("form_token", ""))
    except form_token.FormRefused as exc:
        # A token we signed names its portal: that portal frames the refusal. A forged one: nobody.
        return error_page(exc.message, exc.status, exc.portal.origin if exc.portal else None)
    portal, user_id = grant.portal, grant.user_id
    _settings(portal)
    try:
        applied = settings_form.apply(portal, _form_values())
    except settings_form.Invalid as exc:  # nothing written; the admin's text comes back
        body = render(portal, is_admin=True, user_id=user_id, error=str(exc),
                      lines_text=request.form.get("lines", ""))
        return framed_by(make_response(body, 400), portal.origin)
    db.session.commit()
    log.info("settings of portal %s saved by user %s", portal.member_id, user_id)
    settings_form.after_commit(portal, applied)
    body = render(portal, is_admin=True, user_id=user_id, notice="Settings saved.")
    return framed_by(make_response(body), portal.origin)


def _form_values() -> dict[str, str]:
    """The page's fields as settings text (validated by app/installation/settings_form.py,
    as ``flask portals settings`` is): an unticked box is a field the browser leaves out."""
    values = {"lines": request.form.get("lines", ""),
              "crm_create": "1" if request.form.get("crm_create") == "1" else "0"}
    if "event_mode" in request.form:  # left out: kept as it is
        values["event_mode"] = request.form["event_mode"]
    return values
