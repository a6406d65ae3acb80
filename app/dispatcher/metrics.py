"""Prometheus metrics of the outgoing side (multiprocess-safe; see app/metrics.py).

Series are labelled by the portal's plan (standard, enterprise), never by its member_id or
domain: /metrics would otherwise list the customers, and the member_id is what a forged
ONAPPINSTALL needs (issue 21). The plan is a bounded set and is what the rate limits, K and
the bucket depend on; a per-portal view belongs to the dashboard. Outbox depth is counted in
the database at scrape time, like the inbox's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from flask import Flask
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from app.tenants.models import Plan, aware

PLANS = frozenset(p.value for p in Plan)
OTHER_PLAN = "other"


def plan_label(plan: str | None) -> str:
    """A plan as a metric label, from the bounded set of Plan values (else ``other``)."""
    return plan if plan in PLANS else OTHER_PLAN


INFLIGHT = Gauge("b24relay_dispatch_batches_in_flight", "Batches on the wire, per plan.",
                 ["plan"], multiprocess_mode="livesum")
ROUND_TRIP = Histogram("b24relay_dispatch_batch_seconds",
                       "Batch round trip, from sending to the answer (resends included).",
                       ["plan"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120))
LATENCY = Histogram("b24relay_dispatch_command_seconds",
                    "Command latency from submit to completion (done or dead).", ["plan"],
                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 60, 300, 3600))
RATE_LIMITED = Counter("b24relay_dispatch_rate_limited_total",
                       "Batches answered QUERY_LIMIT_EXCEEDED (503).", ["plan"])
REFRESHES = Counter("b24relay_dispatch_refreshes_total",
                    "Token refreshes the dispatcher asked for.", ["plan"])
OUTCOMES = Counter("b24relay_dispatch_commands_total",
                   "Commands by outcome of their batch: done, dead, queued (to be sent again).",
                   ["plan", "outcome"])


def inflight(plan: str, delta: int) -> None:
    """One more (or fewer) batch in flight for a portal on ``plan``."""
    INFLIGHT.labels(plan_label(plan)).inc(delta)


def round_trip(plan: str, seconds: float) -> None:
    """A batch came back."""
    ROUND_TRIP.labels(plan_label(plan)).observe(seconds)


def rate_limited(plan: str) -> None:
    """Bitrix24 refused a batch for the rate."""
    RATE_LIMITED.labels(plan_label(plan)).inc()


def refreshed(plan: str) -> None:
    """The dispatcher asked for a token refresh."""
    REFRESHES.labels(plan_label(plan)).inc()


def dead(plan: str, count: int) -> None:
    """Commands dead-lettered without being sent (their dependency is dead)."""
    OUTCOMES.labels(plan_label(plan), "dead").inc(count)


def settled(plan: str, commands: Sequence[Any], rows: Sequence[dict[str, Any]],
            now: datetime) -> None:
    """Count a batch's outcomes and the latency of its finished commands."""
    submitted, label = {c.id: c.submitted_at for c in commands}, plan_label(plan)
    for row in rows:
        OUTCOMES.labels(label, row["status"]).inc()
        started = aware(submitted.get(row["id"]))
        if row["completed_at"] is not None and started is not None:
            LATENCY.labels(label).observe((now - started).total_seconds())


class OutboxDepthCollector(Collector):
    """``b24relay_outbox_depth{plan,status,priority}`` counted at scrape time."""

    def describe(self) -> list[GaugeMetricFamily]:
        return [self._family()]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("b24relay_outbox_depth",
                                 "Outbox commands not done: queued, in flight and dead, per "
                                 "plan and priority (realtime, normal, bulk).",
                                 labels=["plan", "status", "priority"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from flask import has_app_context

        family = self._family()
        if has_app_context():  # the /metrics view; elsewhere there is no database to ask
            for labels, count in _depths():
                family.add_metric(list(labels), count)
        yield family


def _depths() -> list[tuple[tuple[str, str, str], int]]:
    from collections import Counter as Tally

    from sqlalchemy import func, select

    from app.dispatcher.models import CommandStatus, OutboxCommand, Priority
    from app.extensions import db
    from app.tenants.models import Portal

    c = OutboxCommand
    query = (select(Portal.plan, c.status, c.priority, func.count())
             .join(Portal, Portal.id == c.portal_id)
             .where(c.status != CommandStatus.DONE.value)
             .group_by(Portal.plan, c.status, c.priority))
    try:
        rows = db.session.execute(query).all()
    except Exception:  # noqa: BLE001 - a scrape must not fail because the DB is down
        return []
    depths: Tally[tuple[str, str, str]] = Tally()
    for plan, status, priority, count in rows:  # summed: plans outside Plan share "other"
        depths[(plan_label(plan), status, Priority(priority).name.lower())] += count
    return sorted(depths.items())


_collector = OutboxDepthCollector()


def init_app(app: Flask) -> None:
    """Expose the outbox depth on the registry /metrics serves."""
    from app.dispatcher.stats import PortalCollector

    registry = app.extensions.get("metrics_registry") or REGISTRY
    for collector in (_collector, PortalCollector(int(app.config["METRICS_PORTALS"]))):
        try:
            registry.register(collector)
        except ValueError:
            pass  # already registered (several apps in one process)
