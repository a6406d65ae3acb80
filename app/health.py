"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from flask import Blueprint, Response, abort, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.extensions import db, redis_ext
from app.metrics import scrape_refusal

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """The process is up; no dependency is touched."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Database and Redis answer; a load balancer stops routing here when not."""
    checks: dict[str, str] = {}
    try:
        db.session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - report any failure as not ready
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        redis_ext.client.ping()
        checks["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["redis"] = f"error: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return jsonify(ready=ready, checks=checks), (200 if ready else 503)


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus exposition of this process's registry (multiprocess-aware), to the holder of
    ``METRICS_TOKEN`` only (app/metrics.py)."""
    refusal = scrape_refusal(current_app.config["METRICS_TOKEN"],
                             request.headers.get("Authorization"))
    if refusal == 401:
        return Response("a bearer token is required\n", 401,
                        {"WWW-Authenticate": 'Bearer realm="metrics"'}, mimetype="text/plain")
    if refusal:
        abort(refusal)  # not served: the same answer as any unknown path
    registry = current_app.extensions.get("metrics_registry")
    return Response(generate_latest(registry) if registry else generate_latest(),
                    mimetype=CONTENT_TYPE_LATEST)


PING_TTL_SECONDS = 3600


def record_ping(nonce: str, worker_pid: int) -> None:
    """Note that a worker processed ``nonce``; used by readiness checks and tests."""
    import json
    import time

    redis_ext.client.set(f"b24relay:ping:{nonce}",
                         json.dumps({"pid": worker_pid, "at": time.time()}), ex=PING_TTL_SECONDS)


def ping_result(nonce: str) -> dict | None:
    """What the worker recorded for ``nonce``, or None if nothing processed it yet."""
    import json

    raw = redis_ext.client.get(f"b24relay:ping:{nonce}")
    return json.loads(raw) if raw else None
