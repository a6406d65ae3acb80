"""Enqueueing: hand stored rows to the broker, fast or not at all.

Intake commits the row *before* it enqueues, so a message never points at a row a
worker cannot see, and an event the broker never got is still in the table: the
sweeper queues it again. A row is stored as ``queued`` (intake is about to send
it), and put back to ``received`` if the broker could not take it. Enqueueing uses
a Redis client with short timeouts and no retries (the intake broker, built per app in
:func:`init_app`), and stops trying for a moment after a failure, so a Redis outage
costs the request at most one short timeout.
"""

from __future__ import annotations

import logging

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from flask import Flask, current_app
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import update

from app.extensions import db
from app.ingress import metrics
from app.ingress.models import InboxEvent, InboxStatus
from app.redis_breaker import RedisBreaker

log = logging.getLogger(__name__)

ACTOR = "process_inbox_event"
ACTOR_GROUP = "process_inbox_events"  # rows queued together, split by the worker
QUEUE = "events"
ENQUEUE_TIMEOUT_SECONDS = 0.25


def fast_redis(url: str) -> redis.Redis:
    """A Redis client for intake: it gives up after a short timeout, without retrying."""
    return redis.Redis.from_url(url, socket_timeout=ENQUEUE_TIMEOUT_SECONDS,
                                socket_connect_timeout=ENQUEUE_TIMEOUT_SECONDS,
                                retry=Retry(NoBackoff(), 0))


def init_app(app: Flask) -> None:
    """Build the app's intake broker, whose Redis client gives up fast (the shared one waits
    seconds); no connection opens before the first send."""
    cfg = app.config
    url = cfg["BROKER_URL"] or cfg["REDIS_URL"]
    if url.startswith(("amqp://", "amqps://")):
        broker = app.extensions["broker"]  # the app's own (app/queue.py)
    else:
        # No middleware: enqueue hooks do nothing a message needs (retries, time and
        # age limits act in the worker, with the worker broker's own middleware).
        broker = RedisBroker(client=fast_redis(url),
                             namespace=cfg["DRAMATIQ_NAMESPACE"], middleware=[])
    app.extensions["ingress_broker"] = broker
    app.extensions["ingress_redis_breaker"] = RedisBreaker()


def _messages(row_ids: list[int], together: bool) -> list[tuple[list[int], dramatiq.Message]]:
    """One message per row; with ``together``, one for them all (the worker splits it into
    one per row, so claims and retries stay per row): one broker round trip for them all."""
    if together and len(row_ids) > 1:
        return [(row_ids, dramatiq.Message(queue_name=QUEUE, actor_name=ACTOR_GROUP,
                                           args=(row_ids,), kwargs={}, options={}))]
    return [([row_id], dramatiq.Message(queue_name=QUEUE, actor_name=ACTOR, args=(row_id,),
                                        kwargs={}, options={})) for row_id in row_ids]


def enqueue(row_ids: list[int], source: str, via: str = "intake",
            together: bool = False) -> list[int]:
    """Hand freshly stored rows to the broker; return the ids that made it.

    Rows are stored as ``queued`` (one commit on the happy path). A broker failure
    is not an error for the caller: the rows that missed the broker are put back
    to ``received``, and the sweeper queues them once the broker is back (it
    would find them as ``queued`` too, should even that update fail).
    """
    ext = current_app.extensions
    broker = ext["ingress_broker"]
    sent: list[int] = []
    breaker = ext["ingress_redis_breaker"]
    if breaker.allow():
        try:
            for ids, message in _messages(row_ids, together):
                broker.enqueue(message)
                sent.extend(ids)
        except Exception as exc:  # noqa: BLE001 - any broker failure: the sweeper recovers
            breaker.failed()
            log.warning("broker unavailable, %d inbox rows left for the sweeper: %s",
                        len(row_ids) - len(sent), exc)
    if sent:
        metrics.QUEUED.labels(source, via).inc(len(sent))
    done = set(sent)
    missed = [row_id for row_id in row_ids if row_id not in done]
    if missed:
        mark_received(missed)
    return sent


def mark_received(row_ids: list[int]) -> None:
    """queued -> received for rows the broker never got (shown as such in the inbox depth)."""
    try:
        with db.engine.begin() as conn:
            conn.execute(update(InboxEvent)
                         .where(InboxEvent.id.in_(row_ids),
                                InboxEvent.status == InboxStatus.QUEUED.value)
                         .values(status=InboxStatus.RECEIVED.value))
    except Exception as exc:  # noqa: BLE001 - bookkeeping only; the sweeper finds queued rows too
        log.warning("could not mark %d unqueued rows as received: %s", len(row_ids), exc)
