"""Prometheus wiring: one registry per process, merged across gunicorn workers.

Under gunicorn set ``PROMETHEUS_MULTIPROC_DIR`` (``make run`` and the Procfile
launcher do) so ``/metrics`` reports every worker process, not just the one
that happened to answer. The variable is declared in app/config.py, but it is
``prometheus_client`` itself that reads it from the environment, at import, to
decide where each process writes its values; here the setting only says which
directory ``/metrics`` merges.

Who may scrape: the holder of ``METRICS_TOKEN`` (``Authorization: Bearer <token>``); anyone
else gets 401. Without a token (production that set none) ``/metrics`` is not served: 404.
The figures carry no member_id or domain (labels are bounded sets: source, type, plan, ...),
but volumes per plan and outcome are still the operator's business, not a stranger's.
"""

from __future__ import annotations

import hmac
import logging

from flask import Flask
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)


def init_app(app: Flask) -> None:
    """Pick the registry /metrics exposes."""
    directory = app.config["PROMETHEUS_MULTIPROC_DIR"]
    if directory:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
        app.extensions["metrics_registry"] = registry
    if not app.config["METRICS_TOKEN"]:
        log.warning("METRICS_TOKEN is not set: /metrics is not served (404)")


def scrape_refusal(token: str | None, authorization: str | None) -> int | None:
    """The status that refuses this scrape (404 without a token set, 401 without the right
    bearer), or None when the request carries ``token``."""
    if not token:
        return 404
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                             token.encode()):
        return 401
    return None
