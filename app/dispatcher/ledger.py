"""Per (portal, method) ledger of Bitrix24's ``time.operating``, in Redis (protocol §6.2).

Bitrix24 adds up the seconds each method spends for the app over 10 one-minute buckets (each
expires 10 minutes after its first call) and blocks the method with ``OPERATION_TIME_LIMIT``
above a limit (historically 480 s). A batch's ``result_time`` gives each command's
``processing`` (it has no ``operating``), so ``batch_charges`` sums those per method and
``add_batch`` books them in one round trip.

The ledger must pause a method *before* the portal refuses it, and two things make what it
knows lag behind what the portal has counted:

- **Seconds in flight.** The portal counts each command as it finishes; we hear of a batch's
  seconds only when its answer lands, a batch of 50 finishes at 1 s each 50 s later, and
  many batches are in flight at once. So a batch *reserves* its expected seconds when it
  leaves (``reserve``: its commands times the method's cost per command, learned from
  recent answers, ``PRIOR_COST`` before any), and its answer swaps the reservation for what
  it really cost (``settle``). ``room`` counts booked and reserved seconds alike, and says
  how many more commands of the method fit under the share: the packer takes no more.
- **The window's shape.** The portal's buckets start at its own first call of each minute;
  ours cannot line up with them, and a bucket of ours that started earlier than the
  portal's would let its seconds go up to a minute before the portal does. So our buckets
  are short (a sixtieth of the window) and each leaves the window a whole window after its
  *last* booking: we always book after the portal counted, so nothing leaves our window
  before it leaves the portal's.

``room`` (and ``pause_until``) say when a method may be sent again: once its seconds,
booked and reserved, reach ``share`` (80 %) of the limit, until enough of the oldest buckets
have left the window to bring it back under, and never before a ``hold``. ``hold`` is for a
real ``OPERATION_TIME_LIMIT``: until its ``operating_reset_at`` when the answer carried one,
else until the oldest booked bucket leaves the window (or a whole window when nothing is
booked). Scripts use Redis ``TIME``; keys expire with the window (a reservation with its
batch's lease, should its answer never be heard), so idle portals cost nothing.
``portal_key`` is the member_id, as for the rate bucket; method names are case-insensitive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio

from app.bitrix.rest import BatchResult

LIMIT = 480.0
SHARE = 0.8
WINDOW = 600.0
BUCKETS = 60          # buckets per window: each spans a sixtieth of it (10 s of 600)
PRIOR_COST = 0.1      # seconds per command reserved for a method no answer has costed yet
COST_TTL = 86400      # seconds a learned cost is kept after its last answer
COST_WEIGHT = 0.3     # an answer's weight in the learned cost when it costs less than it
MAX_ROOM = 1_000_000  # commands: "not limited" for a method that costs next to nothing

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# The live buckets of KEYS[1] oldest first as {start, seconds, field, last booking}; a bucket
# lives until a window after its last booking. Stale ones are deleted. (A value without a
# last booking was written by an older version: its start stands for it.)
_LIVE = _NOW + """
local window = tonumber(ARGV[1])
local live = {}
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local start = tonumber(flat[i])
  local seconds, last = string.match(flat[i + 1], '^(%S+) (%S+)$')
  if seconds == nil then seconds, last = flat[i + 1], flat[i] end
  seconds, last = tonumber(seconds), tonumber(last)
  if last + window <= now then
    redis.call('HDEL', KEYS[1], flat[i])
  else
    table.insert(live, {start, seconds, flat[i], last})
  end
end
table.sort(live, function(a, b) return a[1] < b[1] end)
"""

# The live reservations of KEYS[3] (token -> "seconds expiry"): their sum and the earliest
# expiry; expired ones are deleted.
_FLIGHTS = """
local reserved, first_end = 0, nil
local held = redis.call('HGETALL', KEYS[3])
for i = 1, #held, 2 do
  local seconds, ends = string.match(held[i + 1], '^(%S+) (%S+)$')
  seconds, ends = tonumber(seconds), tonumber(ends)
  if ends == nil or ends <= now then
    redis.call('HDEL', KEYS[3], held[i])
  else
    reserved = reserved + seconds
    if first_end == nil or ends < first_end then first_end = ends end
  end
end
"""

# KEYS: buckets, hold, flights, cost. ARGV: window, seconds, token ('' none), commands costed
# (0: learn nothing), mode ('spent': book the token's reservation instead of seconds).
# Drops the token's reservation, books the seconds into the newest bucket while it is younger
# than window / BUCKETS, and learns the cost per command: at once when it rose, slowly when
# it fell.
_BOOK = _LIVE + """
local seconds = tonumber(ARGV[2])
if ARGV[3] ~= '' then
  local held = redis.call('HGET', KEYS[3], ARGV[3])
  redis.call('HDEL', KEYS[3], ARGV[3])
  if ARGV[5] == 'spent' then
    seconds = held and tonumber(string.match(held, '^(%S+)')) or 0
  end
end
if seconds > 0 then
  local newest = live[#live]
  if newest ~= nil and now - newest[1] < window / tonumber(ARGV[6]) then
    redis.call('HSET', KEYS[1], newest[3], string.format('%.6f %.6f', newest[2] + seconds, now))
  else
    local field = string.format('%.6f', now)
    redis.call('HSET', KEYS[1], field, string.format('%.6f %.6f', seconds, now))
  end
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1000)
end
local count = tonumber(ARGV[4])
if count > 0 and ARGV[5] ~= 'spent' then
  local per = tonumber(ARGV[2]) / count
  local old = tonumber(redis.call('GET', KEYS[4]) or '-1')
  local weight = tonumber(ARGV[7])
  if old >= 0 and per < old then per = old + (per - old) * weight end
  redis.call('SET', KEYS[4], string.format('%.6f', per), 'EX', tonumber(ARGV[8]))
end
return 1
"""

# KEYS: buckets, hold, flights, cost. ARGV: window, threshold. Returns {the epoch the method
# is free again or '', seconds booked and reserved, the learned cost per command or ''}.
_STATE = _LIVE + _FLIGHTS + """
local free = tonumber(redis.call('GET', KEYS[2]) or '0')
local total = 0
for _, b in ipairs(live) do total = total + b[2] end
local used = total + reserved
local threshold = tonumber(ARGV[2])
for _, b in ipairs(live) do
  if total + reserved < threshold then break end
  total = total - b[2]
  free = math.max(free, b[4] + window)
end
if total + reserved >= threshold and first_end ~= nil then
  free = math.max(free, first_end)  -- only answers in flight hold it: one may land sooner
end
local cost = redis.call('GET', KEYS[4]) or ''
if free > now then return {string.format('%.6f', free), string.format('%.6f', used), cost} end
return {'', string.format('%.6f', used), cost}
"""

# KEYS: flights, cost. ARGV: token, commands, seconds the reservation lasts, prior cost.
# Reserves the commands' expected seconds; returns them.
_RESERVE = _NOW + """
local cost = tonumber(redis.call('GET', KEYS[2]) or ARGV[4])
local seconds = tonumber(ARGV[2]) * cost
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.6f %.6f', seconds, now + ttl))
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000) + 1000)
return string.format('%.6f', seconds)
"""

# KEYS[2] the hold; ARGV: window, until (< 0: the oldest live bucket's end). Returns until.
_HOLD = _LIVE + """
local free = tonumber(ARGV[2])
if free < 0 then
  free = live[1] and (live[1][4] + window) or (now + window)
end
free = math.max(free, tonumber(redis.call('GET', KEYS[2]) or '0'))
if free > now then
  redis.call('SET', KEYS[2], string.format('%.6f', free), 'PX', math.ceil((free - now) * 1000))
end
return string.format('%.6f', free)
"""


@dataclass(frozen=True)
class Budget:
    """What a method may do now: ``until`` the epoch it is paused to (None: it may go), and
    ``room``, how many of its commands fit before the share is reached (0 while paused)."""

    until: float | None
    room: int
    used: float = 0.0  # seconds booked and reserved in the window


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

    def __init__(self, prefix: str, limit: float, share: float, window: float,
                 prior_cost: float) -> None:
        self.prefix, self.window, self.threshold = prefix, window, limit * share
        self.prior_cost = prior_cost

    def _keys(self, portal_key: str, method: str) -> list[str]:
        name = f"{portal_key}:{method.strip().lower()}"
        return [f"{self.prefix}{name}", f"{self.prefix}hold:{name}",
                f"{self.prefix}flight:{name}", f"{self.prefix}cost:{name}"]

    def _book_args(self, seconds: float, token: str = "", costed: int = 0,
                   mode: str = "") -> list[Any]:
        return [self.window, seconds, token, costed, mode, BUCKETS, COST_WEIGHT, COST_TTL]

    def _budget(self, state: list[Any]) -> Budget:
        free, used, cost = (v.decode() if isinstance(v, bytes) else str(v) for v in state)
        if free:
            return Budget(float(free), 0, float(used))
        per = max(float(cost) if cost else self.prior_cost, 1e-3)
        room = math.ceil((self.threshold - float(used)) / per)
        return Budget(None, max(1, min(MAX_ROOM, room)), float(used))

    @staticmethod
    def _settling(counts: Mapping[str, int], charges: Mapping[str, float] | None,
                  costed: Mapping[str, int] | None) -> list[tuple[str, float, int, str]]:
        """(method, seconds, commands costed, mode) to book for a landed batch."""
        methods = {m.lower() for m in counts} | {m.lower() for m in (charges or {})}
        if charges is None:
            return [(m, 0.0, 0, "spent") for m in sorted(methods)]
        lowered = {m.lower(): s for m, s in charges.items()}
        counted = {m.lower(): n for m, n in (costed or {}).items()}
        return [(m, lowered.get(m, 0.0), counted.get(m, 0), "") for m in sorted(methods)]


class OperatingLedger(_Ledger):
    """The ledger through a sync ``redis.Redis``."""

    def __init__(self, client: redis.Redis, *, prefix: str = "b24relay:operating:",
                 limit: float = LIMIT, share: float = SHARE, window: float = WINDOW,
                 prior_cost: float = PRIOR_COST) -> None:
        super().__init__(prefix, limit, share, window, prior_cost)
        self.client = client
        self._book, self._state, self._reserve, self._hold = (
            client.register_script(s) for s in (_BOOK, _STATE, _RESERVE, _HOLD))

    def add(self, portal_key: str, method: str, seconds: float) -> None:
        """Book ``seconds`` of ``method`` now."""
        self.add_batch(portal_key, {method: seconds})

    def add_batch(self, portal_key: str, charges: Mapping[str, float],
                  costed: Mapping[str, int] | None = None) -> None:
        """Book several methods' seconds in one round trip (``costed``: how many commands
        each method's seconds are for, to learn its cost per command)."""
        pipe = self.client.pipeline(transaction=False)
        for method, seconds in charges.items():
            self._book(keys=self._keys(portal_key, method),
                       args=self._book_args(seconds, costed=(costed or {}).get(method, 0)),
                       client=pipe)
        pipe.execute()

    def reserve(self, portal_key: str, flights: Mapping[str, Mapping[str, int]],
                ttl: float) -> dict[str, dict[str, float]]:
        """Reserve the expected seconds of batches leaving now (``{token: {method:
        commands}}``) for ``ttl`` seconds at most; returns the seconds reserved."""
        if not flights:
            return {}
        pipe = self.client.pipeline(transaction=False)
        order = [(token, m, n) for token, counts in flights.items() for m, n in counts.items()]
        for token, method, n in order:
            self._reserve(keys=self._keys(portal_key, method)[2:],
                          args=[token, n, ttl, self.prior_cost], client=pipe)
        out: dict[str, dict[str, float]] = {}
        for (token, method, _), seconds in zip(order, pipe.execute(), strict=True):
            out.setdefault(token, {})[method.lower()] = float(seconds)
        return out

    def settle(self, portal_key: str, token: str, counts: Mapping[str, int],
               charges: Mapping[str, float] | None,
               costed: Mapping[str, int] | None = None) -> None:
        """A batch reserved as ``token`` landed: book what it cost (``charges`` per method,
        ``costed`` commands each) in place of its reservation; ``charges`` None: its answer
        did not say (it may have run), so the reservation is booked as spent."""
        pipe = self.client.pipeline(transaction=False)
        for method, seconds, n, mode in self._settling(counts, charges, costed):
            self._book(keys=self._keys(portal_key, method),
                       args=self._book_args(seconds, token, n, mode), client=pipe)
        pipe.execute()

    def budget(self, portal_key: str, method: str) -> Budget:
        """Whether ``method`` may be sent now, and how many of its commands fit."""
        return self._budget(self._state(keys=self._keys(portal_key, method),
                                        args=[self.window, self.threshold]))

    def pause_until(self, portal_key: str, method: str) -> float | None:
        """Epoch before which ``method`` must not be sent, or None when it may go now."""
        return self.budget(portal_key, method).until

    def hold(self, portal_key: str, method: str, until_epoch: float | None = None) -> float:
        """OPERATION_TIME_LIMIT: hold ``method`` until ``until_epoch`` (None: see module doc)."""
        until = -1.0 if until_epoch is None else float(until_epoch)
        return float(self._hold(keys=self._keys(portal_key, method), args=[self.window, until]))


class AsyncOperatingLedger(_Ledger):
    """The same ledger through ``redis.asyncio`` (the dispatcher's event loop)."""

    def __init__(self, client: redis.asyncio.Redis, *, prefix: str = "b24relay:operating:",
                 limit: float = LIMIT, share: float = SHARE, window: float = WINDOW,
                 prior_cost: float = PRIOR_COST) -> None:
        super().__init__(prefix, limit, share, window, prior_cost)
        self.client = client
        self._book, self._state, self._reserve, self._hold = (
            client.register_script(s) for s in (_BOOK, _STATE, _RESERVE, _HOLD))

    async def add(self, portal_key: str, method: str, seconds: float) -> None:
        """Book ``seconds`` of ``method`` now."""
        await self.add_batch(portal_key, {method: seconds})

    async def add_batch(self, portal_key: str, charges: Mapping[str, float],
                        costed: Mapping[str, int] | None = None) -> None:
        """Book several methods' seconds in one round trip (see the sync ledger)."""
        pipe = self.client.pipeline(transaction=False)
        for method, seconds in charges.items():
            await self._book(keys=self._keys(portal_key, method),
                             args=self._book_args(seconds, costed=(costed or {}).get(method, 0)),
                             client=pipe)
        await pipe.execute()

    async def reserve(self, portal_key: str, flights: Mapping[str, Mapping[str, int]],
                      ttl: float) -> dict[str, dict[str, float]]:
        """Reserve the expected seconds of batches leaving now (see the sync ledger)."""
        if not flights:
            return {}
        pipe = self.client.pipeline(transaction=False)
        order = [(token, m, n) for token, counts in flights.items() for m, n in counts.items()]
        for token, method, n in order:
            await self._reserve(keys=self._keys(portal_key, method)[2:],
                                args=[token, n, ttl, self.prior_cost], client=pipe)
        out: dict[str, dict[str, float]] = {}
        for (token, method, _), seconds in zip(order, await pipe.execute(), strict=True):
            out.setdefault(token, {})[method.lower()] = float(seconds)
        return out

    async def settle(self, portal_key: str, token: str, counts: Mapping[str, int],
                     charges: Mapping[str, float] | None,
                     costed: Mapping[str, int] | None = None) -> None:
        """A batch reserved as ``token`` landed (see the sync ledger)."""
        pipe = self.client.pipeline(transaction=False)
        for method, seconds, n, mode in self._settling(counts, charges, costed):
            await self._book(keys=self._keys(portal_key, method),
                             args=self._book_args(seconds, token, n, mode), client=pipe)
        await pipe.execute()

    async def budget(self, portal_key: str, method: str) -> Budget:
        """Whether ``method`` may be sent now, and how many of its commands fit."""
        return self._budget(await self._state(keys=self._keys(portal_key, method),
                                              args=[self.window, self.threshold]))

    async def pause_until(self, portal_key: str, method: str) -> float | None:
        """Epoch before which ``method`` must not be sent, or None when it may go now."""
        return (await self.budget(portal_key, method)).until

    async def hold(self, portal_key: str, method: str,
                   until_epoch: float | None = None) -> float:
        """OPERATION_TIME_LIMIT: hold ``method`` until ``until_epoch`` (None: see module doc)."""
        until = -1.0 if until_epoch is None else float(until_epoch)
        return float(await self._hold(keys=self._keys(portal_key, method),
                                      args=[self.window, until]))


def used(client: redis.Redis, portal_key: str, method: str, *, now: float,
         prefix: str = "b24relay:operating:", window: float = WINDOW) -> float:
    """Seconds of ``method`` booked in the live window (read-only: the dashboard's figure;
    reservations of batches in flight not included). A bucket's value is "seconds last
    booking" and it lives until a window after that booking (see ``_LIVE``)."""
    name = f"{portal_key}:{method.strip().lower()}"
    total = 0.0
    for start, value in client.hgetall(f"{prefix}{name}").items():
        seconds, _, last = (value.decode() if isinstance(value, bytes) else str(value)
                            ).partition(" ")
        if float(last or start) + window > now:
            total += float(seconds)
    return total
