"""The app's own page (DEFAULT placement): the portal's state and its settings, and the
self-diagnosis page.

``POST /placements/settings`` from the portal iframe is verified server-side (§7.4) and shows
the page with a signed page session (:mod:`placements.page_session`); ``GET
/placements/app/settings`` and ``GET /placements/app/diagnosis`` are the same app's sections,
reached with that session. An administrator's page carries signed, short-lived, single-use
form tokens (:mod:`placements.settings.form_token`), one per form: every change needs an
administrator's session and an unspent token of the same portal, so saving needs no cookie
inside the cross-site iframe and a replayed form changes nothing.

When Bitrix24 answers the admin check with the portal's state (unpaid, uninstalled,
deleted) the page still opens, read-only, with that state and what to do about it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import Blueprint, Response, jsonify, make_response, render_template, request
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from sqlalchemy import select

import placements.page_session as page_session
from app.extensions import db
from app.framing import framed_by
from app.i18n import use_language
from app.ingress import inbox, provisional
from app.ingress.auth import issue_api_key
from app.ingress.models import PortalApiKey
from app.ingress.retention import Retention
from app.installation import diagnosis, settings_form
from app.installation import diagnosis_text as words
from app.installation.iframe import open_iframe
from app.installation.verify import InstallError, PortalHeld
from app.queue import enqueue
from app.tenants.models import Portal, PortalSettings
from app.tenants.users import (
    PortalUser,
    extension_map,
    find_user,
    overrides,
    set_override,
    unset_override,
)
from placements.common import advice, error_page
from placements.settings import form_token, pbx_test

log = logging.getLogger(__name__)
bp = Blueprint("settings", __name__, template_folder="templates")

DEAD_LETTERS_SHOWN = 10
AWAITING_TOKEN = _l("Waiting for Bitrix24's install event; events are kept and checked when "
                    "it arrives.")
SYNC_ACTOR = "sync_portal_users"  # workers/install.py
# The page's fields: text inputs and selects sent as they are (a field left out is kept).
TEXT_FIELDS = ("event_mode", "lines", "default_user_id", "pbx_originate_url",
               *settings_form.CALL_OPTIONS, *settings_form.LIMITS)
YES_NO_FIELDS = ("add_to_chat", "route_skip_absent", "sequential")  # selects: "", "1", "0"
CHECK_TRIGGER = "page"


def _settings(portal: Portal) -> PortalSettings:
    if portal.settings is None:
        portal.settings = PortalSettings()
        db.session.commit()
    return portal.settings


def render(portal: Portal, *, is_admin: bool, user_id: int | None, notice: str = "",
           error: str = "", recovered: bool = False, lines_text: str | None = None,
           lang: str | None = None, page: page_session.PageSession | None = None,
           errors: dict[str, str] | None = None, typed: dict[str, str] | None = None,
           status: int = 200, **shown_once: Any) -> Response:
    """The settings page for ``portal``; an admin's carries fresh single-use form tokens.

    ``errors`` and ``typed``: a refused save's messages by field and the values the admin
    typed, shown again. ``shown_once``: a new API key or PBX secret, or a test's answer.
    """
    settings = _settings(portal)
    if page is None and (user_id is not None or is_admin):  # an admin's forms need one
        page = page_session.from_token(page_session.issue(portal, user_id, is_admin,
                                                          lang or portal.language))
    values = _stored_values(settings)
    if typed:
        values.update(typed)
    if lines_text is not None:
        values["lines"] = lines_text
    body = render_template(
        "settings/settings.html", page=page, portal=portal, settings=settings,
        advice=_advice(portal), is_admin=is_admin,
        inbox_counts=_inbox_counts(portal) if is_admin else {},
        dead=inbox.dead_letters(portal.id, DEAD_LETTERS_SHOWN) if is_admin else [],
        dead_days=int(Retention.from_config().dead_days),
        tokens=_tokens(portal, user_id) if is_admin else {},
        values=values, errors=errors or {}, extensions=sorted(extension_map(portal).items()),
        users=_users(portal), overrides=overrides(portal) if is_admin else [],
        api_key=_api_key(portal) if is_admin else None,
        defaults={key: settings_form.effective(None, key) for key in settings_form.CALL_OPTIONS},
        automatic=settings_form.automatic(portal),
        outgoing=_outgoing_line(portal), notice=notice, error=error, recovered=recovered,
        modes=settings_form.EVENT_MODES, policies=settings_form.CALL_POLICIES, **shown_once)
    return make_response(body, status)


def _stored_values(settings: PortalSettings) -> dict[str, str]:
    """The form's fields as the stored settings fill them (NULL call options: "")."""
    values = {key: "" if getattr(settings, key, None) is None else str(getattr(settings, key))
              for key in TEXT_FIELDS if key != "lines"}
    for key in YES_NO_FIELDS:
        if getattr(settings, key, None) is not None:
            values[key] = "1" if getattr(settings, key) else "0"
    if settings.route_priority == "":
        values["route_priority"] = settings_form.NEVER  # "" in the form is the app's default
    values["lines"] = settings_form.lines_text(settings)
    values["crm_create"] = "1" if settings.crm_create or settings.crm_create is None else "0"
    return values


# One token per form of the page: each is spent by its own post.
FORMS = ("save", "test_originate", "rotate_key", "override_add", "override_remove",
         "sync_users")


def _tokens(portal: Portal, user_id: int | None) -> dict[str, str]:
    return {name: form_token.issue(portal, user_id) for name in FORMS}


def _users(portal: Portal) -> list[PortalUser]:
    return list(db.session.scalars(select(PortalUser).where(
        PortalUser.portal_id == portal.id).order_by(PortalUser.active.desc(),
                                                    PortalUser.user_id)))


def _api_key(portal: Portal) -> PortalApiKey | None:
    return db.session.scalars(select(PortalApiKey).where(
        PortalApiKey.portal_id == portal.id)).first()


def _outgoing_line(portal: Portal) -> dict[str, Any] | None:
    """The last self-diagnosis's finding about the default outgoing line, in words."""
    last = diagnosis.last_report(portal)
    found = last[0].finding("outgoing_line") if last else None
    if found is None or last is None:
        return None
    summary, todo = words.render(found.code, found.key, found.facts, _quoted(portal))
    return {"level": found.level.value, "summary": summary, "advice": todo,
            "checked_at": last[1].checked_at}


def _quoted(portal: Portal) -> dict[str, str]:
    return {"member_id": portal.member_id, "domain": portal.domain}


def _advice(portal: Portal) -> str:
    """The status line's advice; "connected" only once events can be verified."""
    if provisional.awaiting_token(portal):
        return str(AWAITING_TOKEN)
    return advice(portal)


def _inbox_counts(portal: Portal) -> dict[str, int]:
    return {**inbox.depth(portal.id), provisional.STATUS: provisional.kept(portal.id)}


# ---------------------------------------------------------------- opening the page


@bp.get("/placements/settings")
def settings_get() -> Response:
    """Opened outside the portal: there is nothing to verify, so say where to open it."""
    return error_page(_("This page opens inside Bitrix24 (Applications → b24relay)."), 400)


@bp.post("/placements/settings")
def settings_post() -> Response:
    """The iframe POST from the portal, or the admin's form submission."""
    if "form_token" in request.form:
        return _save()
    return _show()


@bp.get("/placements/app/settings")
@page_session.page()
def settings_page(page: page_session.PageSession) -> Response:
    """The settings section, reached from another page of the app with the page session."""
    return render(page.portal, is_admin=page.is_admin, user_id=page.user_id, page=page)


def _show() -> Response:
    """Verify the iframe POST (as ``placements.common.verified``) and show the page."""
    try:
        session = open_iframe(request.args, request.form)
    except PortalHeld as exc:
        if exc.portal is None:
            return error_page(exc.message, exc.status)
        # Not about the user: the portal is unpaid, uninstalled or gone. Say so, read-only.
        db.session.commit()
        return framed_by(render(exc.portal, is_admin=False, user_id=None), exc.portal.origin)
    except InstallError as exc:
        return error_page(exc.message, exc.status)
    db.session.commit()  # the open is the unit of work (a recovered chain is kept)
    notice = _("The app is connected again.") if session.recovered else ""
    body = render(session.portal, is_admin=session.is_admin, user_id=session.user_id,
                  notice=notice, recovered=session.recovered, lang=session.auth.lang)
    return framed_by(body, session.auth.origin)


# ---------------------------------------------------------------- saving


def _session_along() -> page_session.PageSession | None:
    """The page session a form carries (``s``), if any; its language is the page's."""
    raw = request.form.get(page_session.FIELD) or request.headers.get(page_session.HEADER)
    if not raw:
        return None
    session = page_session.from_token(raw)
    use_language(session.lang)
    return session


def _save() -> Response:
    try:
        along = _session_along()
    except page_session.SessionRefused as exc:
        return error_page(exc.message, exc.status, exc.portal.origin if exc.portal else None)
    try:
        grant = form_token.redeem(request.form.get("form_token", ""))
    except form_token.FormRefused as exc:
        # A token we signed names its portal: that portal frames the refusal. A forged one: nobody.
        return error_page(exc.message, exc.status, exc.portal.origin if exc.portal else None)
    portal, user_id = grant.portal, grant.user_id
    if along is not None and along.portal.id != portal.id:
        return error_page(_("The form belongs to another portal; nothing was saved."), 403,
                          portal.origin)
    if along is not None and not along.is_admin:
        return error_page(_("Only a portal administrator can do this."), 403, portal.origin)
    if along is None:
        use_language(portal.language)
    _settings(portal)
    typed = _form_values()
    try:
        applied = settings_form.apply(portal, typed)
    except settings_form.Invalid as exc:  # nothing written; the admin's text comes back
        db.session.rollback()
        body = render(portal, is_admin=True, user_id=user_id, page=along, errors=exc.errors,
                      error=_("Nothing was saved: correct the fields marked below."),
                      typed=_typed_back(typed), status=400)
        return framed_by(body, portal.origin)
    db.session.commit()
    log.info("settings of portal %s saved by user %s", portal.member_id, user_id)
    settings_form.after_commit(portal, applied)
    body = render(portal, is_admin=True, user_id=user_id, page=along,
                  notice=_("Settings saved."), new_secret=applied.new_secret)
    return framed_by(body, portal.origin)


def _typed_back(typed: dict[str, str]) -> dict[str, str]:
    """What the admin typed, to show again; never a secret."""
    return {key: value for key, value in typed.items() if key not in settings_form.SECRETS}


def _form_values() -> dict[str, str]:
    """The page's fields as settings text (validated by app/installation/settings_form.py,
    as ``flask portals settings`` is): a field left out is kept as it is, except the
    unticked box, which the browser leaves out; an empty secret is kept too (write-only)."""
    values = {key: request.form[key] for key in TEXT_FIELDS if key in request.form}
    values.setdefault("lines", "")
    values["crm_create"] = "1" if request.form.get("crm_create") == "1" else "0"
    secret = request.form.get("pbx_secret", "").strip()
    if secret:
        values["pbx_secret"] = secret
    return values


# ---------------------------------------------------------------- the page's other forms


def _spent(view: Callable[..., Response]) -> Callable[..., Response]:
    """Decorator for an admin action: the post's single-use form token is redeemed for the
    session's own portal first (the CSRF check); a refusal is the answer and nothing runs."""

    @wraps(view)
    def wrapper(page: page_session.PageSession, *args: Any, **kwargs: Any) -> Response:
        try:
            grant = form_token.redeem(request.form.get("form_token", ""))
        except form_token.FormRefused as exc:
            return error_page(exc.message, exc.status,
                              exc.portal.origin if exc.portal else None)
        if grant.portal.id != page.portal.id:
            return error_page(_("The form belongs to another portal; nothing was changed."),
                              403, page.portal.origin)
        return view(page, *args, **kwargs)

    return wrapper


def _again(page: page_session.PageSession, **shown: Any) -> Response:
    return render(page.portal, is_admin=True, user_id=page.user_id, page=page, **shown)


@bp.post("/placements/app/settings/api-key")
@page_session.page(admin=True)
@_spent
def rotate_key(page: page_session.PageSession) -> Response:
    """Create or rotate the portal's PBX API key; the new key is shown on this answer only."""
    key = issue_api_key(page.portal)  # commits; the old key stops working at once
    log.info("API key of portal %s rotated by user %s", page.portal.member_id, page.user_id)
    return _again(page, new_key=key)


@bp.post("/placements/app/settings/test-originate")
@page_session.page(admin=True)
@_spent
def test_originate(page: page_session.PageSession) -> Response:
    """Send the PBX one signed test originate and show its answer."""
    settings = _settings(page.portal)
    if not settings.pbx_originate_url or not settings.pbx_secret:
        return _again(page, error=_("Set the PBX originate URL and its secret first, then "
                                    "send a test."))
    answer = pbx_test.send(settings)
    db.session.commit()  # nothing written: end the read before the page's tokens
    return _again(page, pbx_answer=answer)


@bp.post("/placements/app/settings/overrides")
@page_session.page(admin=True)
@_spent
def override_add(page: page_session.PageSession) -> Response:
    """Add (or replace) an extension override: an extension the PBX uses → a user."""
    extension = request.form.get("extension", "").strip()
    user_text = request.form.get("user_id", "").strip()
    errors = {}
    if not extension or len(extension) > 64:
        errors["override_extension"] = _("Enter the extension the PBX sends (at most 64 "
                                         "characters).")
    user = find_user(page.portal, int(user_text)) if user_text.isdigit() else None
    if user is None or not user.active:
        errors["override_user"] = _("Choose an active user of this portal.")
    if errors:
        return _again(page, errors=errors, status=400,
                      typed={"override_extension": extension, "override_user": user_text})
    set_override(page.portal, extension, int(user_text), request.form.get("note", ""))
    db.session.commit()
    return _again(page, notice=_("Extension %(ext)s now rings %(name)s.", ext=extension,
                                 name=user.name if user else user_text))


@bp.post("/placements/app/settings/overrides/remove")
@page_session.page(admin=True)
@_spent
def override_remove(page: page_session.PageSession) -> Response:
    """Remove an extension override."""
    extension = request.form.get("extension", "")
    removed = unset_override(page.portal, extension)
    db.session.commit()
    notice = (_("The override of %(ext)s is removed.", ext=extension) if removed
              else _("There was no override of %(ext)s.", ext=extension))
    return _again(page, notice=notice)


@bp.post("/placements/app/settings/sync-users")
@page_session.page(admin=True)
@_spent
def sync_users(page: page_session.PageSession) -> Response:
    """Ask a worker to read the portal's users and extensions again now."""
    enqueue(SYNC_ACTOR, page.portal.id)
    return _again(page, notice=_("The user list is being read again; reload the page in a "
                                 "minute."))


# ---------------------------------------------------------------- the self-diagnosis


def _report_view(portal: Portal) -> dict[str, Any] | None:
    """The last report in words: when, what started it, each finding with what to do."""
    last = diagnosis.last_report(portal)
    if last is None:
        return None
    report, row = last
    findings = []
    for f in report.findings:
        summary, todo = words.render(f.code, f.key, f.facts, _quoted(portal))
        findings.append({"code": f.code, "level": f.level.value,
                         "check": words.translated(words.CHECKS.get(f.code, f.code)),
                         "summary": summary, "advice": todo})
    return {"checked_at": row.checked_at, "trigger": row.trigger, "level": report.level.value,
            "seconds": report.seconds, "findings": findings,
            "errors": report.count(diagnosis.Level.ERROR),
            "warnings": report.count(diagnosis.Level.WARN)}


def _checked_at(portal: Portal) -> str:
    last = diagnosis.last_report(portal)
    return last[1].checked_at.isoformat() if last else ""


def _diagnosis_page(page: page_session.PageSession, *, checking_since: str | None = None,
                    error: str = "", status: int = 200) -> Response:
    body = render_template(
        "settings/diagnosis.html", page=page, portal=page.portal, report=_report_view(page.portal),
        is_admin=page.is_admin, token=form_token.issue(page.portal, page.user_id)
        if page.is_admin else "", checking_since=checking_since, error=error)
    return make_response(body, status)


@bp.get("/placements/app/diagnosis", endpoint="diagnosis")
@page_session.page()
def diagnosis_page(page: page_session.PageSession) -> Response:
    """The last self-diagnosis report, each finding with what to do."""
    return _diagnosis_page(page)


@bp.post("/placements/app/diagnosis")
@page_session.page(admin=True)
@_spent
def diagnosis_check(page: page_session.PageSession) -> Response:
    """Run the check now (a worker does it); the page waits for the new report."""
    since = _checked_at(page.portal)
    db.session.commit()
    if not diagnosis.request_check(page.portal, CHECK_TRIGGER, delay=0):
        return _diagnosis_page(page, error=_("The check could not be started just now; try "
                                             "again in a minute."), status=503)
    return _diagnosis_page(page, checking_since=since)


@bp.get("/placements/app/diagnosis/last")
@page_session.page(as_json=True)
def diagnosis_last(page: page_session.PageSession) -> Response:
    """When the last report was made (the page polls it while a check runs)."""
    return jsonify(checked_at=_checked_at(page.portal))
