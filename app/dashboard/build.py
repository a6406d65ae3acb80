"""One portal's dashboard data: queues, the dispatcher's minutes, its budget, token, errors.

Everything is read through public functions and bounded: the outbox and inbox depths count
unfinished rows by their status indexes, the minutes are 24 h of Redis hashes in one round
trip, the errors are the newest few dead letters.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from flask import current_app
from flask_babel import lazy_gettext as _l

from app.dashboard import words
from app.dispatcher import ledger, outbox, stats
from app.extensions import redis_ext
from app.ingress import inbox
from app.tenants.models import Portal, PortalStatus, aware, utcnow
from app.tenants.status import shown_reason

ERRORS_SHOWN = 5
STATUS_WORDS = {
    PortalStatus.ACTIVE.value: _l("Connected: calls and events flow."),
    PortalStatus.INSTALLING.value: _l("Installation has not finished."),
    PortalStatus.AUTH_FAILED.value: _l("The connection to Bitrix24 was lost: an administrator "
                                       "must reopen the app."),
    PortalStatus.PAYMENT_REQUIRED.value: _l("The portal's subscription has ended: nothing is "
                                            "sent."),
    PortalStatus.ACCESS_DENIED.value: _l("Bitrix24 denied the app access: check its "
                                         "permissions."),
    PortalStatus.PORTAL_DELETED.value: _l("The portal was deleted or closed."),
    PortalStatus.UNINSTALLED.value: _l("The app is not installed on this portal any more."),
    PortalStatus.DISABLED.value: _l("Switched off by the operator."),
    PortalStatus.BLOCKED.value: _l("Bitrix24 support blocked the app's access (overload): "
                                   "calls and events wait."),
}


def build(portal: Portal, minutes: int = stats.MINUTES, now: float | None = None
          ) -> dict[str, Any]:
    """The dashboard's JSON for ``portal`` (its calls are added by the placement view)."""
    now = time.time() if now is None else now
    series = stats.series(portal.id, minutes, now)
    return {"portal": _portal(portal), "token": _token(portal),
            "inbox": _inbox(portal.id), "outbox": stats.depth(portal.id),
            "batches_in_flight": stats.batches_in_flight(portal.id),
            "now": _now(series, now), "series": [m.as_dict() for m in series],
            "operating": _operating(portal, now), "errors": _errors(portal)}


def _portal(portal: Portal) -> dict[str, Any]:
    words_ = STATUS_WORDS.get(portal.status)
    return {"id": portal.id, "status": portal.status, "plan": portal.plan,
            "advice": str(words_) if words_ else portal.status,
            "reason": (shown_reason(portal.status, portal.status_reason) or "")
            if portal.status != PortalStatus.ACTIVE.value else ""}


def _token(portal: Portal) -> dict[str, Any]:
    expires, now = aware(portal.expires_at), utcnow()
    return {"expires_at": _iso(expires),
            "expires_in": round((expires - now).total_seconds()) if expires else None,
            "last_refresh_at": _iso(aware(portal.last_refresh_at)),
            "usable": portal.status == PortalStatus.ACTIVE.value and bool(portal.refresh_token)}


def _inbox(portal_id: int) -> dict[str, int]:
    counts = inbox.depth(portal_id)
    return {"waiting": sum(counts.get(s, 0) for s in ("received", "queued", "processing")),
            "parked": counts.get("unhandled", 0) + counts.get("held", 0),
            "dead": counts.get("dead", 0)}


def _now(series: list[stats.Minute], now: float) -> dict[str, Any]:
    """The current minute once it has a batch, else the last whole one; and the last hour."""
    current = series[-1]
    last = current if current.batches or len(series) == 1 else series[-2]
    seconds = max(1.0, min(60.0, now - last.minute))
    hour = series[-60:]
    return {"minute": last.minute, "commands_per_second": round(last.sent / seconds, 2),
            "done_per_second": round(last.done / seconds, 2), "rate_limited": last.rate_limited,
            "rate_limited_hour": sum(m.rate_limited for m in hour),
            "dead_hour": sum(m.dead for m in hour),
            "p50": last.p50, "p95": last.p95, "max": last.max}


def _operating(portal: Portal, now: float) -> list[dict[str, Any]]:
    """Each recently sent method's operating seconds in the 10-minute window, vs the limit."""
    limit = float(current_app.config["DISPATCH_OPERATING_LIMIT"])
    out = []
    for method in stats.recent_methods(portal.id, ledger.WINDOW, now):
        used = ledger.used(redis_ext.client, portal.member_id, method, now=now)
        out.append({"method": method, "seconds": round(used, 2), "budget": limit,
                    "share": round(used / limit, 4) if limit else None})
    return sorted(out, key=lambda m: -m["seconds"])


def _errors(portal: Portal) -> list[dict[str, Any]]:
    """The newest dead commands and events, each with a sentence and its raw reason."""
    found: list[dict[str, Any]] = []
    for c in outbox.dead_letters(portal.id, ERRORS_SHOWN):
        found.append({"at": _iso(aware(c.completed_at)), "kind": "command", "what": c.method,
                      "words": words.explain(c.error, c.dead_reason),
                      "detail": (c.dead_reason or "")[:500]})
    for d in inbox.dead_letters(portal.id, ERRORS_SHOWN):
        found.append({"at": _iso(d.received_at), "kind": "event", "what": d.event_type,
                      "words": str(EVENT_FAILED), "detail": d.reason[:500]})
    found.sort(key=lambda e: e["at"] or "", reverse=True)
    return found[:ERRORS_SHOWN]


EVENT_FAILED = _l("An event could not be handled, even after retries.")


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None
