"""Click-to-call (issue 23 point 1, protocol §8.8): ONEXTERNALCALLSTART becomes a signed
originate request to the portal's PBX, and the PBX's later events join the click's call.

Bitrix24 has registered the call already (its ``CALL_ID``, the clicking user, ``TYPE=1``).
So the app never registers it; it only asks the PBX to ring the user's phone and then the
number, and finishes the ``CALL_ID`` when the call ends, or when it cannot happen:

============================  ===========  ==============================================
what went wrong               STATUS_CODE  FAILED_REASON (also on the originate's row)
============================  ===========  ==============================================
the user has no extension     OTHER        "the user has no extension in b24relay"
no pbx_originate_url is set   OTHER        "no pbx_originate_url is set for this portal"
the PBX refused (4xx)         603          "the PBX refused the originate: HTTP 4xx ..."
the PBX is down (5xx, no      503          "the PBX did not take the originate within
answer) past the click's life                30 s: ..."
the PBX never reported the    480          "the PBX never reported the call"
call after taking it
============================  ===========  ==============================================

A failed click is finished so that the clicker's card closes and a later click on the same
number gets a fresh call (an unfinished one would be its dedup target, §8.3).

The request (documented for PBX integrators in app/ingress/PBX_EVENTS.md, "Originate"):
``POST <pbx_originate_url>``, JSON ``{"kind", "call_id", "extension", "phone", "dtmf",
"is_mobile", "text"}`` as issue 23 fixes them, plus the extras ``line``, ``user_id`` and
``voice``; headers ``X-B24Relay-Timestamp`` (unix
seconds) and ``X-B24Relay-Signature`` = ``sha256=`` + hex HMAC-SHA256 of
``<timestamp>.<body>`` with the portal's ``pbx_secret`` (both set with ``flask portals
settings``). Tried again with backoff while
the click is useful (``TELEPHONY_ORIGINATE_DEADLINE``); each try waits
``TELEPHONY_ORIGINATE_TIMEOUT`` at most.

A second event for the same ``CALL_ID`` while its originate is in flight (a double click, or
the portal's dedup handing a second click the same call) rings nothing more; once that
originate has ended, a click that reuses the ``CALL_ID`` is a new originate.

Web-form callbacks (app/telephony/callback.py) use the same rows (``kind`` callback), the
same request (``"kind": "callback"``, the ``text`` to read to the employee and its
``voice``), the same retries, sweep, join and failure finish; their deadline is
``TELEPHONY_CALLBACK_DEADLINE``, counted from the event, and their row has a ``CALL_ID``
only once the app's own register answered.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from datetime import timedelta
from typing import Any

import httpx
from flask import current_app
from sqlalchemy import select

from app import queue
from app.bitrix.errors import ApiError, InvalidToken, TokenExpired
from app.dispatcher import Outcome, Priority, direct, ref, submit
from app.extensions import db, redis_ext
from app.telephony import machine, options
from app.telephony.models import Originate
from app.tenants.models import Portal, aware, utcnow
from app.tenants.status import ensure_callable
from app.tenants.users import extension_map

log = logging.getLogger(__name__)

ACTOR = "telephony_originate"  # declared in workers/clicks.py
QUEUE = "default"
FINISHED = "telephony.click_finish"  # the outcome handler tag of a failed click's finish
SIGNATURE_HEADER = "X-B24Relay-Signature"
TIMESTAMP_HEADER = "X-B24Relay-Timestamp"
IN_FLIGHT = ("pending", "sent")

NO_EXTENSION = "the user has no extension in b24relay"
CLICKER_KEY = "b24relay:clicker:{portal}:{token}"  # -> the user id a click token is for
TOKEN_REFUSALS = (InvalidToken, TokenExpired)
NO_WEBHOOK = "no pbx_originate_url is set for this portal"
NEVER_REPORTED = "the PBX never reported the call"


class Failed(Exception):
    """The originate cannot happen: finish the click's call with this code and reason."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value: ``sha256=`` + hex HMAC-SHA256 of ``<ts>.<body>``."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def _setting(name: str) -> float:
    return float(current_app.config[name])


def _life(row: Originate) -> float:
    """Seconds from the event during which the originate is worth trying."""
    return _setting("TELEPHONY_CALLBACK_DEADLINE" if row.kind == "callback"
                    else "TELEPHONY_ORIGINATE_DEADLINE")


# ------------------------------------------------------------------ the event


def on_click(portal: Portal | None, event: dict[str, Any]) -> None:
    """ONEXTERNALCALLSTART: an originate for the click, or its failure (caller commits)."""
    if portal is None:
        raise ValueError("ONEXTERNALCALLSTART without a portal")
    ensure_callable(portal)
    data = event.get("data") or {}
    call_id = str(data.get("CALL_ID") or "").strip()
    user_id = _int(data.get("USER_ID"))
    if not call_id or user_id is None:
        log.warning("inbox row %s: ONEXTERNALCALLSTART without CALL_ID or USER_ID",
                    event.get("inbox_id"))
        return
    refused = _unconfirmed(portal, event, user_id)
    if refused is not None:
        _refuse(portal, event, call_id, user_id, refused)
        return
    if not _take(portal.id, call_id, event.get("inbox_id")) \
            or _in_flight(portal.id, call_id) is not None:
        log.info("click %s: an originate is in flight already; this one rings nothing", call_id)
        return
    extensions = {user: ext for ext, user in extension_map(portal).items()}
    row = Originate(
        portal_id=portal.id, b24_call_id=call_id, user_id=user_id,
        extension=extensions.get(user_id),
        phone=str(data.get("PHONE_NUMBER_INTERNATIONAL") or data.get("PHONE_NUMBER") or "")[:64],
        dtmf=str(data.get("EXTENSION") or "")[:64] or None,
        line=str(data.get("LINE_NUMBER") or "")[:50] or None,
        is_mobile=str(data.get("IS_MOBILE") or "0").strip() == "1",
        state="pending", attempts=0, inbox_event_id=_int(event.get("inbox_id")))
    db.session.add(row)
    db.session.flush()
    if row.extension is None:
        fail(row, "OTHER", NO_EXTENSION)
        return
    queue.enqueue_after_commit(db.session(), ACTOR, row.id, queue_name=QUEUE)


# ------------------------------------------------------------------ who clicked


def _unconfirmed(portal: Portal, event: dict[str, Any], user_id: int) -> str | None:
    """Why the click cannot be taken as ``user_id``'s, or None when Bitrix24 confirms it.

    The event's form fields prove nothing: on a full-form portal every employee can read the
    application token in his iframe, and post an ONEXTERNALCALLSTART naming a colleague and
    any number, which would ring that colleague's phone and dial the number. What proves the
    clicker is the event's ``auth[access_token]`` (Bitrix24 sends the triggering user's; intake
    sealed it, app/ingress/sealed.py): ``profile`` with it, on the portal's own endpoint, must
    name ``user_id``. An employee's own token so authorises only his own clicks, which he can
    make anyway. The answer is cached for the token's hour (a hash of it, never the token),
    so a user's next clicks cost no round trip. A transport error or a busy portal raises
    (the inbox tries the row again); a refusal about the token is a refusal of the click.
    """
    given = event.get("auth")
    auth: dict[str, Any] = given if isinstance(given, dict) else {}
    token = auth.get("access_token")
    if not isinstance(token, str) or not token:
        return "the click came without its user's token: it cannot be confirmed"
    key = CLICKER_KEY.format(portal=portal.id,
                             token=hashlib.sha256(token.encode()).hexdigest()[:32])
    cached = redis_ext.client.get(key)
    if cached is not None:
        who = _int(cached.decode() if isinstance(cached, bytes) else cached)
    else:
        try:
            body = direct.call_with_token(portal.client_endpoint, token, "profile", {})
        except ApiError as exc:
            if isinstance(exc, TOKEN_REFUSALS) or exc.http_status == 401:
                return f"Bitrix24 refused the click's token ({exc.code})"
            raise  # the portal's state or a limit: the inbox holds or retries the row
        result = body.get("result") if isinstance(body, dict) else None
        who = _int(result.get("ID")) if isinstance(result, dict) else None
        if who is not None:
            ttl = max(60, min(3600, _int(auth.get("expires_in")) or 3600))
            redis_ext.client.set(key, who, ex=ttl)
    if who != user_id:
        return f"the click's token is user {who}'s, not user {user_id}'s"
    return None


def _refuse(portal: Portal, event: dict[str, Any], call_id: str, user_id: int,
            reason: str) -> None:
    """Keep a refused click visible (state ``refused``) and touch nothing in Bitrix24: its
    CALL_ID may be a colleague's call, which finishing would close."""
    log.warning("portal %s: click %s naming user %s refused: %s", portal.id, call_id,
                user_id, reason)
    db.session.add(Originate(
        portal_id=portal.id, b24_call_id=call_id, user_id=user_id, extension=None,
        phone=str((event.get("data") or {}).get("PHONE_NUMBER_INTERNATIONAL") or "")[:64],
        state="refused", attempts=0, error=reason[:2000],
        inbox_event_id=_int(event.get("inbox_id"))))


def _int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _guard_key(portal_id: int, call_id: str) -> str:
    return f"b24relay:click:{portal_id}:{call_id}"


def _take(portal_id: int, call_id: str, inbox_id: Any) -> bool:
    """Claim the click's CALL_ID while its originate is in flight (two events of one CALL_ID
    may be handled at once by two workers). The claim names the inbox row, so a retry of the
    same row goes on; it lapses after the click's life and the PBX's report time."""
    client = redis_ext.client
    key, mine = _guard_key(portal_id, call_id), str(inbox_id)
    ttl = int(_setting("TELEPHONY_ORIGINATE_DEADLINE")
              + _setting("TELEPHONY_ORIGINATE_REPORT_TIMEOUT")) + 60
    if client.set(key, mine, nx=True, ex=ttl):
        return True
    held = client.get(key)
    return held is not None and (held.decode() if isinstance(held, bytes) else held) == mine


def _release(row: Originate) -> None:
    """The originate ended (joined or failed): a later click may reuse the CALL_ID."""
    if row.kind == "click" and row.b24_call_id is not None:
        redis_ext.client.delete(_guard_key(row.portal_id, row.b24_call_id))


def _in_flight(portal_id: int, call_id: str) -> Originate | None:
    """The click's originate still in flight: pending or sent, not joined, not failed."""
    return db.session.scalars(select(Originate).where(
        Originate.portal_id == portal_id, Originate.b24_call_id == call_id,
        Originate.state.in_(IN_FLIGHT)).order_by(Originate.id.desc()).limit(1)).first()


# ------------------------------------------------------------------ the originate request


def attempt(originate_id: int) -> float | None:
    """One try of a pending originate (a worker's actor; commits). Returns the seconds to
    wait before the next try, or None when there is none to make."""
    row = db.session.get(Originate, originate_id)
    if row is None or row.state != "pending":
        return None
    portal = db.session.get(Portal, row.portal_id)
    settings = portal.settings if portal else None
    deadline = aware(row.created_at) + timedelta(seconds=_life(row))
    try:
        if settings is None or not settings.pbx_originate_url or not settings.pbx_secret:
            raise Failed("OTHER", NO_WEBHOOK)
        left = (deadline - utcnow()).total_seconds()
        if left <= 0:
            raise Failed("503", f"the PBX did not take the originate within "
                                f"{_life(row):g} s: {row.error}")
        row.attempts += 1
        _post(row, settings.pbx_originate_url, settings.pbx_secret,
              min(left, _setting("TELEPHONY_ORIGINATE_TIMEOUT")))
    except Failed as failure:
        fail(row, failure.code, failure.reason)
        db.session.commit()
        return None
    except (httpx.HTTPError, _Retry) as exc:
        row.error = str(exc)[:2000] or type(exc).__name__
        db.session.commit()
        left = (deadline - utcnow()).total_seconds()
        return max(0.0, min(left, 0.25 * 2 ** min(row.attempts, 6)))
    row.state, row.sent_at, row.error = "sent", utcnow(), None
    db.session.commit()
    return None


class _Retry(Exception):
    """The PBX answered with a status worth trying again (5xx, 408, 429)."""


def _post(row: Originate, url: str, secret: str, timeout: float) -> None:
    body = json.dumps({
        "kind": row.kind, "call_id": row.b24_call_id, "extension": row.extension,
        "phone": row.phone, "dtmf": row.dtmf, "is_mobile": row.is_mobile, "line": row.line,
        "user_id": row.user_id, "text": row.text, "voice": row.voice},
        separators=(",", ":")).encode()
    stamp = int(time.time())
    response = httpx.post(url, content=body, timeout=timeout, headers={
        "Content-Type": "application/json", TIMESTAMP_HEADER: str(stamp),
        SIGNATURE_HEADER: sign(secret, stamp, body)})
    if response.is_success:
        return
    text = f"HTTP {response.status_code}: {response.text[:300]}"
    if response.status_code >= 500 or response.status_code in (408, 429):
        raise _Retry(text)
    raise Failed("603", f"the PBX refused the originate: {text}")


# ------------------------------------------------------------------ failures, the sweep


def fail(row: Originate, code: str, reason: str) -> None:
    """Finish the originate's call with a failure status (caller commits). A callback's call
    may not be known yet: its CALL_ID is then its register's answer (a reference, same
    ordering key); a callback never registered (nobody to ring) has nothing to finish."""
    row.state, row.error = "failed", reason[:2000]
    _release(row)
    log.warning("%s %s of portal %s failed: %s", row.kind, row.b24_call_id or row.id,
                row.portal_id, reason)
    if row.b24_call_id is not None:
        call_id: str = row.b24_call_id
    elif row.register_command_id is not None:
        call_id = ref(row.register_command_id, "CALL_ID")
    else:
        return
    params = {"CALL_ID": call_id, "USER_ID": row.user_id, "DURATION": 0,
              "STATUS_CODE": code, "FAILED_REASON": reason[:255], "ADD_TO_CHAT": 0}
    row.finish_command_id = submit(row.portal_id, machine.FINISH, params, key=order_key(row),
                                   priority=Priority.NORMAL, handler=FINISHED,
                                   context={"originate": row.id})


def order_key(row: Originate) -> str:
    """The dispatcher's ordering key of the originate's commands (a callback's register
    and its finish go in order)."""
    return f"callback:{row.id}" if row.kind == "callback" else f"click:{row.b24_call_id}"


def sweep() -> int:
    """Originates the PBX took but never reported within ``TELEPHONY_ORIGINATE_REPORT_TIMEOUT``
    are finished as failed (commits); how many."""
    cutoff = utcnow() - timedelta(seconds=_setting("TELEPHONY_ORIGINATE_REPORT_TIMEOUT"))
    rows = db.session.scalars(select(Originate).where(
        Originate.state == "sent", Originate.sent_at < cutoff)
        .order_by(Originate.id).limit(500).with_for_update(skip_locked=True)).all()
    for row in rows:
        fail(row, "480", NEVER_REPORTED)
    db.session.commit()
    # A pending one whose message was lost (the broker was down at its commit): its last try.
    now = utcnow()
    shortest = min(_setting("TELEPHONY_ORIGINATE_DEADLINE"),
                   _setting("TELEPHONY_CALLBACK_DEADLINE"))
    stale = [row.id for row in db.session.scalars(select(Originate).where(
        Originate.state == "pending",
        Originate.created_at < now - timedelta(seconds=shortest + 5)).limit(500))
        if aware(row.created_at) + timedelta(seconds=_life(row) + 5) < now]
    for originate_id in stale:
        attempt(originate_id)
    return len(rows) + len(stale)


def finished(outcome: Outcome) -> None:
    """A failed click's finish: its outcome kept on the originate row."""
    row = db.session.get(Originate, int(outcome.context["originate"]))
    if row is not None:
        row.finish_outcome = outcome.kind.value
        if not outcome.ok:
            row.error = f"{row.error}; finish: {outcome.reason}"[:2000]


# ------------------------------------------------------------------ joining the PBX's call


def join(portal: Portal, event: dict[str, Any]) -> str | None:
    """The click's ``CALL_ID`` a PBX ``start`` belongs to, marking its originate joined.

    By ``origin_id`` (the PBX echoes the originate's ``call_id``), else an outgoing start
    from the clicker's extension to the clicked number within
    ``TELEPHONY_ORIGINATE_JOIN_WINDOW`` seconds of the originate being taken.
    """
    if event.get("event") != "start":
        return None
    origin = str(event.get("origin_id") or "").strip()
    query = select(Originate).where(Originate.portal_id == portal.id,
                                    Originate.state.in_(IN_FLIGHT))
    if origin:
        row = db.session.scalars(query.where(Originate.b24_call_id == origin)
                                 .order_by(Originate.id.desc()).limit(1)).first()
    else:
        row = _by_match(portal, query, event)
    if row is None:
        return None
    row.state, row.pbx_call_id = "joined", str(event.get("call_id"))[:256]
    _release(row)
    return row.b24_call_id


def _by_match(portal: Portal, query: Any, event: dict[str, Any]) -> Originate | None:
    if event.get("direction") != "out":
        return None
    extensions = event.get("extensions") or []
    if isinstance(extensions, str):
        extensions = [extensions]
    country = options.default_country(portal.settings)
    phone = machine.normalise_phone(str(event.get("phone") or ""), country)
    since = utcnow() - timedelta(seconds=_setting("TELEPHONY_ORIGINATE_JOIN_WINDOW"))
    for row in db.session.scalars(query.where(
            Originate.state == "sent", Originate.sent_at >= since,
            Originate.extension.in_([str(e).strip() for e in extensions]))
            .order_by(Originate.id)):
        if phone and machine.normalise_phone(row.phone, country) == phone:
            return row
    return None
