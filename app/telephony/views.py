"""``GET /api/v1/calls/route?phone=...``: the PBX asks whose client is calling.

Authenticated like ``POST /api/v1/calls/events`` (``Authorization: Bearer <the portal's
API key>``, app/ingress/auth.py); the key names the portal, so one portal's key only ever
reads and fills that portal's entries. Answers (app/ingress/PBX_EVENTS.md "Routing"):

- 200 ``{"extension": "102", "user_id": 2, "entity": {"type": "CONTACT", "id": 7}}``;
- 204: no preference (no match, nobody routable, or no answer within
  ``TELEPHONY_ROUTE_WAIT``): the PBX goes on with its own queue;
- 400 without ``phone``, 401 for a missing or unknown key, 503 when the key cannot be
  checked. Nothing is looked up or cached before the key is checked.
"""

from __future__ import annotations

import json
import logging
import time

import redis
from flask import Blueprint, Response, request
from sqlalchemy.exc import SQLAlchemyError

from app.ingress import auth
from app.ingress.auth import Rejected
from app.telephony import routing

bp = Blueprint("telephony", __name__)
log = logging.getLogger(__name__)
MAX_PHONE = 64  # characters; a longer "number" is not one


def _json(status: int, body: dict[str, object]) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status=status,
                    mimetype="application/json")


@bp.get("/api/v1/calls/route")
def route() -> Response:
    """The responsible employee's extension for ``phone``, or 204."""
    started = time.monotonic()  # the bound on the wait counts from here
    try:
        portal = auth.verify_api_key(request.headers.get("Authorization"))
    except Rejected as exc:
        log.info("routing refused: %s %s (%s)", exc.status, exc.reason, exc.detail)
        return _json(exc.status, {"error": exc.reason, "message": exc.message})
    except SQLAlchemyError as exc:
        log.error("API key lookup failed: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return _json(503, {"error": "db_unavailable", "message": "retry later"})
    phone = request.args.get("phone", "")
    if not phone.strip() or len(phone) > MAX_PHONE:
        return _json(400, {"error": "invalid_phone",
                           "message": f"phone is required (up to {MAX_PHONE} characters)"})
    try:
        match = routing.route(portal.id, phone, started)
    except redis.RedisError as exc:  # no cache, no lock: answer now rather than hang the PBX
        log.warning("routing without Redis for portal %s: %s", portal.member_id, exc)
        match = None
    answer = match.answer() if match is not None else None
    if answer is None:
        return Response(status=204)
    return _json(200, answer)
