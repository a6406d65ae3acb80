"""Inbox actors: process one row, and sweep up rows that got stuck or can leave the parking."""

from __future__ import annotations

import dramatiq

from app.config import env_int
from app.ingress import offline, processing, retention
from workers.scheduler import periodic

SWEEP_INTERVAL_SECONDS = env_int("INBOX_SWEEP_INTERVAL", 15)


@dramatiq.actor(queue_name="events", max_retries=processing.MAX_ATTEMPTS + 2,
                min_backoff=1000, max_backoff=30000)
def process_inbox_event(row_id: int) -> None:
    """Handle inbox row ``row_id`` (a no-op when it is already taken or finished)."""
    processing.process(row_id)


@periodic(SWEEP_INTERVAL_SECONDS)
@dramatiq.actor(queue_name="default", max_retries=0)
def sweep_inbox() -> None:
    """Queue again the inbox rows no worker finished, and parked rows that can go on now
    (``unhandled`` ones whose event now has a handler, ``held`` ones whose portal is active)."""
    processing.sweep()


@periodic(env_int("OFFLINE_PULL_INTERVAL", 30))
@dramatiq.actor(queue_name="default", max_retries=0)
def pull_offline_events() -> None:
    """Queue one pull per portal in offline events mode."""
    for portal_id in offline.offline_portal_ids():
        pull_offline_portal.send(portal_id)


@dramatiq.actor(queue_name="default", max_retries=3, min_backoff=5000)
def pull_offline_portal(portal_id: int) -> None:
    """Move one portal's Bitrix24 offline queue into the inbox."""
    offline.pull_portal(portal_id)


@periodic(env_int("INBOX_PRUNE_INTERVAL", 3600))
@dramatiq.actor(queue_name="default", max_retries=0)
def prune_inbox() -> None:
    """Delete finished inbox rows past their retention; expire rows parked too long."""
    retention.prune(retention.Retention.from_env())
