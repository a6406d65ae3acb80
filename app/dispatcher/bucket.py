"""One leaky bucket per portal in Redis, shared by every process and host (protocol §6.1).

Bitrix24 counts each request (a batch is one) into a bucket per portal that drains ``drain``
per second and refuses a request above ``burst`` with ``QUERY_LIMIT_EXCEEDED``. We keep the
same bucket on our side and take a token *when a request is sent*, so we never fire into a
full bucket, with a little headroom:

* capacity ``burst - max(2, min(drain, burst / 5))`` (48 standard, 245 enterprise): the token
  is taken a moment before the request arrives, and arrivals bunch by up to ~1 s of jitter
  (a busy event loop between take and send, network queues); Bitrix24 may also drain in
  whole-second steps rather than continuously;
* drain at ``DRAIN_SHARE`` (99 %) of the nominal rate: slack for clock drift and rounding on
  their side. A 10,000-command backlog to a standard portal then needs (200 - 48) / 1.98 =
  76.8 s for the 75 s of the ceiling (50 at once, then 2/s): 97.7 %.

**A reserve for real-time work.** A portal that sent real-time work (a call card) in the last
``REALTIME_WINDOW`` seconds keeps ``reserve(drain)`` tokens (1 s of drain, at least one: 2
standard, 5 enterprise) out of reach of bulk work: a bulk take succeeds only while the bucket
is that far below capacity, a real-time take up to capacity. So a call that arrives while a
user sync drains the bucket finds a token at once instead of waiting a drain interval behind
the bulk batches; bulk still drains at the full rate (it is only ever the reserve's size
behind). A portal without real-time traffic keeps no reserve, so a bulk-only backlog loses
nothing. Each real-time take marks the portal (``<bucket key>:rt``, expiring after the
window) inside the same script, so every process sees the same reserve. Direct calls a person
waits on count as real time.

``take`` is atomic (one Lua script, ``redis.call('TIME')`` as the clock, so hosts need no
synchronised clocks) and returns 0.0 when it took a token, else the seconds until one is
free: it took *nothing* then, and the caller waits that long and calls ``take`` again.
``fill`` records a ``QUERY_LIMIT_EXCEEDED``: the portal's bucket is full now, so everyone
waits until it has drained below our capacity. A key lives only while its bucket is not
empty: an idle portal costs nothing.

``portal_key`` is the portal's ``member_id`` everywhere (the direct calls in
``app.dispatcher.direct`` and the engine must name the same bucket). ``plan`` is a key of
the ``plans`` mapping (``PLANS`` by default); an unknown plan counts as ``standard``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import redis
import redis.asyncio

PLANS: dict[str, tuple[float, int]] = {"standard": (2.0, 50), "enterprise": (5.0, 250)}


def scaled_plans(scale: float) -> dict[str, tuple[float, int]]:
    """PLANS with drain and burst multiplied by ``scale`` (``DISPATCH_BUCKET_SCALE``: only for
    benchmarks and tests whose portal's own bucket is set far above its plan)."""
    return {name: (drain * scale, int(burst * scale)) for name, (drain, burst) in PLANS.items()}
DRAIN_SHARE = 0.99
MIN_HEADROOM = 2
REALTIME_WINDOW = 600.0  # seconds a real-time take keeps the portal's reserve

# KEYS[1] bucket, KEYS[2] its real-time mark; ARGV: drain/s, capacity, fill level (-1: take
# a token instead), reserve (0: a real-time take, which marks the portal for ARGV[5] ms; else
# the tokens a bulk take leaves free while the portal is marked).
# Returns the seconds to wait as a string ("0" when a token was taken).
_SCRIPT = """
local drain, capacity, fill = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reserve, window = tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'level', 'stamp')
local level = tonumber(state[1]) or 0
local stamp = tonumber(state[2]) or now
level = math.max(0, level - math.max(0, now - stamp) * drain)
local limit = capacity
if fill < 0 and reserve > 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  limit = math.max(1, capacity - reserve)
end
local wait = 0
if fill >= 0 then
  level = math.max(level, fill)
elseif level + 1 <= limit + 1e-9 then
  level = level + 1
  if reserve == 0 then redis.call('SET', KEYS[2], '1', 'PX', window) end
else
  wait = (level + 1 - limit) / drain
end
redis.call('HSET', KEYS[1], 'level', string.format('%.6f', level),
           'stamp', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(level / drain * 1000) + 1000)
return string.format('%.6f', wait)
"""


# KEYS[1] bucket; ARGV[1] drain/s. The level now, without taking anything.
_PEEK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'level', 'stamp')
local level = tonumber(state[1]) or 0
local stamp = tonumber(state[2]) or now
return string.format('%.6f', math.max(0, level - math.max(0, now - stamp) * tonumber(ARGV[1])))
"""


def limits(drain: float, burst: int) -> tuple[float, float]:
    """Our (drain per second, capacity) for a portal's bucket: the same, less the headroom."""
    headroom = max(MIN_HEADROOM, min(math.ceil(drain), burst // 5))
    return drain * DRAIN_SHARE, float(max(1, burst - headroom))


def reserve(drain: float) -> int:
    """Tokens bulk work leaves to real-time work on a portal with real-time traffic."""
    return max(1, math.ceil(drain))


class _Bucket:
    """What both buckets share: the key, the limits and the script's arguments."""

    def __init__(self, prefix: str, plans: Mapping[str, tuple[float, int]] | None) -> None:
        self.prefix = prefix
        self.plans = dict(plans or PLANS)

    def limits(self, plan: str) -> tuple[float, float]:
        """Our (drain per second, capacity) for a portal on ``plan``."""
        return limits(*(self.plans.get(plan) or PLANS["standard"]))

    def _args(self, portal_key: str, plan: str, fill: bool,
              realtime: bool = True) -> tuple[list[str], list[float]]:
        drain, burst = self.plans.get(plan) or PLANS["standard"]
        ours, capacity = limits(drain, burst)
        key = self.prefix + portal_key
        kept = 0 if realtime else reserve(drain)
        return [key, key + ":rt"], [ours, capacity, float(burst) if fill else -1.0, kept,
                                    int(REALTIME_WINDOW * 1000)]


class RateBucket(_Bucket):
    """The portal buckets through a sync ``redis.Redis`` (direct calls, threads)."""

    def __init__(self, client: redis.Redis, *, prefix: str = "b24relay:bucket:",
                 plans: Mapping[str, tuple[float, int]] | None = None) -> None:
        super().__init__(prefix, plans)
        self.script = client.register_script(_SCRIPT)

    def take(self, portal_key: str, plan: str, *, realtime: bool = True) -> float:
        """0.0: a token was taken now; else nothing was taken: wait that long, then retry.
        A bulk take (``realtime=False``) leaves the real-time reserve alone."""
        keys, args = self._args(portal_key, plan, fill=False, realtime=realtime)
        return float(self.script(keys=keys, args=args))

    def fill(self, portal_key: str, plan: str) -> None:
        """Bitrix24 answered QUERY_LIMIT_EXCEEDED: its bucket is full now."""
        keys, args = self._args(portal_key, plan, fill=True)
        self.script(keys=keys, args=args)


class AsyncRateBucket(_Bucket):
    """The same buckets through ``redis.asyncio`` (the dispatcher's event loop)."""

    def __init__(self, client: redis.asyncio.Redis, *, prefix: str = "b24relay:bucket:",
                 plans: Mapping[str, tuple[float, int]] | None = None) -> None:
        super().__init__(prefix, plans)
        self.script = client.register_script(_SCRIPT)
        self.peek = client.register_script(_PEEK)

    async def level(self, portal_key: str, plan: str) -> float:
        """How many requests the bucket holds now (0 empty .. ``limits(plan)[1]`` full)."""
        drain, _capacity = self.limits(plan)
        return float(await self.peek(keys=[self.prefix + portal_key], args=[drain]))

    async def take(self, portal_key: str, plan: str, *, realtime: bool = True) -> float:
        """0.0: a token was taken now; else nothing was taken: wait that long, then retry.
        A bulk take (``realtime=False``) leaves the real-time reserve alone."""
        keys, args = self._args(portal_key, plan, fill=False, realtime=realtime)
        return float(await self.script(keys=keys, args=args))

    async def fill(self, portal_key: str, plan: str) -> None:
        """Bitrix24 answered QUERY_LIMIT_EXCEEDED: its bucket is full now."""
        keys, args = self._args(portal_key, plan, fill=True)
        await self.script(keys=keys, args=args)
