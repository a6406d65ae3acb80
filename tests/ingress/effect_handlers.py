"""Handlers loaded into real worker processes by the ingress tests (``dramatiq workers <this>``).

Each one leaves a visible effect in ``ingress_test_effects`` inside the transaction
that finishes the inbox row, so a test can count how often an event took effect.
"""

from __future__ import annotations

import os
import time
from typing import Any

from sqlalchemy import select, text

from app.bitrix import errors
from app.extensions import db
from app.ingress.models import InboxEvent
from app.ingress.processing import TransientError
from app.ingress.registry import on
from app.tenants.status import ensure_callable

EFFECTS_TABLE = "ingress_test_effects"


def _record(event: dict[str, Any]) -> None:
    db.session.execute(text(f"INSERT INTO {EFFECTS_TABLE} (inbox_id, pid) VALUES (:id, :pid)"),
                       {"id": event["inbox_id"], "pid": os.getpid()})


@on("TESTEFFECT")
def effect(portal: Any, event: dict[str, Any]) -> None:
    """Record the effect; ``data[SLEEP]`` seconds of work first (to be killed during)."""
    time.sleep(float((event.get("data") or {}).get("SLEEP") or 0))
    _record(event)


FIRST_FAILURES = {
    "ours": lambda: TransientError("portal timed out"),
    "transport": lambda: errors.TransportError("connection reset", None),
    "rate": lambda: errors.QueryLimitExceeded("QUERY_LIMIT_EXCEEDED", "Too many requests", 503),
}


@on("TESTFLAKY")
def flaky(portal: Any, event: dict[str, Any]) -> None:
    """Fails on the first attempt with the transient error named in ``data[ERROR]``."""
    attempts = db.session.scalar(select(InboxEvent.attempts)
                                 .where(InboxEvent.id == event["inbox_id"]))
    if attempts < 2:
        raise FIRST_FAILURES[event["data"]["ERROR"]]()
    _record(event)


@on("TESTHANGFIRST")
def hang_first(portal: Any, event: dict[str, Any]) -> None:
    """Blocks for an hour on the first attempt (a worker to kill holding it), then records."""
    attempts = db.session.scalar(select(InboxEvent.attempts)
                                 .where(InboxEvent.id == event["inbox_id"]))
    db.session.rollback()  # hold no transaction (SQLite's lock) while it blocks
    if attempts < 2:
        time.sleep(3600)
    _record(event)


@on("TESTDOWN")
def down(portal: Any, event: dict[str, Any]) -> None:
    """Always fails transiently."""
    raise TransientError("portal still down")


@on("TESTBROKEN")
def broken(portal: Any, event: dict[str, Any]) -> None:
    """A bug: retrying cannot help."""
    raise KeyError("FIELDS")


@on("TESTPAUSED")
def paused(portal: Any, event: dict[str, Any]) -> None:
    """Does what any Bitrix24-calling handler does first: refuse a portal whose status holds."""
    ensure_callable(portal)
    _record(event)


if os.environ.get("INGRESS_TEST_LATE_HANDLER"):
    # A handler that "arrives with a deploy": only workers started with this variable have it.
    # (Every PBX event kind has its handler now; a Bitrix24 event the app does not handle
    # plays the part.)
    @on("ONCRMLEADADD")
    def late_lead(portal: Any, event: dict[str, Any]) -> None:
        """Record the effect of a lead event."""
        _record(event)


ORDER_TABLE = "ingress_test_order"


def record_order(portal: Any, event: dict[str, Any]) -> None:
    """Record when this call event's handling started and ended, around a little work."""
    started = time.time()
    time.sleep(0.01)
    db.session.execute(text(f"INSERT INTO {ORDER_TABLE} (call_id, inbox_id, started, ended)"
                            " VALUES (:call, :id, :started, :ended)"),
                       {"call": event["call_id"], "id": event["inbox_id"], "started": started,
                        "ended": time.time()})


if os.environ.get("INGRESS_TEST_ORDER_HANDLER"):
    # Only workers started with this variable have it: the test process's registry stays as is.
    from app.ingress import pbx, registry

    for _kind in pbx.EVENTS:
        # Stands in for telephony's handler (the factory registered it): this test watches
        # the order alone, without a portal on the other side.
        registry._handlers.drop(("pbx", _kind.upper()))
        on(_kind, source="pbx")(record_order)
