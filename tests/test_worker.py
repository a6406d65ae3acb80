"""A message goes through the real broker to a real worker process."""

from __future__ import annotations

import uuid

from app import health, queue
from tests.conftest import wait_for


def test_message_is_processed_by_a_real_worker(app, start_worker):
    worker = start_worker()
    nonce = uuid.uuid4().hex
    queue.enqueue("ping", nonce)
    result = wait_for(lambda: health.ping_result(nonce), timeout=30)
    assert result["pid"] != __import__("os").getpid(), "processed in the test process, not a worker"
    assert worker.proc.poll() is None, worker.output()


def test_messages_sent_before_the_worker_starts_are_not_lost(app, start_worker):
    nonces = [uuid.uuid4().hex for _ in range(20)]
    for nonce in nonces:
        queue.enqueue("ping", nonce)
    start_worker(threads=2)
    wait_for(lambda: all(health.ping_result(n) for n in nonces), timeout=30)


def _rabbitmq_reachable(host: str = "127.0.0.1", port: int = 5672) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def test_rabbitmq_broker_when_broker_url_is_amqp(make_app, start_worker, redis_client):
    if not _rabbitmq_reachable():
        import pytest

        pytest.skip("no RabbitMQ on 127.0.0.1:5672")
    amqp = "amqp://guest:guest@127.0.0.1:5672/%2F"
    app = make_app(BROKER_URL=amqp)
    with app.app_context():
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        assert isinstance(queue.broker(), RabbitmqBroker)
        start_worker(BROKER_URL=amqp)
        nonce = uuid.uuid4().hex
        queue.enqueue("ping", nonce)
        assert wait_for(lambda: health.ping_result(nonce), timeout=30)
        queue.broker().close()


@__import__("pytest").mark.serial
def test_an_idle_worker_notices_a_message_on_a_prompt_queue_within_its_poll(app, start_worker):
    """A call event posted to a worker that has been idle a while (Dramatiq's Redis consumer
    then sleeps 0.5-1 s between polls) is picked up within WORKER_IDLE_POLL_MS (100 ms)."""
    import statistics
    import time

    worker = start_worker(threads=2)
    worker.wait_ready()
    hops = []
    for _ in range(4):
        time.sleep(2.2)  # idle long enough for the backoff to reach its cap
        nonce, sent = uuid.uuid4().hex, time.time()
        queue.enqueue("ping", nonce)  # "default", a prompt queue
        hops.append(wait_for(lambda n=nonce: health.ping_result(n), timeout=10)["at"] - sent)
    assert statistics.median(hops) < 0.2, hops
