"""Prometheus metrics of the outgoing side (multiprocess-safe; see app/metrics.py).

The portal label is the portal's member_id. Outbox depth is counted in the database at
scrape time, like the inbox's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from flask import Flask
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from app.tenants.models import aware

INFLIGHT = Gauge("b24relay_dispatch_batches_in_flight", "Batches on the wire, per portal.",
                 ["portal"], multiprocess_mode="livesum")
ROUND_TRIP = Histogram("b24relay_dispatch_batch_seconds",
                       "Batch round trip, from sending to the answer (resends included).",
                       ["portal"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120))
LATENCY = Histogram("b24relay_dispatch_command_seconds",
                    "Command latency from submit to completion (done or dead).", ["portal"],
                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 60, 300, 3600))
RATE_LIMITED = Counter("b24relay_dispatch_rate_limited_total",
                       "Batches answered QUERY_LIMIT_EXCEEDED (503).", ["portal"])
REFRESHES = Counter("b24relay_dispatch_refreshes_total",
                    "Token refreshes the dispatcher asked for.", ["portal"])
OUTCOMES = Counter("b24relay_dispatch_commands_total",
                   "Commands by outcome of their batch: done, dead, queued (to be sent again).",
                   ["portal", "outcome"])


def inflight(portal: str, delta: int) -> None:
    """One more (or fewer) batch in flight for the portal."""
    INFLIGHT.labels(portal).inc(delta)


def round_trip(portal: str, seconds: float) -> None:
    """A batch came back."""
    ROUND_TRIP.labels(portal).observe(seconds)


def rate_limited(portal: str) -> None:
    """Bitrix24 refused a batch for the rate."""
    RATE_LIMITED.labels(portal).inc()


def refreshed(portal: str) -> None:
    """The dispatcher asked for a token refresh."""
    REFRESHES.labels(portal).inc()


def dead(portal: str, count: int) -> None:
    """Commands dead-lettered without being sent (their dependency is dead)."""
    OUTCOMES.labels(portal, "dead").inc(count)


def settled(portal: str, commands: Sequence[Any], rows: Sequence[dict[str, Any]],
            now: datetime) -> None:
    """Count a batch's outcomes and the latency of its finished commands."""
    submitted = {c.id: c.submitted_at for c in commands}
    for row in rows:
        OUTCOMES.labels(portal, row["status"]).inc()
        started = aware(submitted.get(row["id"]))
        if row["completed_at"] is not None and started is not None:
            LATENCY.labels(portal).observe((now - started).total_seconds())


class OutboxDepthCollector(Collector):
    """``b24relay_outbox_depth{portal,status,priority}`` counted at scrape time."""

    def describe(self) -> list[GaugeMetricFamily]:
        return [self._family()]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("b24relay_outbox_depth",
                                 "Outbox commands not done: queued, in flight and dead, per "
                                 "portal and priority (realtime, normal, bulk).",
                                 labels=["portal", "status", "priority"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from flask import has_app_context

        family = self._family()
        if has_app_context():  # the /metrics view; elsewhere there is no database to ask
            for labels, count in _depths():
                family.add_metric(labels, count)
        yield family


def _depths() -> list[tuple[list[str], int]]:
    from sqlalchemy import func, select

    from app.dispatcher.models import CommandStatus, OutboxCommand, Priority
    from app.extensions import db
    from app.tenants.models import Portal

    c = OutboxCommand
    query = (select(Portal.member_id, c.status, c.priority, func.count())
             .join(Portal, Portal.id == c.portal_id)
             .where(c.status != CommandStatus.DONE.value)
             .group_by(Portal.member_id, c.status, c.priority))
    try:
        rows = db.session.execute(query).all()
    except Exception:  # noqa: BLE001 - a scrape must not fail because the DB is down
        return []
    return [([m, s, Priority(p).name.lower()], n) for m, s, p, n in rows]


_collector = OutboxDepthCollector()


def init_app(app: Flask) -> None:
    """Expose the outbox depth on the registry /metrics serves."""
    registry = app.extensions.get("metrics_registry") or REGISTRY
    try:
        registry.register(_collector)
    except ValueError:
        pass  # already registered (several apps in one process)
