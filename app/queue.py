"""The message broker as the app sees it: build it, and enqueue by actor name.

Services enqueue work here by actor name so that ``app/`` never imports the
actor modules in ``workers/`` (imports point inward). The broker is Redis
(``REDIS_URL`` or the embedded server), or RabbitMQ when ``BROKER_URL`` is
``amqp://``.
"""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from flask import Flask, current_app


def build_broker(config: dict[str, Any]) -> dramatiq.Broker:
    """A broker from the settings: RabbitMQ for amqp:// BROKER_URL, Redis otherwise."""
    url = config["BROKER_URL"] or config["REDIS_URL"]
    namespace = config["DRAMATIQ_NAMESPACE"]
    if url.startswith(("amqp://", "amqps://")):
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        return RabbitmqBroker(url=url)
    return RedisBroker(url=url, namespace=namespace)


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
