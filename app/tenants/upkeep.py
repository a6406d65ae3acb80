"""Keeping an installation set up, through the dispatcher: commands now, follow-ups when done.

Work nobody waits on in an HTTP request (issue #12 point 10) does not call Bitrix24 here.
It submits commands to the portal's outbox (:mod:`app.dispatcher`) in the caller's
transaction: an event handler's commands are committed with its inbox row marked done,
so a retried event never sends twice and a processed one never loses them. What must
happen with an answer runs once its command is done, in an ``on_done`` actor
(workers/followups.py) that reads the command's stored result:

* **setup** (ONAPPUPDATE, the settings page): the reads of ``install.READ_COMMANDS``
  share one ordering key made for this run, so they leave in order, in one batch. The
  last one's follow-up (:func:`setup_read`) reads them all, submits the bindings still
  missing, and takes the first page of users;
* **user sync** (periodic, and after setup): one ``user.get`` page at a time; each
  page's follow-up (:func:`users_page`) upserts it and submits the next while pages
  are full;
* **ONUSERADD**: ``user.get`` for that user; :func:`user_fetched` upserts it.

The dispatcher paces these with the portal's bucket, packs up to 50 a batch and retries
transient failures until its retry horizon (hours), so a burst of events, a Bitrix24
outage or a slow portal costs delay, never events; and a slow portal holds no worker
thread. The ``/install`` request keeps its direct setup (app.tenants.install): a person
waits on it, and ONAPPINSTALL must be bound before the installer page finishes.

The follow-ups are idempotent (upserts; a binding bound twice is refused by Bitrix24 as
already there), since an on_done notification may be sent again after a crash.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select

from app.dispatcher import submit
from app.dispatcher.models import CommandStatus, OutboxCommand
from app.extensions import db
from app.installation import plan as install  # the setup plan (was app.tenants.install)
from app.installation.user_sync import sync_users, upsert_user
from app.tenants.models import Portal
from app.tenants.status import is_held
from app.tenants.users import PortalUser

log = logging.getLogger(__name__)

# on_done actors (workers/followups.py), named here: app/ does not import workers/.
SETUP_READ = "tenants_setup_read"
USERS_PAGE = "tenants_users_page"
USER_FETCHED = "tenants_user_fetched"
PRIORITY = "bulk"  # upkeep never goes ahead of telephony's real-time commands
UNFINISHED = frozenset({CommandStatus.QUEUED.value, CommandStatus.INFLIGHT.value})


class NotYet(Exception):  # noqa: N818 - an instruction to the actor, not a failure kind
    """An earlier read of the run is still on its way (requeued in its batch): look again later."""


def submit_setup(portal: Portal, inbox_event_id: int | None = None) -> int:
    """Submit the setup reads (flushed); returns the last one's id (:func:`setup_read` follows)."""
    key = f"setup:{portal.id}:{uuid.uuid4().hex[:16]}"
    names = list(install.READ_COMMANDS)
    last = 0
    for name in names:
        method, params = install.READ_COMMANDS[name]
        last = submit(portal, method, params, key=key, priority=PRIORITY,
                      on_done=SETUP_READ if name == names[-1] else None,
                      inbox_event_id=inbox_event_id)
    return last


def submit_user_sync(portal: Portal, start: int = 0) -> int:
    """Submit one page of ``user.get`` from ``start`` (flushed); :func:`users_page` follows."""
    params = {"start": start} if start else {}
    return submit(portal, "user.get", params, priority=PRIORITY, on_done=USERS_PAGE)


def submit_user_fetch(portal: Portal, user_id: int, inbox_event_id: int | None = None) -> int:
    """Submit ``user.get`` for one user (flushed); :func:`user_fetched` follows."""
    return submit(portal, "user.get", {"ID": user_id}, priority=PRIORITY, on_done=USER_FETCHED,
                  inbox_event_id=inbox_event_id)


def _done_command(command_id: int) -> tuple[OutboxCommand, Portal] | None:
    """A done command and its portal, or None when there is nothing to follow up."""
    command = db.session.get(OutboxCommand, command_id)
    if command is None or command.status != CommandStatus.DONE.value:
        return None
    portal = db.session.get(Portal, command.portal_id)
    if portal is None or is_held(portal.status):
        return None  # uninstalled or held since: its next setup or sync starts afresh
    return command, portal


def setup_read(command_id: int) -> install.SetupReport | None:
    """The setup reads are done: submit what is missing, take the first users (caller commits)."""
    found = _done_command(command_id)
    if found is None:
        return None
    command, portal = found
    state = _read_state(portal, command.key or "")
    if state is None:
        return None
    report = install.SetupReport()
    install.apply_plan(portal, state["app"], report)
    writes, _ = install.missing_bindings(portal, state)
    for method, params in writes.values():
        submit(portal, method, params, priority=PRIORITY)
    report.users = _take_page(portal, state["users"], 0)
    db.session.flush()
    log.info("portal %s: setup read; %d binding(s) submitted", portal.member_id, len(writes))
    return report


def _read_state(portal: Portal, key: str) -> dict[str, Any] | None:
    """``{READ_COMMANDS name: result}`` from the run's reads, or None if one did not succeed."""
    reads: Sequence[OutboxCommand] = db.session.scalars(select(OutboxCommand).where(
        OutboxCommand.portal_id == portal.id, OutboxCommand.key == key)).all()
    by_method = {r.method: r for r in reads}
    state: dict[str, Any] = {}
    for name, (method, _) in install.READ_COMMANDS.items():
        read = by_method.get(method)
        if read is not None and read.status in UNFINISHED:
            raise NotYet(f"{method} of portal {portal.member_id} is still {read.status}")
        if read is None or read.status != CommandStatus.DONE.value:
            why = read.dead_reason if read is not None else "missing"
            log.warning("portal %s: setup stopped, %s did not succeed (%s)",
                        portal.member_id, method, why)
            return None
        state[name] = read.result
    return state


def users_page(command_id: int) -> int:
    """A page of users arrived: upsert it, ask for the next while pages are full; its size."""
    found = _done_command(command_id)
    if found is None:
        return 0
    command, portal = found
    start = install.int_or_none((command.params or {}).get("start")) or 0
    return _take_page(portal, command.result, start)


def _take_page(portal: Portal, page: Any, start: int) -> int:
    records = [r for r in install.as_list(page) if isinstance(r, dict) and "ID" in r]
    sync_users(portal, records)
    if len(records) >= install.USER_PAGE:
        submit_user_sync(portal, start + len(records))
    db.session.flush()
    return len(records)


def user_fetched(command_id: int) -> PortalUser | None:
    """One user's ``user.get`` is done: upsert them into the extension map (caller commits)."""
    found = _done_command(command_id)
    if found is None:
        return None
    command, portal = found
    wanted = str((command.params or {}).get("ID"))
    record = next((r for r in install.as_list(command.result)
                   if isinstance(r, dict) and str(r.get("ID")) == wanted), None)
    if record is None:
        return None
    row = upsert_user(portal, record)
    db.session.flush()
    return row
