"""A Bitrix24 event delivery: its form parsed, and the common case stored in one statement.

The intake lane in front of Flask (app/ingress/lane.py) stores a new event whose
application token matches its portal's with the INSERT that checks the token
(:func:`stored_if_token_matches`); the ``/b24/events`` view, which gets everything else,
shares the parse and the answer (:func:`ack_body`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from flask import current_app
from sqlalchemy.exc import SQLAlchemyError

from app.ingress import budget, enqueuer, inbox, sealed, token_hash
from app.ingress.auth import Rejected
from app.ingress.formparse import MalformedBody, clip, parse_form
from app.ingress.registry import handler_for

log = logging.getLogger(__name__)

FORM_TYPE = "application/x-www-form-urlencoded"
MEMBER_ID = re.compile(r"[0-9A-Za-z_.-]{1,64}")
# Set in the WSGI environ by the intake lane (app/ingress/lane.py) when it tried the fast
# store and left the request to the view: when the request began.
LANE_STARTED = "b24relay.intake_lane.started"


def first_line(exc: Exception) -> str:
    """A database error without the SQL and parameters SQLAlchemy appends: those would put
    the sender's event, however large, into the log."""
    return clip(str(exc).partition("\n")[0], 200)


@dataclass(frozen=True)
class Delivery:
    """A well-formed Bitrix24 event POST, its sender not checked yet."""

    event: dict[str, Any]
    event_type: str
    member_id: str
    token: str | None
    size: int = 0  # of the body, in bytes


def parse_b24_form(body: bytes) -> Delivery:
    """A form body as a Bitrix24 event, or 400."""
    try:
        event = parse_form(body)
    except MalformedBody as exc:
        raise Rejected(400, "malformed", str(exc)) from exc
    name, given = event.get("event"), event.get("auth")
    auth_block = given if isinstance(given, dict) else {}
    if not isinstance(name, str) or not name.strip():
        raise Rejected(400, "malformed", "event is required")
    member_id = auth_block.get("member_id")
    if not isinstance(member_id, str) or not MEMBER_ID.fullmatch(member_id):
        raise Rejected(400, "malformed", "auth[member_id] is required (up to 64 letters/digits)")
    token = auth_block.get("application_token")
    return Delivery(event, name.strip().upper(), member_id,
                    token if isinstance(token, str) and token else None, len(body))


def over_limits(delivery: Delivery) -> Rejected | None:
    """Why a verified event may not be stored now, or None: over the size cap of an event
    type the app does not handle (413), or over its portal's budget (429, app/ingress/budget.py).
    """
    if (delivery.size > current_app.config["INTAKE_UNHANDLED_MAX_BYTES"]
            and handler_for("b24", delivery.event_type) is None):
        return Rejected(413, "too_large", "an event the app does not handle must be under "
                        f"{current_app.config['INTAKE_UNHANDLED_MAX_BYTES']} bytes")
    if not budget.budget().allows(delivery.member_id, delivery.size):
        return Rejected(429, "portal_budget", "too many events from this portal this minute; "
                        "retry later", detail=f"intake budget spent by portal {delivery.member_id}")
    return None


def stored_if_token_matches(delivery: Delivery) -> inbox.Stored | None:
    """The common case, one statement: the portal's stored token hash matches, the event
    is new. None sends the delivery down the checked path (it may still be accepted)."""
    if delivery.token is None or over_limits(delivery) is not None:  # the view says why
        return None
    if delivery.event_type.strip().upper() in inbox.HANDLER_KEY_IN_KEY:
        return None  # its key needs the request's handler key: the view has the request
    dedupe_key = inbox.b24_dedupe_key(delivery.event)  # with its tokens, as the view's
    # Stripped on a copy: should this statement not store it, the checked path needs the tokens.
    event = {**delivery.event, "auth": dict(delivery.event["auth"])}
    sealed.strip(event, delivery.event_type)
    new = inbox.NewEvent(member_id=delivery.member_id, source="b24",
                         event_type=delivery.event_type, payload=event, dedupe_key=dedupe_key)
    try:
        stored = inbox.store_verified(new, token_hash.of(delivery.token) or "")
    except SQLAlchemyError as exc:
        log.error("inbox unavailable, a b24 event refused: %s", first_line(exc))
        raise Rejected(503, "db_unavailable", "the event could not be stored; retry") from exc
    if stored is not None:
        budget.budget().spend(delivery.member_id, delivery.size)
        enqueuer.put(stored.id)  # sent by the process's enqueuer thread, with its neighbours
    return stored


def ack_body(row_id: int, duplicate: bool) -> bytes:
    """The answer to a stored Bitrix24 event (the view's and the intake lane's)."""
    return json.dumps({"id": row_id, "duplicate": duplicate}, separators=(",", ":")).encode()
