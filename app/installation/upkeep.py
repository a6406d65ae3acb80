"""Keeping an installation set up, through the dispatcher: commands now, outcomes later.

Work nobody waits on in an HTTP request (issue #12 point 10) does not call Bitrix24 here.
It submits commands to the portal's outbox (:mod:`app.dispatcher`) in the caller's
transaction: an event handler's commands are committed with its inbox row marked done,
so a retried event never sends twice and a processed one never loses them. What must
happen with an answer runs once its command has finished, done or not, in an outcome
handler registered under a tag owned here (``OUTCOME_HANDLERS``, registered by the app
factory); it receives the command's ``Outcome`` and reads no dispatcher table:

* **setup** (ONAPPUPDATE, the settings page): the reads of ``plan.READ_COMMANDS``
  share one ordering key made for this run, so they leave in order, in one batch. Only
  the last one has a handler (:func:`setup_read`); it takes the earlier reads' outcomes
  from the dispatcher (``app.dispatcher.earlier``: the outcomes of the earlier commands
  of its key, or NotYet while one is still on its way), submits the bindings still
  missing, and takes the first page of users;
* **user sync** (periodic, and after setup): one ``user.get`` page at a time; each
  page's handler (:func:`users_page`) upserts it and submits the next while pages
  are full. The portal's ``users_sync_status`` says where the sync stands: running,
  done, or failed with ``users_sync_error`` when a page's read died (``flask portals show``);
* **ONUSERADD**: ``user.get`` for that user; :func:`user_fetched` upserts it.
* **external lines** (§8.2): the setup's line writes, and the deletes of lines an
  administrator removed from the settings (:func:`submit_line_deletes`), share the portal's
  key ``lines:<portal>``, so a removal and a later re-adding of one number leave in order.
  An add answered "Line already exists" is followed by an update (:func:`line_added`); a
  delete answered "Could not find line with number X" counts as done (:func:`line_deleted`).

The dispatcher paces these with the portal's bucket, packs up to 50 a batch and retries
transient failures until its retry horizon (hours), so a burst of events, a Bitrix24
outage or a slow portal costs delay, never events; and a slow portal holds no worker
thread. The ``/install`` request runs the same plan directly (app.installation.setup): a person
waits on it, and ONAPPINSTALL must be bound before the installer page finishes.

The handlers are idempotent (upserts; a binding bound twice is refused by Bitrix24 as
already there): an outcome may be handled again after a crash.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from app.dispatcher import Outcome, Priority, earlier, submit
from app.extensions import db
from app.installation import plan
from app.installation.user_sync import sync_users, upsert_user
from app.tenants.models import Portal, utcnow
from app.tenants.status import is_held
from app.tenants.users import PortalUser

log = logging.getLogger(__name__)

# Outcome handler tags: owned by this use case (the dispatcher stores them on commands).
SETUP_READ = "installation.setup_read"
USERS_PAGE = "installation.users_page"
USER_FETCHED = "installation.user_fetched"
LINE_ADDED = "installation.line_added"
LINE_DELETED = "installation.line_deleted"
PRIORITY = Priority.BULK  # upkeep never goes ahead of telephony's commands
SYNC_RUNNING, SYNC_DONE, SYNC_FAILED = "running", "done", "failed"


def submit_setup(portal: Portal) -> int:
    """Submit the setup reads (flushed); returns the last one's id (:func:`setup_read` follows)."""
    key = f"setup:{portal.id}:{uuid.uuid4().hex[:16]}"
    names = list(plan.READ_COMMANDS)
    last = 0
    for name in names:
        method, params = plan.READ_COMMANDS[name]
        last = submit(portal.id, method, params, key=key, priority=PRIORITY,
                      handler=SETUP_READ if name == names[-1] else None)
    return last


def submit_user_sync(portal: Portal, start: int = 0) -> int:
    """Submit one page of ``user.get`` from ``start`` (flushed); :func:`users_page` follows."""
    if not start:
        _sync_state(portal, SYNC_RUNNING)
    params = {"start": start} if start else {}
    return submit(portal.id, "user.get", params, priority=PRIORITY, handler=USERS_PAGE)


def submit_user_fetch(portal: Portal, user_id: int) -> int:
    """Submit ``user.get`` for one user (flushed); :func:`user_fetched` follows."""
    return submit(portal.id, "user.get", {"ID": user_id}, priority=PRIORITY,
                  handler=USER_FETCHED)


def _lines_key(portal_id: int) -> str:
    return f"lines:{portal_id}"


def submit_line(portal: Portal, method: str, params: dict[str, Any]) -> int:
    """Submit one external-line write under the portal's lines key (flushed)."""
    return submit(portal.id, method, params, key=_lines_key(portal.id), priority=PRIORITY,
                  handler={plan.LINE_ADD: LINE_ADDED, plan.LINE_DELETE: LINE_DELETED}.get(method))


def submit_line_deletes(portal: Portal, numbers: list[str]) -> list[int]:
    """Delete these lines from Bitrix24 (removed from the settings; flushed, caller commits)."""
    return [submit_line(portal, plan.LINE_DELETE, {"NUMBER": plan.line_number(number)})
            for number in numbers if plan.line_number(number)]


def line_added(outcome: Outcome) -> int | None:
    """An add's outcome: "Line already exists" means the line is there with whatever name
    and CRM_AUTO_CREATE it had (a register auto-created it, or a setup raced), so the same
    values go as an update; the update's id, if one was submitted."""
    if not outcome.ok or not plan.line_already_exists(outcome.error):
        if not outcome.ok:
            log.warning("portal %s: line %s not added (%s: %s)", outcome.portal_id,
                        outcome.params.get("NUMBER"), outcome.kind, outcome.reason)
        return None
    portal = _callable_portal(outcome)
    if portal is None:
        return None
    return submit_line(portal, plan.LINE_UPDATE, dict(outcome.params))


def line_deleted(outcome: Outcome) -> bool:
    """A delete's outcome; whether the line is gone ("Could not find line" counts as gone)."""
    gone = outcome.ok or plan.line_not_found(outcome.error)
    if not gone:
        log.warning("portal %s: line %s not deleted (%s: %s)", outcome.portal_id,
                    outcome.params.get("NUMBER"), outcome.kind, outcome.reason)
    return gone


def _callable_portal(outcome: Outcome) -> Portal | None:
    """The outcome's portal, or None when there is nothing to follow up."""
    portal = db.session.get(Portal, outcome.portal_id)
    if portal is None or is_held(portal.status):
        return None  # uninstalled or held since: its next setup or sync starts afresh
    return portal


def setup_read(outcome: Outcome) -> plan.SetupReport | None:
    """The setup reads are done: submit what is missing, take the first users (caller commits)."""
    portal = _callable_portal(outcome)
    if portal is None:
        return None
    state = _read_state(portal, [*earlier(outcome), outcome])
    if state is None:
        return None
    report = plan.SetupReport()
    writes, _ = plan.decide(portal, state, report)
    for method, params in writes.values():
        if method in (plan.LINE_ADD, plan.LINE_UPDATE):
            submit_line(portal, method, params)
        else:
            submit(portal.id, method, params, priority=PRIORITY)
    _sync_state(portal, SYNC_RUNNING)
    report.users = _take_page(portal, state["users"], 0)
    db.session.flush()
    log.info("portal %s: setup read; %d binding(s) submitted", portal.member_id, len(writes))
    return report


def _read_state(portal: Portal, reads: list[Outcome]) -> dict[str, Any] | None:
    """``{READ_COMMANDS name: result}`` from the run's reads, or None if one did not succeed."""
    by_method = {r.method: r for r in reads}
    state: dict[str, Any] = {}
    for name, (method, _) in plan.READ_COMMANDS.items():
        read = by_method.get(method)
        if read is None or not read.ok:
            why = f"{read.kind}: {read.reason}" if read is not None else "missing"
            log.warning("portal %s: setup stopped, %s did not succeed (%s)",
                        portal.member_id, method, why)
            return None
        state[name] = read.result
    return state


def users_page(outcome: Outcome) -> int:
    """A page of users arrived: upsert it, ask for the next while pages are full; its size.
    A page that died or whose outcome is unknown leaves the sync failed, with the reason."""
    portal = db.session.get(Portal, outcome.portal_id)
    if portal is None:
        return 0
    if not outcome.ok:
        _sync_state(portal, SYNC_FAILED, f"{outcome.method} {outcome.kind}: {outcome.reason}")
        log.warning("portal %s: user sync failed (%s)", portal.member_id, outcome.reason)
        db.session.flush()
        return 0
    if is_held(portal.status):
        return 0
    start = plan.int_or_none(outcome.params.get("start")) or 0
    return _take_page(portal, outcome.result, start)


def _take_page(portal: Portal, page: Any, start: int) -> int:
    records = [r for r in plan.as_list(page) if isinstance(r, dict) and "ID" in r]
    sync_users(portal, records)
    if len(records) >= plan.USER_PAGE:
        submit_user_sync(portal, start + len(records))
    else:
        _sync_state(portal, SYNC_DONE)
    db.session.flush()
    return len(records)


def _sync_state(portal: Portal, status: str, error: str | None = None) -> None:
    """Where the portal's user sync stands (shown by ``flask portals show``)."""
    portal.users_sync_status, portal.users_sync_error = status, error
    portal.users_sync_at = utcnow()


def user_fetched(outcome: Outcome) -> PortalUser | None:
    """One user's ``user.get`` is done: upsert them into the extension map (caller commits)."""
    wanted = str(outcome.params.get("ID"))
    if not outcome.ok:
        log.warning("portal %s: user %s not fetched (%s: %s)", outcome.portal_id, wanted,
                    outcome.kind, outcome.reason)
        return None
    portal = _callable_portal(outcome)
    if portal is None:
        return None
    record = next((r for r in plan.as_list(outcome.result)
                   if isinstance(r, dict) and str(r.get("ID")) == wanted), None)
    if record is None:
        return None
    row = upsert_user(portal, record)
    db.session.flush()
    return row


# Registered by the app factory (app/__init__.py): this use case owns its tags, not the dispatcher.
OUTCOME_HANDLERS = {SETUP_READ: setup_read, USERS_PAGE: users_page, USER_FETCHED: user_fetched,
                    LINE_ADDED: line_added, LINE_DELETED: line_deleted}
