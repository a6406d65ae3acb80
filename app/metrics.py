"""Prometheus wiring: one registry per process, merged across gunicorn workers.

Under gunicorn set ``PROMETHEUS_MULTIPROC_DIR`` (``make run`` and the Procfile
launcher do) so ``/metrics`` reports every worker process, not just the one
that happened to answer. The variable is declared in app/config.py, but it is
``prometheus_client`` itself that reads it from the environment, at import, to
decide where each process writes its values; here the setting only says which
directory ``/metrics`` merges.
"""

from __future__ import annotations

from flask import Flask
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector


def init_app(app: Flask) -> None:
    """Pick the registry /metrics exposes."""
    directory = app.config["PROMETHEUS_MULTIPROC_DIR"]
    if directory:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
        app.extensions["metrics_registry"] = registry
