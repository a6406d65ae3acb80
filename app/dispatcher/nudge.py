"""Waking the dispatchers: a Redis channel every engine listens on.

A nudge says "portal N may have ready commands". It is only a hint: the sweep finds
every portal with due work anyway, so a nudge lost to a Redis hiccup costs a few
seconds, never a command.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import redis
import redis.asyncio

log = logging.getLogger(__name__)

CHANNEL = "b24relay:dispatch:nudge"


def channel(client: redis.Redis | redis.asyncio.Redis) -> str:
    """The nudge channel of ``client``'s database: Redis pub/sub ignores database numbers,
    so deployments (or test workers) sharing one server on different databases would
    otherwise wake each other's engines for portals that are not theirs."""
    return f"{CHANNEL}:{client.connection_pool.connection_kwargs.get('db', 0) or 0}"


def encode(portal_ids: Iterable[int]) -> str:
    """One message for several portals: ``"3,17"``."""
    return ",".join(str(i) for i in sorted(set(portal_ids)))


def decode(message: bytes | str) -> list[int]:
    """The portal ids of a nudge message (junk is ignored)."""
    text = message.decode() if isinstance(message, bytes) else message
    return [int(part) for part in text.split(",") if part.strip().isdigit()]


def publish(client: redis.Redis, portal_ids: Iterable[int]) -> None:
    """Tell every engine these portals may have ready commands; never raises."""
    ids = encode(portal_ids)
    if not ids:
        return
    try:
        client.publish(channel(client), ids)
    except redis.RedisError as exc:
        log.warning("dispatch nudge for %s lost (the sweep will find it): %s", ids, exc)
