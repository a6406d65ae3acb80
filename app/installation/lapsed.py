"""A held portal's ONAPPUNINSTALL: asked about now, and again later until Bitrix24 says.

A ``payment_required`` (or otherwise held) portal used to have its real uninstall ignored:
a held chain "cannot be asked", so the portal stayed held and, with CLEAN=1, its data was
kept forever. Asking ``app.info`` with the stored token is harmless (no refresh, nothing
spent): ``NOT_INSTALLED`` confirms the uninstall, and ``PAYMENT_REQUIRED`` (or any answer
that proves nothing) means ask again later. The later asks back off in hours
(``UNINSTALL_RECHECK_HOURS`` doubling up to ``UNINSTALL_RECHECK_MAX_HOURS``) and stop
``UNINSTALL_RECHECK_DAYS`` after the event. A forged uninstall only costs those few asks:
the portal answers that the app is still there (or lapsed), and nothing changes.

What is still to ask lives in Redis: a sorted set of portal ids by when they are next due,
and per portal the CLEAN flag, the attempt count and when the event came.
"""

from __future__ import annotations

import logging
import time

from flask import current_app

from app.bitrix import errors
from app.dispatcher import direct
from app.extensions import db, redis_ext
from app.installation import install
from app.tenants.models import Portal, PortalStatus

log = logging.getLogger(__name__)

DUE_KEY = "b24relay:uninstall-recheck"
CONFIRMED = "confirmed"
ASK_LATER = "ask_later"


def _entry_key(portal_id: int) -> str:
    return f"{DUE_KEY}:{portal_id}"


def _hours(name: str) -> float:
    return float(current_app.config[name])


def ask(portal: Portal) -> tuple[str, str]:
    """``app.info`` with the held portal's stored token: (CONFIRMED or ASK_LATER, what it said).

    The portal not answering (an outage, a limit) raises a transient error, never a verdict.
    """
    try:
        direct.call_with_token(portal.client_endpoint, portal.access_token or "", "app.info")
    except errors.NotInstalled as exc:
        return CONFIRMED, f"app.info: {exc.code}"
    except errors.ApiError as exc:
        if (exc.http_status or 0) >= 500 or exc.http_status == 429:
            raise errors.TransportError(f"app.info: {exc}", exc.http_status) from exc
        return ASK_LATER, f"app.info: {exc.code}"
    return ASK_LATER, "app.info answered: the app is still installed"


def schedule(portal: Portal, clean: bool, attempt: int = 0, since: float | None = None) -> float:
    """Keep the uninstall to be asked about again after the next backoff; when that is due."""
    delay = min(_hours("UNINSTALL_RECHECK_HOURS") * 2 ** attempt,
                _hours("UNINSTALL_RECHECK_MAX_HOURS")) * 3600
    due = time.time() + delay
    client = redis_ext.client
    client.hset(_entry_key(portal.id), mapping={
        "clean": int(clean), "attempt": attempt + 1,
        "since": since if since is not None else time.time()})
    client.zadd(DUE_KEY, {str(portal.id): due})
    return due


def forget(portal_id: int) -> None:
    """Nothing more to ask about this portal's uninstall."""
    redis_ext.client.zrem(DUE_KEY, str(portal_id))
    redis_ext.client.delete(_entry_key(portal_id))


def due(limit: int = 100) -> list[int]:
    """Portals whose uninstall is due to be asked about again."""
    ids = redis_ext.client.zrangebyscore(DUE_KEY, "-inf", time.time(), start=0, num=limit)
    return [int(_text(i)) for i in ids]


def recheck(portal_id: int) -> str:
    """Ask again about one due portal's uninstall; the outcome (committed here)."""
    entry = {_text(k): _text(v) for k, v in redis_ext.client.hgetall(_entry_key(portal_id)).items()}
    portal = db.session.get(Portal, portal_id)
    if portal is None or not entry or portal.status == PortalStatus.UNINSTALLED.value:
        forget(portal_id)
        return "forgotten"
    clean = entry.get("clean") == "1"
    verdict, said = ask(portal)
    if verdict == CONFIRMED:
        log.info("portal %s: uninstall confirmed by Bitrix24 on a later ask (%s)%s",
                 portal.member_id, said, "; deleting its data" if clean else "")
        install.uninstall(portal, clean)
        db.session.commit()
        forget(portal_id)
        return CONFIRMED
    since = float(entry.get("since") or time.time())
    if time.time() - since >= _hours("UNINSTALL_RECHECK_DAYS") * 86400:
        log.warning("portal %s: uninstall still unconfirmed after %g days (%s); no more asks",
                    portal.member_id, _hours("UNINSTALL_RECHECK_DAYS"), said)
        forget(portal_id)
        return "given_up"
    schedule(portal, clean, int(entry.get("attempt") or 1), since)
    log.info("portal %s: uninstall not confirmed yet (%s); asked again later",
             portal.member_id, said)
    return ASK_LATER


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
