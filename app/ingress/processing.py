"""Run one inbox row through its handler, exactly once in effect.

A worker first *claims* the row (one atomic UPDATE from received/queued to
processing, which bumps ``attempts``); a second message for the same row finds
nothing to claim and does nothing. A row with an ordering key (a PBX call's events)
is claimed only once the earlier rows of its key are finished, and its end lets the
next one go (app/ingress/ordering.py): one key's rows are handled one at a time, in
order of arrival. Writes a handler leaves uncommitted in the
session are committed together with the final status, and only while the claim
is still ours. Some handlers commit on their own (the install and lifecycle
handlers store token chains at once, on purpose): they must be idempotent, since
a worker that dies after such a commit leaves the row to be handed out again.

A row whose event has no handler yet is parked as ``unhandled``; a handler that
raises ``PortalUnavailable`` (the portal's status holds its calls) parks the row
as ``held``. Neither spends an attempt; the sweeper queues parked rows again
once a handler exists or the portal is callable again.

Handlers receive ``(portal_or_None, event)`` where ``event`` is the stored
payload plus ``inbox_id`` and ``unverified`` (True for a first-contact
ONAPPINSTALL whose application_token could not be checked yet). Intake stored
no token in clear (app/ingress/sealed.py): ONAPPINSTALL's and ONAPPUPDATE's, and
ONEXTERNALCALLSTART's clicker's access token, are unsealed back into ``event["auth"]``
here, in memory only; other events have none.
"""

from __future__ import annotations

import copy
import logging
from datetime import timedelta
from typing import Any, cast

from flask import current_app
from sqlalchemy import CursorResult, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app.bitrix import errors as bitrix_errors
from app.extensions import db
from app.ingress import heartbeat, inbox, metrics, ordering, provisional, sealed
from app.ingress.models import PENDING, InboxEvent, InboxStatus
from app.ingress.registry import handler_for, registered
from app.tenants.models import Portal, aware, utcnow
from app.tenants.status import PortalUnavailable

log = logging.getLogger(__name__)


class TransientError(Exception):
    """Raise from a handler for a failure worth retrying later (with backoff)."""


class RetryLater(Exception):  # noqa: N818 - an instruction to the caller, not a failure kind
    """Raised by :func:`process` while the row is within its retry horizon: deliver it again in
    ``delay`` seconds. Time (``INBOX_RETRY_HORIZON_HOURS`` since the row arrived) is the only
    retry budget, not a count of attempts: a Bitrix24 outage of minutes must not turn events
    into dead letters."""

    def __init__(self, delay: float, cause: str) -> None:
        super().__init__(cause)
        self.delay = delay


class PermanentError(Exception):
    """Raise from a handler for a failure no retry can fix (the row goes dead at once)."""


# Failures that retry: ours, database outages, and the Bitrix24 client's transient ones.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TransientError, OperationalError, InterfaceError, PoolTimeout,
    bitrix_errors.TransportError, bitrix_errors.QueryLimitExceeded, bitrix_errors.OverloadLimit,
    bitrix_errors.OperationTimeLimit, bitrix_errors.ServerError)


def _setting(name: str) -> float:
    """A tuning knob declared in app/config.py."""
    return float(current_app.config[name])


def retry_delay(attempt: int) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1, 2, ...): doubling, capped."""
    first, cap = _setting("INBOX_RETRY_BACKOFF"), _setting("INBOX_RETRY_BACKOFF_MAX")
    return min(cap, first * 2 ** (attempt - 1))


def past_horizon(row: InboxEvent) -> bool:
    """Whether the row has been retried for ``INBOX_RETRY_HORIZON_HOURS`` since it arrived."""
    horizon = timedelta(hours=_setting("INBOX_RETRY_HORIZON_HOURS"))
    arrived = aware(row.received_at) or utcnow()
    return utcnow() - arrived >= horizon


def _claim(row_id: int) -> int | None:
    """received/queued -> processing; the new attempt number, or None if not ours to take
    (taken, finished, or waiting for an earlier row of its ordering key)."""
    attempt = db.session.execute(
        update(InboxEvent)
        .where(InboxEvent.id == row_id, InboxEvent.status.in_(PENDING),
               ordering.first_of_its_key())
        .values(status=InboxStatus.PROCESSING.value, attempts=InboxEvent.attempts + 1,
                claimed_at=utcnow())
        .returning(InboxEvent.attempts)
        .execution_options(synchronize_session=False)).scalar()
    db.session.commit()
    return attempt


def _update_if_ours(row_id: int, attempt: int, **values: Any) -> int:
    """Write ``values`` to the row only while the claim is still ours; rows written (0 or 1).

    Ours means still processing under our attempt number: the sweeper requeueing the row
    changes its status, another worker claiming it since changes the attempt.
    """
    return cast(CursorResult, db.session.execute(  # a DML statement's result
        update(InboxEvent)
        .where(InboxEvent.id == row_id, InboxEvent.status == InboxStatus.PROCESSING.value,
               InboxEvent.attempts == attempt)
        .values(**values)
        .execution_options(synchronize_session=False))).rowcount


def _finish(row: InboxEvent, attempt: int, status: InboxStatus, error: str | None = None) -> bool:
    """Record the outcome (with the handler's writes) if the claim is still ours."""
    clean = sealed.scrubbed(row.payload)
    # Most payloads hold no token (intake strips them): only a changed one is written back.
    rewrite = {"payload": clean} if clean is not row.payload else {}
    row_id, source, event_type = row.id, row.source, row.event_type  # not reloaded after commit
    done = _update_if_ours(row_id, attempt, status=status.value, last_error=error,
                           processed_at=utcnow(), **rewrite)
    if not done:
        db.session.rollback()
        log.warning("inbox row %s was taken over by another worker; result discarded", row_id)
        return False
    db.session.commit()
    metrics.PROCESSED.labels(source, event_type, status.value).inc()
    return True


def _park(row: InboxEvent, attempt: int, status: InboxStatus, why: str) -> bool:
    """Park a claimed row (unhandled/held) without spending the attempt; payload kept."""
    done = _update_if_ours(row.id, attempt, status=status.value, attempts=attempt - 1,
                           last_error=why, claimed_at=utcnow())
    db.session.commit()
    if done:
        metrics.PROCESSED.labels(row.source, row.event_type, status.value).inc()
    return bool(done)


def _release(row_id: int, attempt: int, error: str) -> None:
    """Hand a transiently failed row back (queued) for the broker's delayed retry."""
    _update_if_ours(row_id, attempt, status=InboxStatus.QUEUED.value, last_error=error,
                    claimed_at=utcnow())
    db.session.commit()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def process(row_id: int) -> str:
    """Claim, handle and finish one row; return the outcome.

    Raises :class:`RetryLater` when a transient failure happens within the row's retry
    horizon: deliver it again then (the row still holds its ordering key's later rows back).
    A database error from the claim itself propagates; no attempt was spent, and the sweeper
    queues the row again.
    """
    attempt = _claim(row_id)
    if attempt is None:
        return "not_claimed"
    row = db.session.get(InboxEvent, row_id)
    assert row is not None  # we just claimed it
    portal_id, order_key = row.portal_id, row.order_key
    with heartbeat.holding(row_id, attempt):  # renewed while it runs: see app/ingress/heartbeat.py
        outcome = _handle(row, attempt)
    ordering.wake_next(portal_id, order_key)  # finished or parked: the key's next row may go
    return outcome


def _handle(row: InboxEvent, attempt: int) -> str:
    """Run a claimed row's handler and record the outcome (see :func:`process`)."""
    row_id = row.id
    handler = handler_for(row.source, row.event_type)
    if handler is None:
        _park(row, attempt, InboxStatus.UNHANDLED, "no handler registered for this event yet")
        return InboxStatus.UNHANDLED.value
    portal = db.session.get(Portal, row.portal_id) if row.portal_id else None
    # The tokens intake sealed (ONAPPINSTALL, ONAPPUPDATE; a click's user token) go back
    # into event["auth"] for the handler, in memory only.
    payload = sealed.unsealed(row.payload) if row.source == "b24" else copy.deepcopy(row.payload)
    event = {**payload, "inbox_id": row.id, "unverified": row.unverified}
    try:
        handler(portal, event)
    except PortalUnavailable as exc:
        db.session.rollback()
        _park(row, attempt, InboxStatus.HELD, _describe(exc))
        return InboxStatus.HELD.value
    except TRANSIENT_ERRORS as exc:
        db.session.rollback()
        why = _describe(exc)
        if past_horizon(row):
            hours = _setting("INBOX_RETRY_HORIZON_HOURS")
            _finish(row, attempt, InboxStatus.DEAD,
                    f"gave up after {hours:g} h ({attempt} attempts): {why}")
            return InboxStatus.DEAD.value
        _release(row_id, attempt, why)
        metrics.PROCESSED.labels(row.source, row.event_type, "retry").inc()
        raise RetryLater(retry_delay(attempt), why) from exc
    except Exception as exc:  # noqa: BLE001 - anything else will not heal by retrying
        db.session.rollback()
        log.exception("handler for inbox row %s failed for good", row_id)
        _finish(row, attempt, InboxStatus.DEAD, _describe(exc))
        return InboxStatus.DEAD.value
    event_type, member_id = row.event_type, row.member_id
    if not _finish(row, attempt, InboxStatus.DONE):
        return "lost_claim"
    provisional.after_handled(event_type, member_id)  # kept while its token was missing
    return InboxStatus.DONE.value


def sweep() -> int:
    """Queue again what no worker finished (lost message, killed worker: its claims' heartbeat
    stopped) and the parked rows that can go on now (a handler was registered, the portal is
    active again)."""
    requeued = inbox.requeue_stuck(inbox.SweepPolicy(
        received_after=_setting("INBOX_REQUEUE_RECEIVED_AFTER"),
        queued_after=_setting("INBOX_REQUEUE_AFTER"),
        queued_after_cap=_setting("INBOX_REQUEUE_AFTER_CAP"),
        processing_after=_setting("INBOX_HEARTBEAT_TIMEOUT"),
        handled={source: registered(source) for source in ("b24", "pbx")}))
    if requeued:
        log.info("sweeper queued %d stuck inbox rows again", requeued)
    return requeued + provisional.sweep()
