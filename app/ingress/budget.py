"""A per-portal budget for verified Bitrix24 events: so many events and bytes a minute.

Anyone holding a portal's application token (on full-form portals every employee: it is
in their iframe form) can post verified events, and each is a stored row: without a
bound, four connections grew the database every tenant shares by 34 MB in 3 s. So each
portal may store at most ``INTAKE_EVENTS_PER_PORTAL_PER_MINUTE`` events and
``INTAKE_BYTES_PER_PORTAL_PER_MINUTE`` bytes of them per minute; beyond that, its events
are answered 429 (counted as ``b24relay_events_rejected_total{reason="portal_budget"}``)
until the minute ends. Other portals are not touched. Only verified events count, so
nobody without the token can spend a portal's budget. (Event types the app has no
handler for have a lower size cap too: ``INTAKE_UNHANDLED_MAX_BYTES``, in the view.)

The choice, to keep the intake lane's fast path cheap: no Redis call per event. Each
process keeps what it stored per portal in the current minute, and adds it to the
minute's shared counters in Redis (one HINCRBY pipeline, reading back every process's
total) each time it holds a twentieth of the portal's budget unshared: a portal far
below its budget costs no Redis call at all (a flush per second per portal cost a round
trip per event with 1,000 portals sending a few events a second each, bench/ingest), and
a flood one call per twentieth. So the budget holds to within a twentieth of it per
process (every process may admit that much before it learns the others' totals). When
Redis cannot be asked, each process goes on with its own count (fail open, as the
first-contact ceilings do): it still refuses a flood that reaches the budget within it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis
from flask import Flask, current_app

from app.ingress.inbox import fast_redis
from app.redis_breaker import RedisBreaker

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60
FLUSH_SHARE = 20  # share once a process holds 1/20 of a budget unshared


@dataclass
class _Tally:
    """One portal's minute as this process knows it."""

    window: int
    shared_events: int = 0  # every process's total at the last flush
    shared_bytes: int = 0
    events: int = 0  # stored here since the last flush
    bytes: int = 0


class Budget:
    """The per-portal budget of one process (see the module docstring)."""

    def __init__(self, app: Flask) -> None:
        self.events = int(app.config["INTAKE_EVENTS_PER_PORTAL_PER_MINUTE"])
        self.bytes = int(app.config["INTAKE_BYTES_PER_PORTAL_PER_MINUTE"])
        self.redis = fast_redis(app.config["REDIS_URL"])
        self.prefix = f"{app.config['DRAMATIQ_NAMESPACE']}:intake-budget"
        self.tallies: dict[str, _Tally] = {}
        self.lock = threading.Lock()
        self.breaker = RedisBreaker()

    def allows(self, member_id: str, size: int) -> bool:
        """Whether the portal may store another event of ``size`` bytes this minute (no I/O)."""
        tally = self.tallies.get(member_id)
        if tally is None or tally.window != _window():
            return size <= self.bytes
        return (tally.shared_events + tally.events < self.events
                and tally.shared_bytes + tally.bytes + size <= self.bytes)

    def spend(self, member_id: str, size: int) -> None:
        """Count a stored event of ``size`` bytes; share the counts when due."""
        window = _window()
        with self.lock:
            tally = self.tallies.get(member_id)
            if tally is None or tally.window != window:
                tally = self.tallies[member_id] = _Tally(window)
            tally.events += 1
            tally.bytes += size
            due = (tally.events * FLUSH_SHARE >= self.events
                   or tally.bytes * FLUSH_SHARE >= self.bytes)
            if not due or not self.breaker.allow():
                return
            events, size, tally.events, tally.bytes = tally.events, tally.bytes, 0, 0
        self._share(member_id, tally, events, size)

    def _share(self, member_id: str, tally: _Tally, events: int, size: int) -> None:
        """Add this process's counts to the minute's shared ones; keep every process's sum."""
        key = f"{self.prefix}:{tally.window}:{member_id}"
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(key, "events", events)
            pipe.hincrby(key, "bytes", size)
            pipe.expire(key, 2 * WINDOW_SECONDS)
            total_events, total_bytes, _ = pipe.execute()
        except redis.RedisError as exc:
            with self.lock:  # kept here: this process still counts them
                tally.events += events
                tally.bytes += size
                self.breaker.failed()
            log.warning("per-portal intake budget not shared, Redis unavailable: %s", exc)
            return
        with self.lock:
            tally.shared_events = max(tally.shared_events, int(total_events))
            tally.shared_bytes = max(tally.shared_bytes, int(total_bytes))


def _window() -> int:
    return int(time.time() // WINDOW_SECONDS)


def budget() -> Budget:
    """The current app's budget in this process."""
    ext = current_app.extensions
    found = ext.get("intake_budget")
    if found is None:
        found = ext["intake_budget"] = Budget(current_app._get_current_object())  # type: ignore[attr-defined]
    return found
