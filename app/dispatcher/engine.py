"""The dispatcher engine: an event loop in a daemon thread that drives portals' outboxes.

How work reaches it:

- **nudge**: after a commit that submitted commands, the portal's id is published on a
  Redis channel every engine listens on. An engine that is not driving the portal tries
  to own it (``SET NX PX`` on ``b24relay:dispatch:owner:<id>``); one heartbeat renews
  every owned portal in one script call. The owner re-reads the portal's ready commands
  at once.
- **sweep** (``app.dispatcher.sweep``, a periodic job): nudges portals with due retries,
  recovers expired leases, and is the only thing that finds portals whose owner died or
  whose held status cleared.

Per owned portal one driver coroutine runs while the portal has work, and none when it
has none (idle portals cost nothing). A driver keeps up to K batches in flight, starts a
batch whenever a slot is free and the portal's shared bucket gives a token (never
because a batch came back), and keeps the last slot for real-time work. Database work
runs in a small thread pool in SQL Core; the loop itself never blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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

from app.bitrix import AsyncRestClient, errors
from app.dispatcher import metrics, nudge, outcomes, results, store
from app.dispatcher.bucket import PLANS, AsyncRateBucket, reserve, scaled_plans
from app.dispatcher.credentials import CredentialStore, Snapshot
from app.dispatcher.lease import OWNER_PREFIX, RELEASE, RENEW
from app.dispatcher.ledger import LIMIT, AsyncOperatingLedger
from app.dispatcher.packer import MAX_BATCH, Candidate, Packed, pack_round
from app.dispatcher.policy import Verdict
from app.extensions import db
from app.tenants.models import utcnow

log = logging.getLogger(__name__)
T = TypeVar("T")
FETCH = 2 * MAX_BATCH  # candidates read per packing: room for key chains that cannot go yet
PACE_MEMORY = 5.0      # seconds a retired driver's last launch is remembered
REDIS_CONNECTIONS = 2048  # the engine's Redis pool: above the batches that may land at once
MAX_RESENDS = 3        # refreshes and renames before a batch's answer counts as a failure
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
                   bucket_scale=float(cfg["DISPATCH_BUCKET_SCALE"]),
                   operating_limit=float(cfg["DISPATCH_OPERATING_LIMIT"]))

    def plans(self) -> dict[str, tuple[float, int]]:
        """The rate bucket's plans, scaled by ``DISPATCH_BUCKET_SCALE``."""
        return scaled_plans(self.bucket_scale)

    def slots(self, plan: str) -> int:
        """K for a portal on ``plan``: the setting, else the plan's burst plus its real-time
        slots (``realtime_slots``).

        The bucket never lets more than a burst of requests leave at once, and pacing keeps
        about round trip / gap batches in flight (33 at 10 s and 0.3 s): fewer slots than
        the burst would cap a slow portal's rate below its bucket's."""
        if self.sequential:
            return 1
        burst = PLANS.get(plan, PLANS["standard"])[1]
        return self.max_inflight or max(1, burst) + self.realtime_slots(plan)

    def realtime_slots(self, plan: str) -> int:
        """The slots bulk work never takes: a fifth of the burst on top of it by default (10
        standard, 50 enterprise), the last one when K is set. A backlog's first round fills
        the burst's slots for a whole round trip (10 s or more on a slow day); the calls that
        arrive meanwhile, one batch each, must still find a slot."""
        if self.sequential:
            return 0
        if self.max_inflight:
            return 1 if self.max_inflight > 1 else 0
        return max(1, PLANS.get(plan, PLANS["standard"])[1] // 5)


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
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(nudge.channel(self.redis))
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
                for portal_id in nudge.decode(message["data"]):
                    await self._wake(portal_id)

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
            owned = await self.redis.set(OWNER_PREFIX + str(portal_id), self.owner, nx=True,
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
            await self.redis.eval(RELEASE, 1, OWNER_PREFIX + str(driver.portal_id), self.owner)
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
                keys = [OWNER_PREFIX + str(i) for i in ids]
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


class Driver:
    """Sends one portal's ready commands: up to K batches in flight, one bucket token each."""

    def __init__(self, engine: Engine, portal_id: int) -> None:
        self.engine = engine
        self.portal_id = portal_id
        self.task: asyncio.Task[None] | None = None
        self.inflight: set[asyncio.Task[None]] = set()
        self.retiring = False
        self.held = False
        self.snap: Snapshot | None = None
        self._wakeup = asyncio.Event()
        self._poked = False
        self._pokes = 0  # pokes so far: a nap that starts late still sees an earlier one
        self.last_launch = engine.last_launch(portal_id)  # monotonic, for pacing
        self.resume_at: float | None = None  # epoch a paused method may go again

    def poke(self) -> None:
        """New commands may be ready, or a slot is free: look again."""
        self._poked = True
        self._pokes += 1
        self._wakeup.set()

    @property
    def slots(self) -> int:
        """K: batches this portal may have in flight."""
        return self.engine.settings.slots(self.snap.plan if self.snap else "standard")

    async def run(self) -> None:
        """Send batches while there is work; then retire."""
        try:
            self.snap = await self.engine.credentials.aload(self.portal_id)
            while not self.retiring and not self.held and not self.snap.held:
                self._poked = False
                self._wakeup.clear()
                if len(self.inflight) < self.slots and await self._send_round():
                    continue
                if not self.inflight and not self._poked:
                    break
                await self._wakeup.wait()
        except Exception:
            log.exception("portal %s: driver failed; the sweep will resume it", self.portal_id)
        finally:
            if self.inflight:
                await asyncio.gather(*self.inflight, return_exceptions=True)
            await self.engine.retire(self)

    # ------------------------------------------------------------------ packing
    async def _send_round(self) -> bool:
        """Pack a batch for each free slot the bucket can pay for from one fetch, lease them
        in one transaction and launch them; False when nothing can go now.

        Full batches leave at once. A partial batch leaves no sooner than ``linger`` after
        it was found and ``pace`` after the previous launch (see ``_gap``). The first batch's
        token is taken before the lease (waiting for it, and packing again when new work
        arrives meanwhile); every other batch takes its own just before it is sent, so the
        bucket counts a request when it leaves, not when a large round started leasing."""
        free = self.slots - len(self.inflight)
        level, capacity = await self._bucket_level()
        want = max(1, min(free, int(capacity - level)))
        batches = await self._pack_round(want)
        if not batches:
            return False
        hold = self._hold_back(batches, level, capacity)
        if hold > 0:
            await asyncio.sleep(hold)
            batches = await self._pack_round(want)
            if not batches:
                return False
        batches = await self._first_token(batches, want)
        if not self._paced_out(level, capacity):
            batches = [b for b in batches if len(b.commands) >= MAX_BATCH] or batches[:1]
        batches = batches[:1 + await self._room(len(batches) - 1)]
        return bool(batches) and await self._launch(batches)

    async def _first_token(self, batches: list[Packed], want: int) -> list[Packed]:
        """Take a token for the round's first batch, waiting for one; a poke while waiting
        (a call arrived, a batch landed) packs again, so real-time work that arrives during
        the wait goes first and may use the bucket's reserve. [] when nothing is left."""
        while batches:
            seen = self._pokes
            wait = await self.engine.bucket.take(self.member_id, self.plan,
                                                 realtime=batches[0].realtime)
            if wait == 0:
                return batches
            await self._nap(wait, seen)
            batches = await self._pack_round(want)
        return batches

    async def _nap(self, seconds: float, seen: int) -> None:
        """Sleep up to ``seconds``, less if poked since the ``seen``-th poke (at once if that
        happened already); ``_poked`` stays as it was."""
        while self._pokes == seen:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), seconds)
            except TimeoutError:
                return

    def _hold_back(self, batches: list[Packed], level: float, capacity: float) -> float:
        """Seconds a round of only partial batches waits for more commands (0: go now)."""
        settings = self.engine.settings
        if any(len(b.commands) >= MAX_BATCH for b in batches):
            return 0.0
        if settings.sequential:
            return settings.linger
        due = self.last_launch + self._gap(level, capacity) - time.monotonic()
        return max(settings.linger, due)

    def _paced_out(self, level: float, capacity: float) -> bool:
        """Whether a partial batch may leave now (the pacing gap since the last launch)."""
        return (self.engine.settings.sequential
                or time.monotonic() >= self.last_launch + self._gap(level, capacity) - 1e-3)

    def _gap(self, level: float, capacity: float) -> float:
        """The least time between partial batches: from ``pace`` at an empty bucket up to
        one drain interval at a full one.

        Commands arriving at r/s must leave at no more than the drain rate, so in the long
        run a batch carries r / drain commands and a command waits up to 1 / drain for its
        batch. The burst is spent on waiting less (``pace``) while the bucket is empty, and
        never on tiny batches: as the bucket fills the gap stretches to the drain interval,
        where partial batches alone never fill the bucket.
        """
        drain, _ = self.engine.bucket.limits(self.plan)
        interval = 1.0 / drain
        floor = min(self.engine.settings.pace, interval)
        return floor + (interval - floor) * min(1.0, level / capacity)

    async def _bucket_level(self) -> tuple[float, float]:
        """The portal's bucket: (requests in it now, our capacity)."""
        _, capacity = self.engine.bucket.limits(self.plan)
        return await self.engine.bucket.level(self.member_id, self.plan), capacity

    @property
    def plan(self) -> str:
        """The portal's plan (its bucket and K)."""
        return self.snap.plan if self.snap else "standard"

    async def _room(self, wanted: int) -> int:
        """How many of ``wanted`` more batches the bucket can pay for now (none taken: each
        batch takes its own token as it leaves)."""
        if wanted <= 0:
            return 0
        level, capacity = await self._bucket_level()
        drain, _ = self.engine.bucket.limits(self.plan)
        return max(0, min(wanted, int(capacity - reserve(drain) - level)))

    async def _pack_round(self, free: int) -> list[Packed]:
        eng = self.engine
        ready = await eng.run_db(store.fetch_ready, eng.db, self.portal_id, utcnow(),
                                 max(FETCH, (free + 1) * MAX_BATCH))
        paused = await self._paused({c.method.lower() for c in ready.candidates})
        settings = self.engine.settings
        last_slot = max(0, self.slots - settings.realtime_slots(self.plan) - len(self.inflight))
        batches = pack_round(ready.candidates, ready.blockers, ready.deps, batches=free,
                             realtime_only_from=last_slot, paused=paused,
                             complete=ready.complete)
        doomed = {i: r for b in batches for i, r in b.doomed.items()}
        if doomed:
            await eng.run_db(store.mark_doomed, eng.db, doomed, utcnow())
            metrics.dead(self.plan, len(doomed))
            handled = [c.id for c in ready.candidates if c.id in doomed and c.handler]
            if handled:
                await eng.run_db(notify, eng.app, handled)
        self._deps = ready.deps
        return [b for b in batches if b.commands]

    async def _paused(self, methods: set[str]) -> frozenset[str]:
        """The methods the ledger pauses now; the earliest end of a pause is kept in
        ``resume_at`` (epoch), so a driver that retires with only paused work is woken then."""
        key = self.member_id
        paused, self.resume_at = set(), None
        for method in methods:
            until = await self.engine.ledger.pause_until(key, method)
            if until:
                paused.add(method)
                self.resume_at = min(until, self.resume_at or until)
        return frozenset(paused)

    @property
    def member_id(self) -> str:
        """The portal's key in the shared bucket and the ledger (never a metric label)."""
        return self.snap.member_id if self.snap else str(self.portal_id)

    async def _token(self, realtime: bool) -> None:
        """Wait until the portal's bucket gives a token."""
        while (wait := await self.engine.bucket.take(self.member_id, self.plan,
                                                     realtime=realtime)) > 0:
            await asyncio.sleep(wait)

    async def _launch(self, batches: list[Packed]) -> bool:
        eng, now = self.engine, utcnow()
        self.last_launch = time.monotonic()
        ids = [(uuid.uuid4().hex[:16], b) for b in batches]
        leased = await eng.run_db(store.lease_round, eng.db,
                                  [(bid, [c.id for c in b.commands]) for bid, b in ids],
                                  owner=eng.owner, now=now, until=now + eng.lease_length())
        launched = False
        for n, (batch_id, packed) in enumerate(ids):
            commands = [c for c in packed.commands if c.id in leased[batch_id]]
            if commands:
                wire = Packed(commands).wire(self._deps)
                task = asyncio.create_task(
                    self._flight(commands, wire, realtime=packed.realtime, paid=n == 0))
                self.inflight.add(task)
                task.add_done_callback(self._landed)
                launched = True
        return launched

    def _landed(self, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        self.poke()

    # ------------------------------------------------------------------ one batch
    async def _flight(self, commands: list[Candidate], wire: dict[str, Any], *,
                      realtime: bool, paid: bool) -> None:
        plan = self.plan  # the gauge goes down on the label it went up on
        metrics.inflight(plan, +1)
        try:
            if not paid:
                await self._token(realtime)
            started = time.monotonic()
            answer = await self._exchange(wire, realtime)
            metrics.round_trip(self.plan, time.monotonic() - started)
            await self._settle(commands, answer)
        except Exception:
            log.exception("portal %s: a batch's outcome was not recorded; its lease will "
                          "expire and the sweep recovers it", self.portal_id)
        finally:
            metrics.inflight(plan, -1)

    async def _exchange(self, wire: dict[str, Any], realtime: bool) -> Any:
        """Send the batch; refresh or follow a rename and send again (each with a token)."""
        eng = self.engine
        for _ in range(MAX_RESENDS + 1):
            snap = await self._usable()
            if snap.held:
                return outcomes.PortalHeld(f"portal {snap.member_id} is {snap.status}")
            try:
                async with asyncio.timeout(eng.settings.request_timeout + 1):
                    return await eng.client.batch(snap.client_endpoint, wire,
                                                  snap.access_token or "")
            except TimeoutError as exc:
                return exc
            except errors.PortalMoved as exc:
                self.snap = await eng.credentials.moved(snap, exc.new_client_endpoint)
            except errors.BitrixError as exc:
                if outcomes.verdict_of(exc) is not Verdict.REFRESH:
                    return exc
                metrics.refreshed(self.plan)
                self.snap = await eng.credentials.refreshed(snap)
            await self._token(realtime)
        return errors.TransportError("gave up after repeated refreshes and renames")

    async def _usable(self) -> Snapshot:
        snap = self.snap
        assert snap is not None
        if not snap.held and snap.expires_at is not None and snap.expires_at <= utcnow():
            metrics.refreshed(self.plan)
            self.snap = snap = await self.engine.credentials.refreshed(snap)
        return snap

    async def _settle(self, commands: list[Candidate], answer: Any) -> None:
        eng, now = self.engine, utcnow()
        rows, effects = outcomes.decide(commands, answer, now,
                                        outcomes.Rules(eng.settings.horizon))
        await eng.recorder.write(rows)
        metrics.settled(self.plan, commands, rows, now)
        await self._apply(effects)

    async def _apply(self, effects: outcomes.Effects) -> None:
        eng, key = self.engine, self.member_id
        if effects.fill_bucket:
            metrics.rate_limited(self.plan)
            await eng.bucket.fill(key, self.snap.plan if self.snap else "standard")
        if effects.processing:
            await eng.ledger.add_batch(key, effects.processing)
        for method, until in effects.operating.items():
            await eng.ledger.hold(key, method, until)
        if effects.refresh and self.snap is not None:
            metrics.refreshed(self.plan)
            self.snap = await eng.credentials.refreshed(self.snap)
        if effects.hold is not None:
            await self._hold(effects.hold)
        if effects.settle:
            await eng.run_db(notify, eng.app, effects.settle)

    async def _hold(self, error: BaseException) -> None:
        """Let the portal status machine judge; stop driving (the sweep resumes the portal)."""
        if isinstance(error, errors.ApiError):
            await self.engine.run_db(apply_status, self.engine.app, self.portal_id, error)
        self.snap = await self.engine.credentials.aload(self.portal_id)
        self.held = True
        log.warning("portal %s: holding its commands (%s)", self.portal_id, error)
        self.poke()


class GroupWriter:
    """Writes batches' outcomes, every batch that came back meanwhile in one commit.

    A batch's rows go into the write that starts next: while one write runs, the answers
    that arrive wait for it (never longer) and then share one transaction, so a burst of
    answers costs one commit, not one each.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.pending: list[tuple[list[dict[str, Any]], asyncio.Future[None]]] = []
        self.task: asyncio.Task[None] | None = None

    async def write(self, rows: list[dict[str, Any]]) -> None:
        """Return once ``rows`` are committed (raises what the write raised)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append((rows, done))
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._drain())
        await done

    async def _drain(self) -> None:
        eng = self.engine
        while self.pending:
            group, self.pending = self.pending, []
            try:
                await eng.run_db(store.record, eng.db, eng.owner,
                                 [row for rows, _ in group for row in rows])
            except Exception as exc:  # every waiter hears it; its lease expires as before
                for _, done in group:
                    done.set_exception(exc)
            else:
                for _, done in group:
                    done.set_result(None)


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


def apply_status(app: Flask, portal_id: int, error: errors.ApiError) -> None:
    """Move the portal through the status machine (in a worker thread, own app context)."""
    from app.tenants import status as portal_status
    from app.tenants.models import Portal

    with app.app_context():
        try:
            portal = db.session.get(Portal, portal_id)
            if portal is not None:  # OVERLOAD_LIMIT: blocked, logged at error and counted
                portal_status.apply_error(portal, error)
        except portal_status.PortalUnavailable:
            pass
        finally:
            db.session.remove()


def notify(app: Flask, finished: list[int]) -> None:
    """Enqueue the settling of these finished commands' outcomes (in a worker thread)."""
    with app.app_context():
        results.send_settle(finished)
