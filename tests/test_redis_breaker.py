"""The Redis breaker: a Redis that is down costs one failed call per backoff window."""

from __future__ import annotations

import socket
import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.redis_breaker import RedisBreaker


def _closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _guarded(breaker: RedisBreaker, client: redis.Redis) -> tuple[Any, list[float]]:
    """An INCR that asks the breaker first, as intake does; returns it and its attempts."""
    attempts: list[float] = []

    def incr() -> int | None:
        if not breaker.allow():
            return None
        attempts.append(time.monotonic())
        try:
            return int(client.incr("breaker-test"))
        except redis.RedisError:
            breaker.failed()
            return None
    return incr, attempts


def test_a_down_redis_is_tried_once_per_backoff_window():
    client = redis.Redis(port=_closed_port(), socket_connect_timeout=0.25,
                         retry=Retry(NoBackoff(), 0))
    breaker = RedisBreaker(backoff=0.2)
    incr, attempts = _guarded(breaker, client)
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        assert incr() is None
        time.sleep(0.005)
    assert 2 <= len(attempts) <= 1 + (time.monotonic() - started) / 0.2, attempts
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    assert all(gap >= 0.2 for gap in gaps), gaps


def test_a_working_redis_is_always_tried(redis_client):
    breaker = RedisBreaker()
    incr, attempts = _guarded(breaker, redis_client)
    assert [incr() for _ in range(5)] == [1, 2, 3, 4, 5]
    assert len(attempts) == 5 and breaker.allow()


def test_calls_go_again_once_the_backoff_has_passed():
    breaker = RedisBreaker(backoff=0.05)
    assert breaker.allow()
    breaker.failed()
    assert not breaker.allow()
    time.sleep(0.06)
    assert breaker.allow()


def test_a_failure_during_the_backoff_starts_it_again():
    breaker = RedisBreaker(backoff=0.1)
    breaker.failed()
    time.sleep(0.06)
    breaker.failed()
    time.sleep(0.06)
    assert not breaker.allow()  # 0.12 s after the first failure, 0.06 s after the second

