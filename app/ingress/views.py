"""The two intake endpoints: verify, store, enqueue, answer — nothing else.

Bitrix24 never resends an event, so the answer must be fast and must never be a
200 for something that was not stored: when the database is down the answer is
503 (the PBX retries on it; for Bitrix24 the loss is counted in
``b24relay_events_rejected_total{reason="db_unavailable"}``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from flask import Blueprint, Response, current_app, request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import RequestEntityTooLarge

from app.ingress import (
    auth,
    budget,
    first_contact,
    inbox,
    metrics,
    ordering,
    pbx,
    provisional,
    sealed,
)
from app.ingress.auth import Rejected
from app.ingress.delivery import (
    FORM_TYPE,
    LANE_STARTED,
    Delivery,
    ack_body,
    first_line,
    over_limits,
    parse_b24_form,
)
from app.ingress.models import InboxStatus

bp = Blueprint("ingress", __name__)
log = logging.getLogger(__name__)



def _body() -> bytes:
    """The raw body, refusing anything over MAX_CONTENT_LENGTH (with or without a length).

    A chunked body has no length to check up front, and werkzeug's stream stops
    quietly at the limit: the body would be stored cut. So the stream is allowed one
    byte more than the limit, and a body that fills it is refused whole.
    """
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if not limit:
        return request.get_data(cache=False)
    too_large = Rejected(413, "too_large", f"body over {limit} bytes")
    if (request.content_length or 0) > limit:
        raise too_large
    request.max_content_length = limit + 1  # before the stream is first touched
    try:
        body = request.get_data(cache=False)
    except RequestEntityTooLarge as exc:
        raise too_large from exc
    if len(body) > limit:
        raise too_large
    return body


def _answer(source: str, started: float, status: int,
            body: dict[str, Any] | bytes) -> tuple[Response, int]:
    metrics.ACK_LATENCY.labels(source).observe(time.perf_counter() - started)
    # json.dumps straight into a Response: jsonify's provider lookup costs 3% of intake.
    raw = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":"))
    return Response(raw, mimetype="application/json"), status


def _refuse(source: str, started: float, exc: Rejected) -> tuple[Response, int]:
    metrics.REJECTED.labels(source, exc.reason).inc()
    log.info("%s event refused: %s %s (%s)", source, exc.status, exc.reason, exc.detail)
    return _answer(source, started, exc.status,
                   {"error": exc.reason, "message": exc.message, **exc.extra})


def _store_and_queue(source: str, events: list[inbox.NewEvent]) -> list[inbox.Stored]:
    try:
        stored = inbox.store(events)
    except SQLAlchemyError as exc:
        log.error("inbox unavailable, %d %s event(s) refused: %s", len(events), source,
                  first_line(exc))
        raise Rejected(503, "db_unavailable", "the event could not be stored; retry") from exc
    fresh = [s.id for s, ev in zip(stored, events, strict=True)
             if s.created and ev.status == InboxStatus.QUEUED.value]  # not provisional ones
    if fresh:
        inbox.enqueue(fresh, source)
    return stored


def _parse_b24(body: bytes) -> Delivery:
    """The body as a Bitrix24 event, or 400 (checked before any token is)."""
    if request.mimetype != FORM_TYPE:
        raise Rejected(400, "malformed", f"Content-Type must be {FORM_TYPE}")
    return parse_b24_form(body)


def _b24_event(delivery: Delivery) -> inbox.NewEvent:
    """The checked path: who sent it (first contact, provisional, forged), then the row."""
    event, event_type, member_id = delivery.event, delivery.event_type, delivery.member_id
    token = delivery.token
    sender = auth.verify_b24(member_id, token, event_type)
    verified = not (sender.unverified or sender.provisional)
    if verified and (refused := over_limits(delivery)) is not None:
        raise refused
    dedupe_key = inbox.b24_dedupe_key(event, request.args.get("k"))
    # Checked (or, provisional, sealed to be checked later): no row keeps a token in clear.
    sealed.strip(event, event_type, claim=sender.provisional)
    if sender.unverified:  # anyone can send one: keep it small, and count it
        event = first_contact.pruned(event)
        first_contact.admit(request.remote_addr, sender.portal, request.args.get("k"))
    if sender.provisional:
        dedupe_key = _kept_for_later(event, sender, token or "", dedupe_key)
    return inbox.NewEvent(
        member_id=member_id, source="b24", event_type=event_type,
        payload=event, dedupe_key=dedupe_key,
        portal_id=sender.portal.id if sender.portal else None,
        unverified=sender.unverified or sender.provisional,
        status=provisional.STATUS if sender.provisional else InboxStatus.QUEUED.value)


def _kept_for_later(event: dict[str, Any], sender: auth.Sender, token: str,
                    dedupe_key: str) -> str:
    """Admit a provisional event (size, the portal's ceiling); its dedupe key."""
    assert sender.portal is not None  # only a known portal awaits its token
    if len(json.dumps(event)) > provisional.MAX_STORED_BYTES:
        raise Rejected(413, "too_large", f"an event kept before the install event must be "
                                         f"under {provisional.MAX_STORED_BYTES} bytes")
    first_contact.admit_provisional(sender.portal, request.remote_addr, request.args.get("k"))
    return provisional.dedupe_key(dedupe_key, token)


@bp.post("/b24/events")
def b24_events() -> tuple[Response, int]:
    """Bitrix24's event POST: 200 once stored (a duplicate delivery is stored once).

    The common case (a new event whose token matches) is answered by the intake lane
    before Flask sees it (app/ingress/lane.py); what reaches this view takes the checked
    path.
    """
    started = request.environ.get(LANE_STARTED) or time.perf_counter()
    metrics.RECEIVED.labels("b24").inc()
    try:
        delivery = _parse_b24(_body())
        event = _b24_event(delivery)
        stored = _store_and_queue("b24", [event])
        if stored[0].created and event.status == provisional.STATUS:
            provisional.OUTCOMES.labels("kept").inc()
        elif stored[0].created and not event.unverified:
            budget.budget().spend(delivery.member_id, delivery.size)
    except Rejected as exc:
        return _refuse("b24", started, exc)
    except SQLAlchemyError as exc:  # the portal lookup itself failed
        log.error("portal lookup failed: %s", first_line(exc))
        return _refuse("b24", started, Rejected(503, "db_unavailable", "retry later"))
    return _answer("b24", started, 200, ack_body(stored[0].id, duplicate=not stored[0].created))


def _pbx_events(body: bytes, portal: auth.KnownPortal) -> list[inbox.NewEvent]:
    if pbx.holds_nul(body):
        raise Rejected(400, "malformed", "a NUL character in the body")
    try:
        data, non_finite = pbx.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise Rejected(400, "malformed", f"body is not JSON: {exc}") from exc
    if pbx.deeper_than(data):
        raise Rejected(400, "malformed", f"JSON nested deeper than {pbx.MAX_DEPTH} levels")
    try:
        if non_finite:
            raise pbx.InvalidEvent(pbx.non_finite_field(data) or "body", "must be a finite number")
        events = pbx.validate_body(data)
    except pbx.InvalidEvent as exc:
        raise Rejected(422, "invalid_event", exc.message, field=exc.field) from exc
    return [inbox.NewEvent(member_id=portal.member_id, source="pbx", event_type=ev["event"],
                           payload=ev, dedupe_key=inbox.digest(ev), portal_id=portal.id,
                           order_key=ordering.pbx_key(ev))  # one call's events in order
            for ev in events]


@bp.post("/api/v1/calls/events")
def pbx_call_events() -> tuple[Response, int]:
    """The PBX's call events (one object or ``{"events": [...]}``): 202 with the inbox ids."""
    started = time.perf_counter()
    metrics.RECEIVED.labels("pbx").inc()
    try:
        body = _body()
        portal = auth.verify_api_key(request.headers.get("Authorization"))
        stored = _store_and_queue("pbx", _pbx_events(body, portal))
    except Rejected as exc:
        return _refuse("pbx", started, exc)
    except SQLAlchemyError as exc:
        log.error("API key lookup failed: %s", first_line(exc))
        return _refuse("pbx", started, Rejected(503, "db_unavailable", "retry later"))
    return _answer("pbx", started, 202, {
        "ids": [s.id for s in stored],
        "duplicates": sum(1 for s in stored if not s.created)})


@bp.record_once
def _init_intake(state: Any) -> None:
    metrics.init_app(state.app)  # the inbox depth on /metrics
    inbox.init_app(state.app)  # the intake broker
