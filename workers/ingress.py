"""Inbox actors: process one row, and sweep up rows that got stuck or can leave the parking."""

from __future__ import annotations

import dramatiq

from app.ingress import offline, processing, retention
from workers.scheduler import periodic


def _asked_to_retry(retries: int, exception: BaseException) -> bool:
    """Retry only when processing asks: the row's attempts are the one budget.

    Anything else (the claim failed: the database is down) is left to the sweeper, which
    queues the row again; the row spent no attempt.
    """
    return isinstance(exception, dramatiq.Retry)


@dramatiq.actor(queue_name="events", retry_when=_asked_to_retry)
def process_inbox_event(row_id: int) -> None:
    """Handle inbox row ``row_id`` (a no-op when it is already taken or finished)."""
    try:
        processing.process(row_id)
    except processing.RetryLater as exc:
        raise dramatiq.Retry(str(exc), delay=int(exc.delay * 1000)) from exc


@dramatiq.actor(queue_name="events", max_retries=5, min_backoff=200)
def process_inbox_events(row_ids: list[int]) -> None:
    """Rows intake queued together in one message (app/ingress/enqueuer.py): one message each,
    so that every row is claimed and retried on its own (sending twice is harmless)."""
    for row_id in row_ids:
        process_inbox_event.send(row_id)


@periodic("INBOX_SWEEP_INTERVAL")
@dramatiq.actor(queue_name="default", max_retries=0)
def sweep_inbox() -> None:
    """Queue again the inbox rows no worker finished, and parked rows that can go on now
    (``unhandled`` ones whose event now has a handler, ``held`` ones whose portal is active)."""
    processing.sweep()


@periodic("OFFLINE_PULL_INTERVAL")
@dramatiq.actor(queue_name="default", max_retries=0)
def pull_offline_events() -> None:
    """Queue one pull per portal in offline events mode."""
    for portal_id in offline.offline_portal_ids():
        pull_offline_portal.send(portal_id)


@dramatiq.actor(queue_name="default", max_retries=3, min_backoff=5000)
def pull_offline_portal(portal_id: int) -> None:
    """Move one portal's Bitrix24 offline queue into the inbox."""
    offline.pull_portal(portal_id)


@periodic("INBOX_PRUNE_INTERVAL")
@dramatiq.actor(queue_name="default", max_retries=0)
def prune_inbox() -> None:
    """Delete finished inbox rows past their retention; expire rows parked too long."""
    retention.prune(retention.Retention.from_config())
