"""Per-portal, per-minute dispatcher statistics in Redis: what a portal's dashboard charts.

Each batch that comes back books, in one script call (one round trip, pipelined with
nothing else), into the hash of its portal's minute ``b24relay:dstats:<portal id>:<minute>``:

- ``b<i>``: how many batches took a round trip in log-spaced bucket ``i`` (ratio
  :data:`RATIO`, from 1 ms: a percentile read back from the buckets is within 7 % of the true
  one), ``max`` (ms), the slowest, and ``min`` (ms), the quickest (a percentile is read
  within them: all batches at 5.0 s read 5.0 s, not their bucket's middle);
- ``sent``, ``done``, ``dead``, ``queued``: the batch's commands and their outcomes;
- ``r503``: batches Bitrix24 refused with QUERY_LIMIT_EXCEEDED.

The same counts go to the minute's hash of all portals (``…:all:<minute>``), and the batch's
commands to the minute's sorted set of portals by commands (``…:busy:<minute>``): the
Prometheus collector (``app.dispatcher.metrics``) names the busiest portals from it and
lumps the others. Every key expires :data:`KEEP` seconds after its last write (24 h and a
margin), so idle portals cost nothing. Methods sent recently are remembered per portal (a
hash of method → epoch, same expiry) so the dashboard knows whose operating time to show.

Portal ids, not member_ids: the keys are read by the dashboard of the portal's own session
and by the operator's collector; neither needs the member_id.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import redis
import redis.asyncio
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import distinct, func, select

from app.dispatcher.models import CommandStatus, OutboxCommand
from app.extensions import db, redis_ext
from app.tenants.models import aware

log = logging.getLogger(__name__)

PREFIX = "b24relay:dstats:"
KEEP = 25 * 3600          # seconds a minute's keys live after their last write
MINUTES = 24 * 60         # what the dashboard reads by default
RATIO = 1.15              # log-spaced buckets: bucket i holds [RATIO**i, RATIO**(i+1)) ms
OUTCOMES = ("done", "dead", "queued")

# KEYS: the portal's minute, all portals' minute, the busy set, the portal's methods.
# ARGV: keep, portal id, bucket field ("" for none), ms, sent, done, dead, queued, 503 (0|1),
#       now (epoch), then method names.
_BATCH = """
local keep = tonumber(ARGV[1])
for k = 1, 2 do
  local key = KEYS[k]
  if ARGV[3] ~= '' then
    redis.call('HINCRBY', key, ARGV[3], 1)
    redis.call('HINCRBY', key, 'n', 1)
    local ms = tonumber(ARGV[4])
    if ms > tonumber(redis.call('HGET', key, 'max') or '-1') then
      redis.call('HSET', key, 'max', ARGV[4])
    end
    local low = redis.call('HGET', key, 'min')
    if not low or ms < tonumber(low) then
      redis.call('HSET', key, 'min', ARGV[4])
    end
  end
  local names = {'sent', 'done', 'dead', 'queued', 'r503'}
  for i, name in ipairs(names) do
    local by = tonumber(ARGV[4 + i])
    if by ~= 0 then redis.call('HINCRBY', key, name, by) end
  end
  redis.call('EXPIRE', key, keep)
end
if tonumber(ARGV[5]) > 0 then
  redis.call('ZINCRBY', KEYS[3], tonumber(ARGV[5]), ARGV[2])
  redis.call('EXPIRE', KEYS[3], 3600)
end
for i = 11, #ARGV do redis.call('HSET', KEYS[4], ARGV[i], ARGV[10]) end
if #ARGV >= 11 then redis.call('EXPIRE', KEYS[4], keep) end
return 1
"""


def minute_of(epoch: float) -> int:
    """The minute (epoch seconds, floored to 60) an instant falls in."""
    return int(epoch) // 60 * 60


def key(portal: int | str, minute: int) -> str:
    """The hash of one portal's minute (``portal`` ``all``: every portal's)."""
    return f"{PREFIX}{portal}:{minute}"


def busy_key(minute: int) -> str:
    """The minute's sorted set of portal ids by commands sent."""
    return f"{PREFIX}busy:{minute}"


def methods_key(portal_id: int) -> str:
    """The portal's recently sent methods (method -> epoch of its last batch)."""
    return f"{PREFIX}{portal_id}:methods"


def bucket_of(ms: float) -> int:
    """The log-spaced bucket of a round trip of ``ms`` milliseconds (0 below 1 ms)."""
    return 0 if ms < 1 else int(math.log(ms) / math.log(RATIO))


def bucket_value(index: int) -> float:
    """The value a bucket stands for (ms): its geometric middle."""
    return float(RATIO ** (index + 0.5))


class AsyncRecorder:
    """Books batches from the dispatcher's event loop (``redis.asyncio``)."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self._batch = client.register_script(_BATCH)

    async def batch(self, portal_id: int, seconds: float | None, rows: Sequence[Mapping[str, Any]],
                    *, limited: bool, methods: Iterable[str] = (),
                    now: float | None = None) -> None:
        """One batch came back: its round trip, its commands' outcomes, a 503 or not.
        Never raises: the statistics must not cost a batch its outcome."""
        try:
            await self._batch(keys=_keys(portal_id, now), args=_args(portal_id, seconds, rows,
                                                                     limited, methods, now))
        except (redis.RedisError, OSError) as exc:
            log.debug("portal %s: batch statistics not kept: %s", portal_id, exc)

    async def dead(self, portal_id: int, count: int, now: float | None = None) -> None:
        """Commands dead-lettered without being sent (their dependency is dead)."""
        try:
            await self._batch(keys=_keys(portal_id, now),
                              args=[KEEP, portal_id, "", 0, 0, 0, count, 0, 0, 0])
        except (redis.RedisError, OSError) as exc:
            log.debug("portal %s: dead-letter statistics not kept: %s", portal_id, exc)


class Recorder:
    """The same through a sync ``redis.Redis`` (tests, tools)."""

    def __init__(self, client: redis.Redis) -> None:
        self._batch = client.register_script(_BATCH)

    def batch(self, portal_id: int, seconds: float | None, rows: Sequence[Mapping[str, Any]],
              *, limited: bool = False, methods: Iterable[str] = (),
              now: float | None = None) -> None:
        """Book one batch (see ``AsyncRecorder.batch``; this one raises)."""
        self._batch(keys=_keys(portal_id, now),
                    args=_args(portal_id, seconds, rows, limited, methods, now))


def _keys(portal_id: int, now: float | None) -> list[str]:
    minute = minute_of(time.time() if now is None else now)
    return [key(portal_id, minute), key("all", minute), busy_key(minute),
            methods_key(portal_id)]


def _args(portal_id: int, seconds: float | None, rows: Sequence[Mapping[str, Any]],
          limited: bool, methods: Iterable[str], now: float | None) -> list[Any]:
    tally = dict.fromkeys(OUTCOMES, 0)
    for row in rows:
        if row.get("status") in tally:
            tally[row["status"]] += 1
    ms = max(0, round((seconds or 0.0) * 1000))
    field = "" if seconds is None else f"b{bucket_of(ms)}"
    names = sorted({m.strip().lower() for m in methods if m})
    return [KEEP, portal_id, field, ms, len(rows), tally["done"], tally["dead"],
            tally["queued"], 1 if limited else 0, int(time.time() if now is None else now),
            *names]


@dataclass(frozen=True)
class Minute:
    """One minute of a portal's dispatching; round trips in seconds (None: no batch)."""

    minute: int          # epoch seconds of the minute's start
    batches: int
    p50: float | None
    p95: float | None
    max: float | None
    sent: int
    done: int
    dead: int
    queued: int
    rate_limited: int

    def as_dict(self) -> dict[str, Any]:
        """The minute as JSON."""
        return asdict(self)


def percentile(buckets: Mapping[int, int], q: float, ceiling: float | None = None,
               floor: float | None = None) -> float | None:
    """The ``q`` quantile (0..1) of bucketed round trips in ms, or None without any; never
    above ``ceiling`` (the minute's true maximum) nor below ``floor`` (its minimum)."""
    total = sum(buckets.values())
    if total <= 0:
        return None
    rank, seen = max(1, math.ceil(q * total)), 0
    for index in sorted(buckets):
        seen += buckets[index]
        if seen >= rank:
            value = bucket_value(index)
            value = min(value, ceiling) if ceiling is not None else value
            return max(value, floor) if floor is not None else value
    return None  # unreachable


def parse(minute: int, raw: Mapping[Any, Any]) -> Minute:
    """A minute's hash as read from Redis."""
    fields = {(k.decode() if isinstance(k, bytes) else k): int(float(v)) for k, v in raw.items()}
    buckets = {int(k[1:]): v for k, v in fields.items() if k.startswith("b") and k[1:].isdigit()}
    top, low = fields.get("max"), fields.get("min")

    def seconds(ms: float | None) -> float | None:
        return None if ms is None else round(ms / 1000, 4)

    return Minute(minute=minute, batches=fields.get("n", 0),
                  p50=seconds(percentile(buckets, 0.5, top, low)),
                  p95=seconds(percentile(buckets, 0.95, top, low)), max=seconds(top),
                  sent=fields.get("sent", 0), done=fields.get("done", 0),
                  dead=fields.get("dead", 0), queued=fields.get("queued", 0),
                  rate_limited=fields.get("r503", 0))


def series(portal_id: int, minutes: int = MINUTES, now: float | None = None,
           client: redis.Redis | None = None) -> list[Minute]:
    """A portal's last ``minutes`` minutes (the current one last), oldest first; minutes
    without a batch are zeros. One pipelined round trip."""
    return _series(portal_id, minutes, now, client)


def _series(portal: int | str, minutes: int, now: float | None,
            client: redis.Redis | None) -> list[Minute]:
    client = client or redis_ext.client
    last = minute_of(time.time() if now is None else now)
    starts = [last - 60 * i for i in range(max(1, min(minutes, MINUTES + 60)) - 1, -1, -1)]
    pipe = client.pipeline(transaction=False)
    for start in starts:
        pipe.hgetall(key(portal, start))
    return [parse(start, raw) for start, raw in zip(starts, pipe.execute(), strict=True)]


def recent_methods(portal_id: int, within: float = 600.0, now: float | None = None,
                   client: redis.Redis | None = None) -> list[str]:
    """The methods the portal sent in the last ``within`` seconds, sorted."""
    raw = (client or redis_ext.client).hgetall(methods_key(portal_id))
    since = (time.time() if now is None else now) - within
    return sorted(k.decode() if isinstance(k, bytes) else str(k)
                  for k, v in raw.items() if float(v) >= since)


def busiest(minute: int, count: int, client: redis.Redis | None = None) -> list[tuple[int, float]]:
    """The ``count`` portals that sent the most commands in ``minute``: (portal id, commands)."""
    raw: list[Any] = list((client or redis_ext.client).zrevrange(
        busy_key(minute), 0, max(0, count - 1), withscores=True))
    return [(int(member), float(score)) for member, score in raw]


def minute_hashes(portals: Sequence[int | str], minute: int,
                  client: redis.Redis | None = None) -> dict[int | str, Minute]:
    """Several portals' (or ``all``'s) hashes for one minute, in one round trip."""
    pipe = (client or redis_ext.client).pipeline(transaction=False)
    for portal in portals:
        pipe.hgetall(key(portal, minute))
    return {p: parse(minute, raw) for p, raw in zip(portals, pipe.execute(), strict=True)}


def raw_minute(portal: int | str, minute: int,
               client: redis.Redis | None = None) -> dict[str, int]:
    """A minute's hash as numbers (the bucket counts too): for the collector's ``other``."""
    raw = (client or redis_ext.client).hgetall(key(portal, minute))
    return {(k.decode() if isinstance(k, bytes) else k): int(float(v)) for k, v in raw.items()}


def batches_in_flight(portal_id: int) -> int:
    """The portal's batches on the wire now (leased commands' distinct batches)."""
    c = OutboxCommand
    return int(db.session.scalar(
        select(func.count(distinct(c.batch_id))).where(
            c.portal_id == portal_id, c.status == CommandStatus.INFLIGHT.value)) or 0)


def command_times(portal_id: int, command_ids: Sequence[int]) -> dict[int, datetime]:
    """When each of these done commands of the portal was done (others are left out)."""
    c, found = OutboxCommand, {}
    ids = sorted({int(i) for i in command_ids})
    for start in range(0, len(ids), 500):
        rows = db.session.execute(select(c.id, c.completed_at).where(
            c.portal_id == portal_id, c.id.in_(ids[start:start + 500]),
            c.status == CommandStatus.DONE.value)).all()
        found.update({r.id: aware(r.completed_at) for r in rows if r.completed_at})
    return found


def depth(portal_id: int) -> dict[str, int]:
    """The portal's unfinished commands (queued, in flight) and dead ones; done rows are not
    counted (the status index finds the others without reading them)."""
    c = OutboxCommand
    wanted = [CommandStatus.QUEUED.value, CommandStatus.INFLIGHT.value, CommandStatus.DEAD.value]
    counts = dict.fromkeys(wanted, 0)
    rows = db.session.execute(
        select(c.status, func.count()).where(c.portal_id == portal_id, c.status.in_(wanted))
        .group_by(c.status)).all()
    counts.update({status: int(count) for status, count in rows})
    return counts


OTHER = "other"


class PortalCollector(Collector):
    """The last whole minute per portal, at scrape time, for the hosted deployment's operator:

    - ``b24relay_portal_batch_seconds{portal,quantile}``: round trip p50, p95 and max (1);
    - ``b24relay_portal_commands_per_second{portal,outcome}``: sent, done, dead;
    - ``b24relay_portal_rate_limited{portal}``: batches refused with 503 in that minute.

    ``portal`` is the portal's numeric id for the ``limit`` busiest portals of the minute
    (by commands sent; ``METRICS_PORTALS``), and ``other`` for all the rest summed: the label
    set stays at ``limit`` + 1 however many portals there are, and never names a member_id or
    a domain. Read from Redis, so every process and host reports the same figures.
    """

    def __init__(self, limit: int = 20) -> None:
        self.limit = limit

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._families().values())

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        return {
            "rt": GaugeMetricFamily("b24relay_portal_batch_seconds",
                                    "Batch round trip in the last whole minute (quantile 1: "
                                    "the slowest), per busy portal and other.",
                                    labels=["portal", "quantile"]),
            "cps": GaugeMetricFamily("b24relay_portal_commands_per_second",
                                     "Commands per second in the last whole minute, by "
                                     "outcome, per busy portal and other.",
                                     labels=["portal", "outcome"]),
            "r503": GaugeMetricFamily("b24relay_portal_rate_limited",
                                      "Batches refused with QUERY_LIMIT_EXCEEDED in the last "
                                      "whole minute, per busy portal and other.",
                                      labels=["portal"]),
        }

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = self._families()
        try:
            samples = self.samples(time.time())
        except (redis.RedisError, OSError, RuntimeError):  # a scrape must not fail
            samples = {}
        for portal, minute in samples.items():
            for quantile, value in (("0.5", minute.p50), ("0.95", minute.p95),
                                    ("1", minute.max)):
                if value is not None:
                    families["rt"].add_metric([portal, quantile], value)
            for outcome in ("sent", "done", "dead"):
                families["cps"].add_metric([portal, outcome], getattr(minute, outcome) / 60)
            families["r503"].add_metric([portal], minute.rate_limited)
        yield from families.values()

    def samples(self, now: float, client: redis.Redis | None = None) -> dict[str, Minute]:
        """The busiest portals' last whole minute by label, and ``other`` (the rest summed)."""
        client = client or redis_ext.client
        minute = minute_of(now) - 60
        top: list[int | str] = [portal for portal, _ in busiest(minute, self.limit, client)]
        pipe = client.pipeline(transaction=False)
        for portal in [*top, "all"]:
            pipe.hgetall(key(portal, minute))
        raws = [_numbers(raw) for raw in pipe.execute()]
        out = {str(portal): parse(minute, raw) for portal, raw in zip(top, raws, strict=False)}
        rest = _minus(raws[-1], raws[:-1])
        if any(rest.values()):
            out[OTHER] = parse(minute, rest)
        return out


def _numbers(raw: Mapping[bytes | str, bytes | str]) -> dict[str, int]:
    return {(k.decode() if isinstance(k, bytes) else k): int(float(v)) for k, v in raw.items()}


def _minus(total: Mapping[str, int], parts: Sequence[Mapping[str, int]]) -> dict[str, int]:
    """All portals' minute less the named ones' (the slowest stays when it was another's)."""
    rest = {k: v - sum(p.get(k, 0) for p in parts) for k, v in total.items() if k != "max"}
    rest = {k: v for k, v in rest.items() if v > 0}
    if rest.get("n") and "max" in total and all(p.get("max", -1) < total["max"] for p in parts):
        rest["max"] = total["max"]
    elif rest.get("n"):
        top = max(int(k[1:]) for k in rest if k.startswith("b") and k[1:].isdigit())
        rest["max"] = round(bucket_value(top))
    return rest
