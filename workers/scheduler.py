"""Periodic jobs without a separate scheduler process.

Every worker process runs a small thread that, for each periodic actor, tries to
take a Redis key for one interval (SET NX EX). Whoever takes it enqueues the
actor; so across any number of worker processes and hosts each job is enqueued
once per interval, and it keeps running as long as any worker is alive.

An interval is a number of seconds or the name of a setting (app/config.py) that holds
it; the middleware reads the settings when the worker boots.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dramatiq
import redis
from dramatiq.middleware import Middleware

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeriodicJob:
    """An actor to enqueue every ``interval`` seconds (or every ``config[interval]``)."""

    actor: dramatiq.Actor
    interval: float | str

    def seconds(self, config: Mapping[str, Any]) -> float:
        """The interval in seconds, read from ``config`` when it names a setting."""
        return float(config[self.interval] if isinstance(self.interval, str) else self.interval)


_jobs: list[PeriodicJob] = []


def periodic(interval: float | str):  # type: ignore[no-untyped-def]
    """Mark an actor (apply above ``@dramatiq.actor``) to be enqueued every interval:
    seconds, or the name of the setting that holds them."""

    def register(actor: dramatiq.Actor) -> dramatiq.Actor:
        _jobs.append(PeriodicJob(actor, interval))
        return actor

    return register


def jobs() -> list[PeriodicJob]:
    """The registered periodic jobs."""
    return list(_jobs)


class PeriodicMiddleware(Middleware):
    """Starts the tick thread when a worker boots (unless ``B24RELAY_NO_PERIODIC``), stops it
    on shutdown."""

    def __init__(self, client: redis.Redis, config: Mapping[str, Any], tick: float = 1.0) -> None:
        self.client = client
        self.config = config
        self.tick = tick
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self.config["B24RELAY_NO_PERIODIC"]:
            return
        self._thread = threading.Thread(target=self._run, name="b24relay-periodic", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            for job in _jobs:
                self._maybe_enqueue(job)

    def _maybe_enqueue(self, job: PeriodicJob) -> None:
        key = f"b24relay:periodic:{job.actor.actor_name}"
        try:
            if self.client.set(key, os.getpid(), nx=True,
                               px=int(job.seconds(self.config) * 1000)):
                job.actor.send()
        except redis.RedisError as exc:
            log.warning("periodic %s skipped: %s", job.actor.actor_name, exc)
