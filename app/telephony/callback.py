"""Web-form callbacks (issue 23 point 2, protocol §8.9): ONEXTERNALCALLBACKSTART becomes a
TYPE 4 call in Bitrix24 and an employee-first originate to the PBX.

The event has no ``CALL_ID`` and no user: Bitrix24 registered nothing and chose nobody. So
the app, in order:

1. :func:`on_callback` (the inbox handler) keeps the request as an originate row of kind
   ``callback`` (state ``choosing``) and hands it to the ``telephony_callback`` actor: the
   choice asks Bitrix24, which must not hold the inbox row's transaction.
2. :func:`choose` picks the employee. It asks ``telephony.externalCall.searchCrmEntities``
   for the form's number with the administrator's chain (the search is filtered by the
   caller's rights, §8.7) and keeps the records of the form's CRM entity (all of the
   number's records, in the portal's routing priority, when the entity is not among them).
   The portal's routing rules (:func:`app.telephony.routing.rules_of`: its settings, else
   the app's) pick the responsible (:func:`app.telephony.routing.choose`): an active user
   with an extension, at work unless the rules say otherwise. Failing that, the portal's
   fallback user (``default_user_id``); failing that, nobody, and the
   request fails with its reason (nothing is registered: register needs a user).
3. It registers the call (``TYPE=4``, the employee, the form's entity, ``LINE_NUMBER``, an
   ``EXTERNAL_CALL_ID`` of our own ``b24relay-cb-<row id>``, ``SHOW=0``,
   ``CALL_START_DATE`` now with its offset) through the dispatcher, real-time.
4. :func:`registered` (register's outcome) keeps the ``CALL_ID`` and queues the originate
   (app/telephony/click.py's actor): the signed request with ``"kind": "callback"``,
   ``call_id`` = that ``CALL_ID``, the employee's ``extension`` (rung first, hearing
   ``text`` in ``voice``), then the client's ``phone``.
5. The PBX reports the call with ``origin_id`` = that ``CALL_ID``; its ``start`` joins the
   registered call (click.join: no second register) and its ``end`` finishes it, with the
   employee who was rung as the owner. The call is the employee's outgoing leg to the
   client, so its statuses are the outgoing ones: 200 answered; 480 no answer, 486 busy,
   603-S cancelled, 503 failed (a ``sip_code`` overrides). Never 304: it makes a missed call
   only on TYPE 2/3 (§8.3, §8.5), and on TYPE 4 it would only label the employee's own
   attempt "missed"; the form's request is already in the CRM as the callback activity.

Failures are finished on the registered call with a status and the reason (kept on the row,
listed by ``flask calls clicks``): the fallback user has no extension (``OTHER``), the PBX
refuses (603), is down past ``TELEPHONY_CALLBACK_DEADLINE`` (503) or never reports the call
(480), all through click.py. A register that Bitrix24 refuses leaves nothing to finish: the
row fails with register's reason.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, cast

from flask import current_app
from sqlalchemy import CursorResult, select, update

from app import queue
from app.dispatcher import Outcome, Priority, direct, submit
from app.extensions import db
from app.telephony import click, machine, options, routing
from app.telephony.models import Originate
from app.tenants.models import Portal, aware, utcnow
from app.tenants.status import ensure_callable
from app.tenants.users import extension_map

log = logging.getLogger(__name__)

ACTOR = "telephony_callback"  # declared in workers/clicks.py
REGISTERED = "telephony.callback_register"  # register's outcome handler tag
ENTITY_TYPES = ("CONTACT", "COMPANY", "LEAD")
TYPE_CALLBACK = 4  # register's TYPE for a callback (§8.3)

NO_PHONE = "the callback request has no phone number"
NOBODY = "nobody to call back: no responsible can take it and no fallback user is set"
NO_EXTENSION = ("nobody to call back: no responsible can take it and the fallback user has "
                "no extension in b24relay")
# A request still being chosen for after this many seconds lost its message (the broker was
# down at the inbox's commit): the periodic sweep queues its choice again.
STALE_CHOICE = 30.0


def on_callback(portal: Portal | None, event: dict[str, Any]) -> None:
    """ONEXTERNALCALLBACKSTART: keep the request and queue the choice (caller commits)."""
    if portal is None:
        raise ValueError("ONEXTERNALCALLBACKSTART without a portal")
    ensure_callable(portal)
    inbox_id = _int(event.get("inbox_id"))
    if inbox_id is not None and db.session.scalar(select(Originate.id).where(
            Originate.portal_id == portal.id, Originate.inbox_event_id == inbox_id)):
        return  # this inbox row was handled before
    data = event.get("data") or {}
    country = options.default_country(portal.settings)
    phone = machine.normalise_phone(str(data.get("PHONE_NUMBER") or ""), country)
    entity_type = str(data.get("CRM_ENTITY_TYPE") or "").strip().upper()
    entity_id = _int(data.get("CRM_ENTITY_ID"))
    known = entity_type in ENTITY_TYPES and entity_id is not None and entity_id > 0
    row = Originate(
        kind="callback", portal_id=portal.id, b24_call_id=None, user_id=None, extension=None,
        phone=(phone or "")[:64], dtmf=None, is_mobile=False,
        line=str(data.get("LINE_NUMBER") or "").strip()[:50] or None,
        text=str(data.get("TEXT") or "").strip() or None,
        voice=str(data.get("VOICE") or "").strip()[:64] or None,
        crm_entity_type=entity_type if known else None,
        crm_entity_id=entity_id if known else None,
        state="choosing", attempts=0, inbox_event_id=inbox_id)
    db.session.add(row)
    db.session.flush()
    if phone is None:
        click.fail(row, "OTHER", NO_PHONE)  # nothing registered: only the row says so
        return
    queue.enqueue_after_commit(db.session(), ACTOR, row.id, queue_name=click.QUEUE)


def _int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def choose(originate_id: int) -> None:
    """Choose the employee, register the call, or fail (the actor; commits)."""
    row = db.session.get(Originate, originate_id)
    if row is None or row.state != "choosing":
        return
    portal = db.session.get(Portal, row.portal_id)
    if portal is None:
        return
    life = float(current_app.config["TELEPHONY_CALLBACK_DEADLINE"])
    if aware(row.created_at) + timedelta(seconds=life) < utcnow():
        click.fail(row, "OTHER", f"the callback was not handled within {life:g} s")
        db.session.commit()  # nothing registered yet: nothing to finish
        return
    users = {user: ext for ext, user in sorted(extension_map(portal).items(), reverse=True)}
    fallback = portal.settings.default_user_id if portal.settings else None
    phone, entity = row.phone, (row.crm_entity_type, row.crm_entity_id)
    # Give the database connection back before Bitrix24 answers (seconds, at worst).
    db.session.close()
    responsible = _responsible(portal, phone, entity, users, fallback)
    # Claimed by a conditional UPDATE (a row lock on PostgreSQL, the write lock on SQLite):
    # a choice the sweep queued again while this one asked Bitrix24 registers nothing more.
    claimed = cast(CursorResult, db.session.execute(  # a DML statement's result
        update(Originate).where(Originate.id == originate_id, Originate.state == "choosing")
        .values(state="register").execution_options(synchronize_session=False))).rowcount
    row = db.session.get(Originate, originate_id, populate_existing=True)
    if not claimed or row is None:
        db.session.rollback()
        return
    user = responsible if responsible is not None else fallback
    row.user_id = user
    row.extension = users.get(user) if user is not None else None
    if user is None:
        click.fail(row, "OTHER", NOBODY)
        db.session.commit()
        return
    row.state = "register"
    row.external_call_id = f"b24relay-cb-{row.id}"
    row.register_command_id = submit(
        row.portal_id, machine.REGISTER, _register_params(row, portal), key=click.order_key(row),
        priority=Priority.REALTIME, handler=REGISTERED, context={"originate": row.id})
    if row.extension is None:
        # Registered all the same, so the request is in the CRM with its reason; the
        # finish takes register's CALL_ID (same ordering key).
        click.fail(row, "OTHER", NO_EXTENSION)
    db.session.commit()
    log.info("callback %s of portal %s: user %s (%s), register %s", row.id, row.portal_id,
             user, "responsible" if user == responsible else "fallback",
             row.register_command_id)


def sweep() -> int:
    """Queue the choice again for requests whose message was lost (a worker's periodic
    actor; read only); how many."""
    cutoff = utcnow() - timedelta(seconds=STALE_CHOICE)
    stale = db.session.scalars(select(Originate.id).where(
        Originate.state == "choosing", Originate.created_at < cutoff).limit(500)).all()
    db.session.rollback()
    for originate_id in stale:
        queue.enqueue(ACTOR, originate_id, queue_name=click.QUEUE)
    return len(stale)


def _responsible(portal: Portal, phone: str, entity: tuple[str | None, int | None],
                 users: dict[int, str], fallback: int | None) -> int | None:
    """The form's client's responsible who can take the call (the portal's routing rules),
    or None."""
    rules = routing.rules_of(portal.settings)
    try:
        results = direct.call_method(portal, routing.SEARCH, {"PHONE_NUMBER": phone})
    except Exception as exc:  # noqa: BLE001 - any failure: the fallback user calls back
        log.warning("portal %s: callback search failed: %s", portal.id,
                    str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
        return None
    records = [r for r in results if isinstance(r, dict)] if isinstance(results, list) else []
    own = [r for r in records if (str(r.get("CRM_ENTITY_TYPE")).upper(),
                                  _int(r.get("CRM_ENTITY_ID"))) == entity]
    priority = list(ENTITY_TYPES) if own else list(rules.priority)
    match = routing.choose(own or records, priority=priority, extensions=users,
                           fallback_user=fallback, skip_absent=rules.skip_absent)
    return match.user_id if match.routable else None


def _register_params(row: Originate, portal: Portal) -> dict[str, Any]:
    settings = portal.settings
    params: dict[str, Any] = {
        "USER_ID": row.user_id,
        "PHONE_NUMBER": row.phone,
        "TYPE": TYPE_CALLBACK,
        "LINE_NUMBER": row.line,
        "EXTERNAL_CALL_ID": row.external_call_id,
        "CALL_START_DATE": utcnow().isoformat(timespec="seconds"),
        "SHOW": 0,
    }
    if row.crm_entity_type and row.crm_entity_id:
        params["CRM_ENTITY_TYPE"] = row.crm_entity_type
        params["CRM_ENTITY_ID"] = row.crm_entity_id
        params["CRM_CREATE"] = 0
    else:
        params["CRM_CREATE"] = 1 if settings is not None and settings.crm_create else 0
        params["CRM_SOURCE"] = current_app.config["TELEPHONY_CRM_SOURCE"] or None
    return {k: v for k, v in params.items() if v is not None}


def registered(outcome: Outcome) -> None:
    """register's outcome: keep the CALL_ID and queue the originate; a refused register
    fails the callback (there is no call to finish)."""
    row = db.session.get(Originate, int(outcome.context["originate"]))
    if row is None or outcome.command_id != row.register_command_id:
        return
    result = outcome.result if isinstance(outcome.result, dict) else {}
    call_id = str(result.get("CALL_ID") or "") or None
    if outcome.ok and call_id is not None:
        row.b24_call_id = call_id[:128]
        if row.state == "register":
            row.state = "pending"
            queue.enqueue_after_commit(db.session(), click.ACTOR, row.id,
                                       queue_name=click.QUEUE)
        return
    if row.state == "register":
        row.state = "failed"
        row.error = f"register failed: {outcome.reason or outcome.kind.value}"[:2000]
        log.warning("callback %s of portal %s: %s", row.id, row.portal_id, row.error)
