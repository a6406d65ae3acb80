"""Prometheus metrics of the incoming side (multiprocess-safe; see app/metrics.py)."""

from __future__ import annotations

from collections.abc import Iterator

from flask import Flask
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from app.ingress.pbx import EVENTS as PBX_EVENTS  # checked before anything is stored
from app.ingress.registry import handler_for

OTHER_EVENTS = "other"


def event_label(source: str, event_type: str) -> str:
    """An event's name as a metric label, from a bounded set.

    Anyone holding a portal's application_token can invent event names, and a label
    per name would grow the metric without bound: a name keeps its own series only
    when a handler is registered for it (or it is one of the PBX's five), every
    other name counts as ``other``.
    """
    if handler_for(source, event_type) is not None:
        return event_type
    if source == "pbx" and event_type in PBX_EVENTS:
        return event_type
    return OTHER_EVENTS


class ByEventType:
    """A counter whose second label is an event name, always bounded by ``event_label``.

    Bounded here, where the metric is defined, so no call site can forget it.
    """

    def __init__(self, counter: Counter) -> None:
        self._counter = counter

    def labels(self, source: str, event_type: str, *rest: str) -> Counter:
        """The child for ``source``, the event's bounded label, and any further labels."""
        return self._counter.labels(source, event_label(source, event_type), *rest)


RECEIVED = Counter("b24relay_events_received_total",
                   "Events that reached an intake endpoint.", ["source"])
REJECTED = Counter("b24relay_events_rejected_total",
                   "Events answered with an error and not stored; reason=db_unavailable "
                   "is an event lost unless its sender retries.", ["source", "reason"])
STORED = ByEventType(Counter("b24relay_events_stored_total",
                             "Events written to the inbox (duplicates not counted); type is "
                             "the event's name if it has a handler, else other.",
                             ["source", "type"]))
DUPLICATES = Counter("b24relay_events_duplicate_total",
                     "Deliveries of an event already in the inbox.", ["source"])
QUEUED = Counter("b24relay_events_queued_total",
                 "Inbox rows handed to the broker (by intake or the sweeper).", ["source", "via"])
PROCESSED = ByEventType(Counter(
    "b24relay_events_processed_total",
    "Worker passes over inbox rows by outcome: done and dead (final), retry, and unhandled "
    "(no handler yet) or held (portal paused), both parked until the sweeper queues them "
    "again; type as for b24relay_events_stored_total.", ["source", "type", "outcome"]))
ACK_LATENCY = Histogram("b24relay_event_ack_seconds",
                        "Time from request start to the answer of an intake endpoint.",
                        ["source"],
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))


class InboxDepthCollector(Collector):
    """``b24relay_inbox_depth{status}``, counted in the database at scrape time."""

    def describe(self) -> list[GaugeMetricFamily]:
        return [self._family()]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("b24relay_inbox_depth",
                                 "Inbox rows not finished yet (parked unhandled/held included), "
                                 "and dead ones, by status.",
                                 labels=["status"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from flask import has_app_context

        from app.ingress.inbox import depth

        family = self._family()
        if has_app_context():  # the /metrics view; elsewhere there is no database to ask
            try:
                counts = depth()
            except Exception:  # noqa: BLE001 - a scrape must not fail because the DB is down
                counts = {}
            for status, count in sorted(counts.items()):
                family.add_metric([status], count)
        yield family


_collector = InboxDepthCollector()


def init_app(app: Flask) -> None:
    """Expose the inbox depth on the registry /metrics serves."""
    registry = app.extensions.get("metrics_registry") or REGISTRY
    try:
        registry.register(_collector)
    except ValueError:
        pass  # already on the process-wide registry (several apps in one process)
