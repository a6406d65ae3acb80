"""Prometheus wiring: one registry per process, merged across gunicorn workers.

Under gunicorn set ``PROMETHEUS_MULTIPROC_DIR`` (``make run`` and the Procfile
launcher do) so ``/metrics`` reports every worker process, not just the one
that happened to answer.
"""

from __future__ import annotations

import os

from flask import Flask
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector


def init_app(app: Flask) -> None:
    """Pick the registry /metrics exposes."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        app.extensions["metrics_registry"] = registry
