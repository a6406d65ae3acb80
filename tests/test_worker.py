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
