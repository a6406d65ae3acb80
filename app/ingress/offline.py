"""Offline events mode (protocol §3.9): the app pulls what Bitrix24 queued for it.

For a portal whose settings say ``event_mode = "offline"``, a periodic job reserves
a batch with ``event.offline.get`` (``clear=0``), stores every event in the inbox
(deduplicated on its MESSAGE_ID, so reading a batch twice stores it once), and only
then removes the batch with ``event.offline.clear``. Events that cannot be used
are reported with ``event.offline.error``. The reserved batch's ``process_id`` is
kept in Redis until it is cleared: if the process dies in between, the next pull
reads the same batch again instead of leaving it reserved.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, cast

import redis
from sqlalchemy import Select, select

from app import queue
from app.dispatcher.direct import call_method
from app.extensions import db, redis_ext
from app.ingress import inbox
from app.ingress.registry import on
from app.tenants.models import Portal, PortalSettings, PortalStatus

log = logging.getLogger(__name__)

BATCH = 50
MAX_BATCHES_PER_PULL = 20
LOCK_SECONDS = 120
PENDING_SECONDS = 30 * 24 * 3600  # Bitrix24 keeps a reserved batch this long
PULL_ACTOR = "pull_offline_portal"  # workers/ingress.py


def _offline_portals(*columns: Any) -> Select[Any]:
    """Active portals that chose the offline events mode."""
    return (select(*columns).join(PortalSettings, PortalSettings.portal_id == Portal.id)
            .where(PortalSettings.event_mode == "offline",
                   Portal.status == PortalStatus.ACTIVE.value))


def offline_portal_ids() -> list[int]:
    """Active portals that chose the offline events mode."""
    return list(db.session.scalars(_offline_portals(Portal.id).order_by(Portal.id)))


def _pending_key(portal: Portal) -> str:
    return f"b24relay:offline:process:{portal.id}"


def unix_ts(stamp: Any) -> str | None:
    """``TIMESTAMP_X`` (ISO-8601 in the portal's time zone) as unix seconds, like an online
    event's ``ts``; None when it carries no offset (its instant is then unknown).
    """
    try:
        moment = datetime.fromisoformat(str(stamp))
    except ValueError:
        return None
    return str(int(moment.timestamp())) if moment.utcoffset() is not None else None


def _queue_order(record: dict[str, Any]) -> tuple[int, int]:
    """The queue's own order: by ID as a number (ids are strings: "10" comes after "9")."""
    raw = str(record.get("ID") or "")
    return (0, int(raw)) if raw.isdigit() else (1, 0)


def _as_inbox_event(portal: Portal, record: dict[str, Any]) -> inbox.NewEvent | None:
    name, message_id = record.get("EVENT_NAME"), record.get("MESSAGE_ID")
    if not isinstance(name, str) or not name or not message_id:
        return None
    payload = {"event": name.upper(), "data": record.get("EVENT_DATA") or {},
               "ts": unix_ts(record.get("TIMESTAMP_X")),
               "auth": {"member_id": portal.member_id, "domain": portal.domain},
               "offline": {"id": record.get("ID"), "message_id": message_id,
                           "timestamp_x": record.get("TIMESTAMP_X"),
                           "additional": record.get("EVENT_ADDITIONAL")}}
    return inbox.NewEvent(member_id=portal.member_id, source="b24", event_type=name.upper(),
                          payload=payload, dedupe_key=inbox.digest(["offline", str(message_id)]),
                          portal_id=portal.id)


def _take_batch(portal: Portal) -> tuple[str | None, list[dict[str, Any]]]:
    """The batch to store: the one left reserved by an earlier pull, else a new one."""
    # bytes: the shared client does not decode responses (app/extensions.py); redis-py's
    # types cannot tell.
    pending = cast(bytes | None, redis_ext.client.get(_pending_key(portal)))
    params: dict[str, Any] = {"clear": 0, "limit": BATCH}
    if pending:
        params["process_id"] = pending.decode()
    result = call_method(portal, "event.offline.get", params) or {}
    events = result.get("events") or []
    process_id = result.get("process_id") or (pending.decode() if pending else None)
    if pending and not events:
        redis_ext.client.delete(_pending_key(portal))  # already cleared: start afresh
        return _take_batch(portal)
    if process_id:
        redis_ext.client.set(_pending_key(portal), process_id, ex=PENDING_SECONDS)
    return process_id, events


def _store_batch(portal: Portal, process_id: str, events: list[dict[str, Any]]) -> int:
    usable: list[tuple[dict[str, Any], inbox.NewEvent]] = []
    broken: list[str] = []
    for record in sorted(events, key=_queue_order):  # inbox order = processing order
        event = _as_inbox_event(portal, record)
        if event is not None:
            usable.append((record, event))
        elif record.get("MESSAGE_ID"):
            broken.append(str(record["MESSAGE_ID"]))
    stored = inbox.store([event for _, event in usable])  # raises: the batch stays reserved
    inbox.enqueue([s.id for s in stored if s.created], "b24", via="offline")
    if broken:
        log.warning("%d unusable offline events of %s reported", len(broken), portal.member_id)
        call_method(portal, "event.offline.error",
                    {"process_id": process_id, "message_id": broken})
    if usable:
        call_method(portal, "event.offline.clear",
                    {"process_id": process_id, **_clear_ids([record for record, _ in usable])})
    redis_ext.client.delete(_pending_key(portal))
    return sum(1 for s in stored if s.created)


def _clear_ids(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Clear stored records by their ids, as given (strings); by MESSAGE_ID if one has none."""
    ids = [str(record.get("ID") or "") for record in records]
    if all(ids):
        return {"id": ids}
    return {"message_id": [str(record["MESSAGE_ID"]) for record in records]}


def pull(portal: Portal) -> int:
    """Move the portal's offline queue into the inbox; the number of new inbox rows."""
    lock = redis_ext.client.lock(f"b24relay:offline:lock:{portal.id}", timeout=LOCK_SECONDS,
                                 blocking=False)
    if not lock.acquire():
        return 0  # another worker is pulling this portal right now
    try:
        total = 0
        for _ in range(MAX_BATCHES_PER_PULL):
            process_id, events = _take_batch(portal)
            if not events or not process_id:
                break
            total += _store_batch(portal, process_id, events)
        if total:
            log.info("pulled %d offline events of %s", total, portal.member_id)
        return total
    finally:
        lock.release()


def pull_portal(portal_id: int) -> int:
    """``pull`` for a portal id, if it is still active and in offline mode."""
    portal = db.session.scalars(_offline_portals(Portal).where(Portal.id == portal_id)).first()
    return pull(portal) if portal is not None else 0


@on("ONOFFLINEEVENT")
def pull_on_signal(portal: Portal | None, event: dict[str, Any]) -> None:
    """Bitrix24 says the offline queue has something: pull now rather than at the next tick.

    The pull runs in its own actor, not in this event's processing: an event calls no
    Bitrix24 while it is handled, so a slow or failing portal holds no inbox worker and
    spends no event's retry horizon. A signal lost here costs nothing: the periodic pull
    (``OFFLINE_PULL_INTERVAL``) reads the same queue.
    """
    if portal is None:
        return
    try:
        queue.enqueue(PULL_ACTOR, portal.id)
    except redis.RedisError as exc:
        log.warning("offline pull of %s not queued (%s); the periodic pull reads it",
                    portal.member_id, exc)
