"""The Redis owner lease on a portal: whoever holds it is the only one sending its outbox.

An engine takes ``b24relay:dispatch:owner:<portal id>`` (``SET NX`` with a TTL) before it
drives a portal, renews every key it holds in one heartbeat, and gives it back when the
portal runs out of work; a dead holder's key expires. The blocked-portal probe takes the
same key for its one call, so no engine sends the held backlog meanwhile. The key, the
scripts and the sync helpers live here; the engine runs the scripts on its async client.
"""

from __future__ import annotations

import logging

import redis

log = logging.getLogger(__name__)

OWNER_PREFIX = "b24relay:dispatch:owner:"
# Renew every key still ours; return the ids that are not ours any more.
RENEW = """
local lost = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('PEXPIRE', key, ARGV[2])
  else table.insert(lost, i) end
end
return lost
"""
# Delete the key only while it is still ours.
RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end"


def key(portal_id: int) -> str:
    """The Redis key of a portal's owner lease."""
    return OWNER_PREFIX + str(portal_id)


def take(client: redis.Redis, portal_id: int, owner: str, seconds: float) -> bool:
    """Take the portal's lease for ``seconds`` unless someone holds it; True when taken."""
    return bool(client.set(key(portal_id), owner, nx=True, px=int(seconds * 1000)))


def give_back(client: redis.Redis, portal_id: int, owner: str) -> None:
    """Release the lease if ``owner`` still holds it; never raises (it expires by itself)."""
    try:
        client.eval(RELEASE, 1, key(portal_id), owner)
    except redis.RedisError as exc:
        log.warning("owner lease of portal %s not released (it expires): %s", portal_id, exc)
