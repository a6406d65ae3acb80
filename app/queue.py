"""The message broker as the app sees it: build it, and enqueue by actor name.

Services enqueue work here by actor name so that ``app/`` never imports the
actor modules in ``workers/`` (imports point inward). The broker is Redis
(``REDIS_URL`` or the embedded server), or RabbitMQ when ``BROKER_URL`` is
``amqp://``.
"""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from flask import Flask, current_app
from sqlalchemy import event
from sqlalchemy.orm import Session

# The queues whose messages a person waits on (a call's card, its hide), where an idle
# worker must notice a message within WORKER_IDLE_POLL_MS instead of Dramatiq's second.
PROMPT_QUEUES = frozenset({"events", "default"})


class PromptRedisBroker(RedisBroker):
    """Dramatiq's Redis broker, with a shorter idle poll on :data:`PROMPT_QUEUES`.

    Redis pushes nothing: an idle consumer polls, backing off exponentially up to the
    worker's timeout (1 s by default; with jitter it sleeps 0.5-1 s). So a call event posted
    to an idle worker waited 0.25-0.5 s on average before a worker even looked, which was
    most of the card's tail beyond one round trip (bench/pbx_day: 202 -> submitted p99 0.7 s
    at 18,000 calls a day). Capping the backoff of the prompt queues at ``idle_poll_ms``
    costs an idle worker process about 1000 / idle_poll_ms Lua calls a second per queue."""

    def __init__(self, *args: Any, idle_poll_ms: int = 100, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_poll_ms = idle_poll_ms

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Any:
        if queue_name in PROMPT_QUEUES:
            timeout = min(timeout, self.idle_poll_ms)
        return super().consume(queue_name, prefetch, timeout)


def build_broker(config: dict[str, Any]) -> dramatiq.Broker:
    """A broker from the settings: RabbitMQ for amqp:// BROKER_URL, Redis otherwise."""
    url = config["BROKER_URL"] or config["REDIS_URL"]
    namespace = config["DRAMATIQ_NAMESPACE"]
    if url.startswith(("amqp://", "amqps://")):
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        return RabbitmqBroker(url=url)  # RabbitMQ pushes: no polling to shorten
    return PromptRedisBroker(url=url, namespace=namespace,
                             idle_poll_ms=int(config["WORKER_IDLE_POLL_MS"]))


def init_app(app: Flask) -> None:
    """Attach a broker for this app (connections open lazily, on first send)."""
    app.extensions["broker"] = build_broker(app.config)


def broker() -> dramatiq.Broker:
    """The current app's broker."""
    return current_app.extensions["broker"]


def enqueue(actor_name: str, *args: Any, queue_name: str = "default",
            delay_ms: int | None = None, **options: Any) -> dramatiq.Message:
    """Send a message to the actor called ``actor_name`` on ``queue_name``."""
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=queue_name, actor_name=actor_name, args=args, kwargs={}, options=options)
    return broker().enqueue(message, delay=delay_ms)


_AFTER_COMMIT = "b24relay.enqueue_after_commit"


def enqueue_after_commit(session: Session, actor_name: str, *args: Any,
                         queue_name: str = "default") -> None:
    """Send the message once ``session``'s transaction commits (never on a rollback), so
    that the actor finds the rows the transaction wrote."""
    session.info.setdefault(_AFTER_COMMIT, []).append((actor_name, args, queue_name))


@event.listens_for(Session, "after_commit")
def _send_after_commit(session: Session) -> None:
    for actor_name, args, queue_name in session.info.pop(_AFTER_COMMIT, ()):
        try:
            enqueue(actor_name, *args, queue_name=queue_name)
        except Exception:  # noqa: BLE001 - committed; the actor's sweeper picks the row up
            logging.getLogger(__name__).exception("could not enqueue %s%r", actor_name, args)


@event.listens_for(Session, "after_rollback")
def _forget_after_rollback(session: Session) -> None:
    session.info.pop(_AFTER_COMMIT, None)
