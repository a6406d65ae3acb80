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
