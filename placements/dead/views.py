"""Dead letters (issue 24 point 4): the portal's events and commands that failed for good.

``GET /placements/app/dead-letters`` lists the inbox's dead events and the outbox's dead
commands of the session's portal: the kind (event type, REST method), when, how many
attempts, why, and the stored body or params with every secret hidden
(placements/dead/redact.py). Administrators only: the bodies are the portal's business data.

``POST`` the same URL: retry or discard one letter, or all of one kind. It needs an admin
page session and the single-use form token (the CSRF check; a replay changes nothing).

- Retry: an event goes back to the inbox queue with fresh attempts and a worker handles it
  again; a command is queued again with fresh attempts and the portal's dispatcher sends it.
- Discard: the row is deleted, as retention would delete it after its days, and a log line
  records what went (portal, id, kind, reason) as the audit trail. A dead command whose
  outcome has not reached its handler yet, or that a waiting command depends on, is kept.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, make_response, render_template, request
from flask_babel import gettext as _

import placements.page_session as page_session
from app.dispatcher import outbox
from app.extensions import db
from app.ingress import inbox
from app.tenants.models import aware
from placements.dead import redact
from placements.settings import form_token

log = logging.getLogger(__name__)
bp = Blueprint("dead", __name__, template_folder="templates")

SHOWN = 100  # letters listed per box; the kinds table counts them all
ACTIONS = ("retry", "discard")
BOXES = ("inbox", "outbox")


@bp.get("/placements/app/dead-letters")
@page_session.page(admin=True)
def dead_letters(page: page_session.PageSession) -> Response:
    """The portal's dead letters, inbox and outbox, with their actions."""
    return _render(page)


@bp.post("/placements/app/dead-letters")
@page_session.page(admin=True)
def dead_letters_action(page: page_session.PageSession) -> Response:
    """Retry or discard one dead letter, or all of a kind; the page again, saying what happened."""
    try:
        grant = form_token.redeem(request.form.get("form_token", ""))
    except form_token.FormRefused as exc:
        return _render(page, error=exc.message, status=exc.status)
    if grant.portal.id != page.portal.id or grant.user_id != page.user_id:
        return _render(page, status=403,
                       error=_("The form belongs to another portal or user; nothing was done."))
    action, box = request.form.get("action", ""), request.form.get("box", "")
    if action not in ACTIONS or box not in BOXES:
        return _render(page, error=_("Unknown action; nothing was done."), status=400)
    ids = _chosen(page.portal.id, box)
    if not ids:
        return _render(page, error=_("Nothing to do: these dead letters are gone already."),
                       status=404)
    notice = (_retry if action == "retry" else _discard)(page, box, ids)
    return _render(page, notice=notice)


def _chosen(portal_id: int, box: str) -> list[int]:
    """The ids the form names: one (``id``) or all of a kind (``kind``), the portal's only."""
    kind, raw_id = request.form.get("kind", ""), request.form.get("id", "")
    if raw_id:
        if not raw_id.isdigit():
            return []
        among = [int(raw_id)]
        return (inbox.dead_ids(portal_id, among=among) if box == "inbox"
                else outbox.dead_ids(portal_id, among=among))
    if not kind:
        return []
    if box == "inbox":
        source, _sep, event_type = kind.partition(":")
        return inbox.dead_ids(portal_id, source, event_type)
    return outbox.dead_ids(portal_id, kind)


def _retry(page: page_session.PageSession, box: str, ids: list[int]) -> str:
    if box == "inbox":
        done = inbox.replay_dead(ids, portal_id=page.portal.id)  # commits and queues
    else:
        done = outbox.replay_dead(ids, portal_id=page.portal.id)
        db.session.commit()  # the dispatcher is nudged after this commit
    log.info("%s dead letters %s of portal %s retried by user %s", box, done,
             page.portal.member_id, page.user_id)
    return _("%(n)s dead letter(s) sent again.", n=len(done))


def _discard(page: page_session.PageSession, box: str, ids: list[int]) -> str:
    log.info("%s dead letters %s of portal %s discarded by user %s", box, ids,
             page.portal.member_id, page.user_id)
    if box == "inbox":
        gone = inbox.discard_dead(ids, page.portal.id)
        db.session.commit()
        return _("%(n)s dead letter(s) discarded.", n=len(gone))
    result = outbox.discard_dead(ids, page.portal.id)
    db.session.commit()
    notice = _("%(n)s dead letter(s) discarded.", n=len(result.ids))
    if result.kept:
        notice += " " + _("%(n)s kept for now: their outcome is still on its way to the app, or "
                          "a waiting command depends on them. Try again in a minute.",
                          n=len(result.kept))
    return notice


def _render(page: page_session.PageSession, notice: str = "", error: str = "",
            status: int = 200) -> Response:
    portal = page.portal
    secrets = redact.portal_secrets(portal)
    events = inbox.dead_letters(portal.id, SHOWN)
    bodies = inbox.dead_payloads(portal.id, [e.id for e in events])
    commands = outbox.dead_letters(portal.id, SHOWN)
    body = render_template(
        "dead/dead_letters.html", page=page, portal=portal, notice=notice, error=error,
        token=form_token.issue(portal, page.user_id),
        event_kinds=sorted(inbox.dead_kinds(portal.id).items()),
        command_kinds=sorted(outbox.dead_kinds(portal.id).items()),
        events=[{"id": e.id, "kind": f"{e.source}:{e.event_type}", "source": e.source,
                 "event_type": e.event_type, "at": e.received_at, "attempts": e.attempts,
                 "reason": redact.text(e.reason, secrets),
                 "body": redact.pretty(bodies.get(e.id, {}), secrets)} for e in events],
        commands=[{"id": c.id, "method": c.method, "attempts": c.attempts,
                   "at": aware(c.completed_at or c.submitted_at),
                   "reason": redact.text(_reason(c.dead_reason, c.error), secrets),
                   "body": redact.pretty(c.params or {}, secrets)} for c in commands])
    return make_response(body, status)


def _reason(dead_reason: str | None, error: dict[str, Any] | None) -> str:
    """Why a command died: the dispatcher's reason, and Bitrix24's error when it gave one."""
    reason = dead_reason or ""
    if isinstance(error, dict) and error.get("error"):
        said = f"{error['error']}: {error.get('error_description') or ''}".rstrip(": ")
        if said not in reason:
            reason = f"{reason}; {said}" if reason else said
    return reason
