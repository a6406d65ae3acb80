"""The dispatcher engine: an event loop in a daemon thread that drives portals' outboxes.

How work reaches it:

- **nudge**: after a commit that submitted commands, the portal's id is published on a
  Redis channel every engine listens on. An engine that is not driving the portal tries
  to own it (``SET NX PX`` on ``b24relay:dispatch:owner:<id>``); one heartbeat renews
  every owned portal in one script call. The owner re-reads the portal's ready commands
  at once.
- **limits**: a settings save that changes a portal's dispatcher limits (K, sequential
  mode) says so on a second channel (``credentials.limits_changed``); the portal's driver
  reads them again before its next round. Limits ride with the portal's credentials
  snapshot (``Settings.portal``), so a batch costs no query for them.
- **sweep** (``app.dispatcher.sweep``, a periodic job): nudges portals with due retries,
  recovers expired leases, and is the only thing that finds portals whose owner died or
  whose held status cleared.

Per owned portal one driver coroutine runs while the portal has work, and none when it
has none (idle portals cost nothing). What a driver sends and when is scheduling
(``app.dispatcher.scheduling``); one batch on the wire and what its answer does is a
flight (``app.dispatcher.flight``). This module holds the loop, the ownership of portals
and the heartbeat. Database work runs in a small thread pool in SQL Core (``run_db``);
the loop itself never blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import httpx
import redis.asyncio as aioredis
from flask import Flask

from app.bitrix import AsyncRestClient
from app.dispatcher import lease, nudge, policy, stats, store
from app.dispatcher.bucket import PLANS, AsyncRateBucket, scaled_plans
from app.dispatcher.credentials import CredentialStore, limits_channel
from app.dispatcher.flight import GroupWriter
from app.dispatcher.lease import RELEASE, RENEW
from app.dispatcher.ledger import LIMIT, AsyncOperatingLedger
from app.dispatcher.scheduling import Driver
from app.extensions import db

log = logging.getLogger(__name__)
T = TypeVar("T")
PACE_MEMORY = 5.0      # seconds a retired driver's last launch is remembered
REDIS_CONNECTIONS = 2048  # the engine's Redis pool: above the batches that may land at once
SHUTDOWN_GRACE = 2.0  # seconds stop() waits for a cancelled task (see _cancel)


@dataclass(frozen=True)
class Settings:
    """The engine's settings (app/config.py DISPATCH_*)."""

    sequential: bool
    max_inflight: int
    linger: float
    horizon: timedelta
    request_timeout: float
    lease_margin: float
    pace: float
    owner_ttl: float
    db_threads: int
    max_connections: int
    resend: policy.ResendLimits  # what a resend after an unknown outcome may depend on
    bucket_scale: float = 1.0
    operating_limit: float = LIMIT

    @classmethod
    def from_config(cls, cfg: Any) -> Settings:
        """Read the DISPATCH_* settings."""
        return cls(sequential=cfg["DISPATCH_MODE"] == "sequential",
                   max_inflight=int(cfg["DISPATCH_MAX_INFLIGHT"]),
                   linger=float(cfg["DISPATCH_LINGER_MS"]) / 1000,
                   horizon=timedelta(hours=float(cfg["DISPATCH_RETRY_HORIZON_HOURS"])),
                   request_timeout=float(cfg["DISPATCH_REQUEST_TIMEOUT"]),
                   lease_margin=float(cfg["DISPATCH_LEASE_MARGIN"]),
                   pace=float(cfg["DISPATCH_PACE_MS"]) / 1000,
                   owner_ttl=float(cfg["DISPATCH_OWNER_TTL"]),
                   db_threads=int(cfg["DISPATCH_DB_THREADS"]),
                   max_connections=int(cfg["DISPATCH_MAX_CONNECTIONS"]),
                   resend=policy.ResendLimits.from_config(cfg),
                   bucket_scale=float(cfg["DISPATCH_BUCKET_SCALE"]),
                   operating_limit=float(cfg["DISPATCH_OPERATING_LIMIT"]))

    def plans(self) -> dict[str, tuple[float, int]]:
        """The rate bucket's plans, scaled by ``DISPATCH_BUCKET_SCALE``."""
        return scaled_plans(self.bucket_scale)

    def portal(self, max_inflight: int | None, sequential: bool | None) -> Settings:
        """These settings with one portal's own dispatcher limits (its settings page): K
        (None: automatic, the app's rule) and sequential mode (None: ``DISPATCH_MODE``)."""
        mode = self.sequential if sequential is None else sequential
        k = self.max_inflight if max_inflight is None else max_inflight
        if (mode, k) == (self.sequential, self.max_inflight):
            return self
        return dataclasses.replace(self, sequential=mode, max_inflight=k)

    def slots(self, plan: str) -> int:
        """K for a portal on ``plan``: the setting, else the plan's burst plus its real-time
        slots (``realtime_slots``).

        The bucket never lets more than a burst of requests leave at once, and pacing keeps
        about round trip / gap batches in flight (33 at 10 s and 0.3 s): fewer slots than
        the burst would cap a slow portal's rate below its bucket's."""
        if self.sequential:
            return 1
        return self.max_inflight or plan_slots(plan)

    def realtime_slots(self, plan: str) -> int:
        """The slots bulk work never takes: a fifth of the burst on top of it by default (10
        standard, 50 enterprise), the last one when K is set. A backlog's first round fills
        the burst's slots for a whole round trip (10 s or more on a slow day); the calls that
        arrive meanwhile, one batch each, must still find a slot."""
        if self.sequential:
            return 0
        if self.max_inflight:
            return 1 if self.max_inflight > 1 else 0
        return _realtime(plan)


def _realtime(plan: str) -> int:
    return max(1, PLANS.get(plan, PLANS["standard"])[1] // 5)


def plan_slots(plan: str) -> int:
    """Automatic K on ``plan``: its burst plus its real-time slots (60 standard, 300
    enterprise); also the most a portal's administrator may set."""
    return max(1, PLANS.get(plan, PLANS["standard"])[1]) + _realtime(plan)


def automatic_slots(cfg: Any, plan: str) -> int:
    """K of a portal on ``plan`` that sets no limits of its own (the app's DISPATCH_*)."""
    if cfg["DISPATCH_MODE"] == "sequential":
        return 1
    return int(cfg["DISPATCH_MAX_INFLIGHT"]) or plan_slots(plan)


class Engine:
    """Drives the outboxes of the portals this process owns; ``start()`` / ``stop()``."""

    def __init__(self, app: Flask, *, owner: str | None = None) -> None:
        self.app = app
        self.settings = Settings.from_config(app.config)
        with app.app_context():
            self.db = db.engine
        self.redis_url = app.config["REDIS_URL"]
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.drivers: dict[int, Driver] = {}
        self._claiming: set[int] = set()
        self._rewake: set[int] = set()
        self._launched: dict[int, float] = {}  # retired drivers' last launch (pacing)
        self._timers: dict[int, asyncio.TimerHandle] = {}  # portals waiting out a pause
        self._tasks: list[asyncio.Task[Any]] = []  # the engine's own: listener, heartbeat
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._stop_timeout = 10.0  # seconds stop() lets batches in flight finish

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 10.0) -> Engine:
        """Start the loop thread; returns once the engine listens for nudges."""
        self._thread = threading.Thread(target=self._run, name="b24relay-dispatcher",
                                        daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError(f"dispatcher engine did not start: {self._failure!r}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking work, let batches in flight finish (up to ``timeout``), release portals."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        self._stop_timeout = timeout
        loop.call_soon_threadsafe(self._stopping.set)
        thread.join(timeout + 5)

    def wake(self, portal_id: int) -> None:
        """Nudge from another thread (tests, the CLI): drive ``portal_id`` if it has work."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._wake(portal_id)))

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # a dying engine must say why
            self._failure = exc
            log.exception("dispatcher engine stopped")
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self.executor = concurrent.futures.ThreadPoolExecutor(
            self.settings.db_threads, thread_name_prefix="b24relay-dispatch-db")
        # Many batches land at once (250 for an enterprise portal) and each then talks to
        # Redis: the default pool (100) raised past that and stranded their leases.
        self.redis = aioredis.Redis.from_url(self.redis_url, max_connections=REDIS_CONNECTIONS)
        self.client = AsyncRestClient(
            timeout=httpx.Timeout(self.settings.request_timeout, connect=5.0),
            max_connections=self.settings.max_connections,
            verify=self.app.config["B24_CA_BUNDLE"] or True)
        self.bucket = AsyncRateBucket(self.redis, plans=self.settings.plans())
        self.ledger = AsyncOperatingLedger(self.redis, limit=self.settings.operating_limit)
        self.credentials = CredentialStore(self.app, self.executor)
        self.recorder = GroupWriter(self)
        self.stats = stats.AsyncRecorder(self.redis)  # the dashboard's minutes
        pubsub = self.redis.pubsub()
        self._limits_channel = limits_channel(self.redis).encode()
        await pubsub.subscribe(nudge.channel(self.redis), limits_channel(self.redis))
        self._tasks = [asyncio.create_task(self._listen(pubsub), name="nudge-listener"),
                       asyncio.create_task(self._heartbeat(), name="heartbeat")]
        self._started.set()
        try:
            await self._stopping.wait()
        finally:
            await self._shutdown(self._tasks, pubsub)

    async def _shutdown(self, tasks: list[asyncio.Task[Any]], pubsub: Any) -> None:
        for driver in list(self.drivers.values()):
            driver.retiring = True
            driver.poke()
        drivers = [d.task for d in self.drivers.values() if d.task is not None]
        if drivers:
            _, late = await asyncio.wait(drivers, timeout=min(self._stop_timeout,
                                                              self.settings.request_timeout))
            # their leases lapse and the sweep recovers them, as after a crash
            await _cancel(late, grace=SHUTDOWN_GRACE)
        for timer in self._timers.values():
            timer.cancel()
        await _cancel(tasks, grace=SHUTDOWN_GRACE)
        await pubsub.aclose()
        await self.client.aclose()
        await self.redis.aclose()
        self.executor.shutdown(wait=True)

    # ------------------------------------------------------------------ helpers
    async def run_db(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking database function in the engine's thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: func(*args, **kwargs))

    def lease_length(self) -> timedelta:
        """How long a batch's commands stay leased."""
        return store.lease_seconds(self.settings.request_timeout, self.settings.lease_margin)

    # ------------------------------------------------------------------ ownership
    async def _listen(self, pubsub: Any) -> None:
        while not self._stopping.is_set():  # a cancel alone may be lost (see _cancel)
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except (aioredis.RedisError, OSError) as exc:
                log.warning("dispatch nudges unavailable (%s); the sweep still finds work", exc)
                await asyncio.sleep(1.0)
                continue
            if message and message.get("type") == "message":
                if _bytes(message.get("channel")) == self._limits_channel:
                    for portal_id in nudge.decode(message["data"]):
                        self._limits_changed(portal_id)
                    continue
                for portal_id in nudge.decode(message["data"]):
                    await self._wake(portal_id)

    def _limits_changed(self, portal_id: int) -> None:
        """A portal's settings changed its dispatcher limits: its driver, if this engine
        runs one, reads them again (a driver started later reads them anyway)."""
        driver = self.drivers.get(portal_id)
        if driver is not None:
            driver.limits_changed()

    async def _wake(self, portal_id: int) -> None:
        driver = self.drivers.get(portal_id)
        if driver is not None:
            driver.poke()
            return
        if portal_id in self._claiming or self._stopping.is_set():
            self._rewake.add(portal_id)
            return
        self._claiming.add(portal_id)
        try:
            owned = await self.redis.set(lease.key(portal_id), self.owner, nx=True,
                                         px=int(self.settings.owner_ttl * 1000))
        except aioredis.RedisError as exc:
            log.warning("cannot claim portal %s: %s", portal_id, exc)
            owned = False
        finally:
            self._claiming.discard(portal_id)
        if owned and not self._stopping.is_set():
            driver = Driver(self, portal_id)
            self.drivers[portal_id] = driver
            driver.task = asyncio.create_task(driver.run())
        self._retry_rewake(portal_id)

    def _retry_rewake(self, portal_id: int) -> None:
        if portal_id in self._rewake and portal_id not in self._claiming:
            self._rewake.discard(portal_id)
            asyncio.ensure_future(self._wake(portal_id))

    async def retire(self, driver: Driver) -> None:
        """A driver ran out of work: forget it and give its portal up."""
        if self.drivers.get(driver.portal_id) is driver:
            del self.drivers[driver.portal_id]
        self._remember_launch(driver.portal_id, driver.last_launch)
        if driver.resume_at is not None and not driver.retiring:
            self._wake_later(driver.portal_id, driver.resume_at)
        self._claiming.add(driver.portal_id)  # a nudge meanwhile waits for the release
        try:
            await self.redis.eval(RELEASE, 1, lease.key(driver.portal_id), self.owner)
        except aioredis.RedisError as exc:
            log.warning("portal %s not released (its lease expires): %s", driver.portal_id, exc)
        finally:
            self._claiming.discard(driver.portal_id)
        self._retry_rewake(driver.portal_id)

    def _wake_later(self, portal_id: int, epoch: float) -> None:
        """Wake ``portal_id`` when its paused method may go again (one timer per portal,
        only while it waits: not the sweep's interval later)."""
        if portal_id in self._timers or self._stopping.is_set():
            return
        delay = max(0.0, epoch - time.time()) + 0.05

        def fire() -> None:
            self._timers.pop(portal_id, None)
            asyncio.ensure_future(self._wake(portal_id))

        self._timers[portal_id] = asyncio.get_running_loop().call_later(delay, fire)

    def _remember_launch(self, portal_id: int, when: float) -> None:
        """Keep a retiring driver's last launch for the next one: a command arriving just
        after a driver ran dry must still wait out the pacing gap. Only recent launches
        are kept (a gap is at most a second), so idle portals leave nothing behind."""
        now = time.monotonic()
        for pid in [p for p, t in self._launched.items() if now - t > PACE_MEMORY]:
            del self._launched[pid]
        if now - when <= PACE_MEMORY:
            self._launched[portal_id] = when

    def last_launch(self, portal_id: int) -> float:
        """A recently retired driver's last launch for ``portal_id`` (monotonic), else never."""
        return self._launched.pop(portal_id, -1e9)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.owner_ttl / 3)
            ids = list(self.drivers)
            if not ids:
                continue
            try:
                keys = [lease.key(i) for i in ids]
                lost = await self.redis.eval(RENEW, len(ids), *keys,
                                             self.owner, int(self.settings.owner_ttl * 1000))
            except aioredis.RedisError as exc:
                log.warning("dispatch ownership not renewed: %s", exc)
                continue
            for index in lost:
                driver = self.drivers.get(ids[int(index) - 1])
                if driver is not None:
                    log.warning("portal %s: ownership lost; stopping its driver", driver.portal_id)
                    driver.retiring = True
                    driver.poke()


def _bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value or b"")


async def _cancel(tasks: Iterable[asyncio.Task[Any]], *, grace: float) -> None:
    """Cancel ``tasks`` and wait up to ``grace`` seconds for them to end.

    A cancel can be lost inside a library: the nudge listener, waiting in redis-py's
    pub/sub read, was seen to go on reading after its cancel when 200 portals had just
    been nudged, and stop() then never returned. So a task still running is cancelled
    again until it ends or ``grace`` runs out; one that outlives it is named in a
    warning and left behind."""
    pending = {t for t in tasks if not t.done()}
    deadline = asyncio.get_running_loop().time() + grace
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            log.warning("%d dispatcher task(s) ignored their cancel: %s", len(pending),
                        ", ".join(sorted(t.get_name() for t in pending)))
            return
        _, pending = await asyncio.wait(pending, timeout=min(0.2, left))
