"""Per (portal, method) ledger of Bitrix24's ``time.operating``, in Redis (protocol §6.2).

Bitrix24 adds up the seconds each method spends for the app over 10 one-minute buckets (each
expires 10 minutes after its first call) and blocks the method with ``OPERATION_TIME_LIMIT``
above a limit (historically 480 s). We keep the same buckets from what the answers report:
a batch's ``result_time`` gives each command's ``processing`` (it has no ``operating``), so
``batch_charges`` sums those per method and ``add_batch`` books them in one round trip.

``pause_until`` says when a method may be sent again: once its seconds reach ``share`` (80 %)
of the limit, until enough of the oldest buckets have left the window to bring it back under,
and never before a ``hold``. ``hold`` is for a real ``OPERATION_TIME_LIMIT``: until its
``operating_reset_at`` when the answer carried one, else until the oldest booked bucket
leaves the window (or a whole window when nothing is booked). Scripts use Redis ``TIME``;
keys expire with the window, so idle portals cost nothing. ``portal_key`` is the member_id,
as for the rate bucket; method names are case-insensitive.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis
import redis.asyncio

from app.bitrix.rest import BatchResult

LIMIT = 480.0
SHARE = 0.8
WINDOW = 600.0

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# The live buckets of KEYS[1] oldest first as {start, seconds}; stale ones are deleted.
_LIVE = _NOW + """
local window = tonumber(ARGV[1])
local live = {}
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local start = tonumber(flat[i])
  if start + window <= now then
    redis.call('HDEL', KEYS[1], flat[i])
  else
    table.insert(live, {start, tonumber(flat[i + 1]), flat[i]})
  end
end
table.sort(live, function(a, b) return a[1] < b[1] end)
"""

# ARGV: window, seconds. Books into the newest bucket while it is younger than window / 10.
_ADD = _LIVE + """
local newest = live[#live]
if newest ~= nil and now - newest[1] < window / 10 then
  redis.call('HINCRBYFLOAT', KEYS[1], newest[3], ARGV[2])
else
  redis.call('HSET', KEYS[1], string.format('%.6f', now), ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1000)
return 1
"""

# KEYS[2] the hold; ARGV: window, threshold. The epoch the method is free again, or nil.
_PAUSE = _LIVE + """
local free = tonumber(redis.call('GET', KEYS[2]) or '0')
local total = 0
for _, b in ipairs(live) do total = total + b[2] end
local threshold = tonumber(ARGV[2])
for _, b in ipairs(live) do
  if total < threshold then break end
  total = total - b[2]
  free = math.max(free, b[1] + window)
end
if free > now then return string.format('%.6f', free) end
return false
"""

# KEYS[2] the hold; ARGV: window, until (< 0: the oldest live bucket's end). Returns until.
_HOLD = _LIVE + """
local free = tonumber(ARGV[2])
if free < 0 then
  free = live[1] and (live[1][1] + window) or (now + window)
end
free = math.max(free, tonumber(redis.call('GET', KEYS[2]) or '0'))
if free > now then
  redis.call('SET', KEYS[2], string.format('%.6f', free), 'PX', math.ceil((free - now) * 1000))
end
return string.format('%.6f', free)
"""


def batch_charges(result: BatchResult,
                  commands: Mapping[str, tuple[str, Any]]) -> dict[str, float]:
    """Seconds of ``processing`` per method in one batch answer (``{key: (method, params)}``)."""
    charges: dict[str, float] = {}
    for key, timing in result.times.items():
        if key in commands and isinstance(timing, dict):
            method = commands[key][0].lower()
            charges[method] = charges.get(method, 0.0) + float(timing.get("processing") or 0)
    return charges


class _Ledger:
    """Keys, thresholds and script arguments shared by the sync and async ledgers."""

    def __init__(self, prefix: str, limit: float, share: float, window: float) -> None:
        self.prefix, self.window, self.threshold = prefix, window, limit * share

    def _keys(self, portal_key: str, method: str) -> list[str]:
        name = f"{portal_key}:{method.strip().lower()}"
        return [f"{self.prefix}{name}", f"{self.prefix}hold:{name}"]


class OperatingLedger(_Ledger):
    """The ledger through a sync ``redis.Redis``."""

    def __init__(self, client: redis.Redis, *, prefix: str = "b24relay:operating:",
                 limit: float = LIMIT, share: float = SHARE, window: float = WINDOW) -> None:
        super().__init__(prefix, limit, share, window)
        self.client = client
        self._add, self._pause, self._hold = (client.register_script(s)
                                              for s in (_ADD, _PAUSE, _HOLD))

    def add(self, portal_key: str, method: str, seconds: float) -> None:
        """Book ``seconds`` of ``method`` now."""
        self.add_batch(portal_key, {method: seconds})

    def add_batch(self, portal_key: str, charges: Mapping[str, float]) -> None:
        """Book several methods' seconds in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for method, seconds in charges.items():
            self._add(keys=self._keys(portal_key, method), args=[self.window, seconds],
                      client=pipe)
        pipe.execute()

    def pause_until(self, portal_key: str, method: str) -> float | None:
        """Epoch before which ``method`` must not be sent, or None when it may go now."""
        free = self._pause(keys=self._keys(portal_key, method),
                           args=[self.window, self.threshold])
        return None if free is None else float(free)

    def hold(self, portal_key: str, method: str, until_epoch: float | None = None) -> float:
        """OPERATION_TIME_LIMIT: hold ``method`` until ``until_epoch`` (None: see module doc)."""
        until = -1.0 if until_epoch is None else float(until_epoch)
        return float(self._hold(keys=self._keys(portal_key, method), args=[self.window, until]))


class AsyncOperatingLedger(_Ledger):
    """The same ledger through ``redis.asyncio`` (the dispatcher's event loop)."""

    def __init__(self, client: redis.asyncio.Redis, *, prefix: str = "b24relay:operating:",
                 limit: float = LIMIT, share: float = SHARE, window: float = WINDOW) -> None:
        super().__init__(prefix, limit, share, window)
        self.client = client
        self._add, self._pause, self._hold = (client.register_script(s)
                                              for s in (_ADD, _PAUSE, _HOLD))

    async def add(self, portal_key: str, method: str, seconds: float) -> None:
        """Book ``seconds`` of ``method`` now."""
        await self.add_batch(portal_key, {method: seconds})

    async def add_batch(self, portal_key: str, charges: Mapping[str, float]) -> None:
        """Book several methods' seconds in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for method, seconds in charges.items():
            await self._add(keys=self._keys(portal_key, method), args=[self.window, seconds],
                            client=pipe)
        await pipe.execute()

    async def pause_until(self, portal_key: str, method: str) -> float | None:
        """Epoch before which ``method`` must not be sent, or None when it may go now."""
        free = await self._pause(keys=self._keys(portal_key, method),
                                 args=[self.window, self.threshold])
        return None if free is None else float(free)

    async def hold(self, portal_key: str, method: str,
                   until_epoch: float | None = None) -> float:
        """OPERATION_TIME_LIMIT: hold ``method`` until ``until_epoch`` (None: see module doc)."""
        until = -1.0 if until_epoch is None else float(until_epoch)
        return float(await self._hold(keys=self._keys(portal_key, method),
                                      args=[self.window, until]))


def used(client: redis.Redis, portal_key: str, method: str, *, now: float,
         prefix: str = "b24relay:operating:", window: float = WINDOW) -> float:
    """Seconds of ``method`` booked in the live window (read-only: the dashboard's figure)."""
    name = f"{portal_key}:{method.strip().lower()}"
    booked = client.hgetall(f"{prefix}{name}")
    return sum(float(seconds) for start, seconds in booked.items()
               if float(start) + window > now)
