"""Housekeeping actors."""

from __future__ import annotations

import os

import dramatiq

from app import health


@dramatiq.actor(queue_name="default", max_retries=3)
def ping(nonce: str) -> None:
    """Record that a worker is alive and processing; used by tests and readiness."""
    health.record_ping(nonce, os.getpid())
