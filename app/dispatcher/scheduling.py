"""Scheduling: a portal's rounds, which batches go and when.

Per owned portal one driver coroutine runs while the portal has work, and none when it
has none (idle portals cost nothing). A driver keeps up to K batches in flight
(``Settings.slots``, with the portal's own limits from its settings: ``Driver.settings``;
they ride with the credentials snapshot and are read again when a settings save announces
them, or every ``LIMITS_MAX_AGE`` seconds), starts a batch whenever a slot is free and the
portal's shared bucket gives a token (never because a batch came back), and keeps the last
slots for real-time work. A round packs from one fetch (``pack_round``), leaves out the
methods the operating-time ledger pauses and takes no more of a method's commands than its
budget has room for, holds partial batches back for the pacing gap, leases its batches in
one transaction, reserves their expected operating time and launches each as a flight
(``app.dispatcher.flight``), which sends it and settles its answer (and its reservation).
Database work goes through the engine's ``run_db``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING

from app.dispatcher import flight, metrics, store
from app.dispatcher.bucket import reserve
from app.dispatcher.credentials import LIMITS_MAX_AGE, Snapshot
from app.dispatcher.packer import MAX_BATCH, Packed, pack_round
from app.tenants.models import utcnow

if TYPE_CHECKING:
    from app.dispatcher.engine import Engine, Settings

log = logging.getLogger(__name__)
FETCH = 2 * MAX_BATCH  # candidates read per packing: room for key chains that cannot go yet


class Driver:
    """Sends one portal's ready commands: up to K batches in flight, one bucket token each."""

    def __init__(self, engine: Engine, portal_id: int) -> None:
        self.engine = engine
        self.portal_id = portal_id
        self.task: asyncio.Task[None] | None = None
        self.inflight: set[asyncio.Task[None]] = set()
        self.retiring = False
        self.held = False  # a flight's answer held the portal: stop driving
        self.snap: Snapshot | None = None  # a flight replaces it on a refresh or a rename
        self._wakeup = asyncio.Event()
        self._poked = False
        self._pokes = 0  # pokes so far: a nap that starts late still sees an earlier one
        self.last_launch = engine.last_launch(portal_id)  # monotonic, for pacing
        self.resume_at: float | None = None  # epoch a paused method may go again
        self._limits_read = 0.0  # monotonic: when the snapshot's limits were read
        self._limits_stale = False  # a settings save announced new limits
        self._settings: tuple[tuple[int | None, bool | None], Settings] | None = None

    def limits_changed(self) -> None:
        """The portal's settings changed its dispatcher limits: read them before the next
        round (a slot freed, a batch sent: the new K counts from there)."""
        self._limits_stale = True
        self.poke()

    async def _read_limits(self) -> None:
        """The portal's limits (and plan) as committed now, kept in ``snap``: after a
        settings save, and every ``LIMITS_MAX_AGE`` seconds while driving (a lost message)."""
        fresh = await self.engine.credentials.aload(self.portal_id)
        self._limits_stale, self._limits_read = False, time.monotonic()
        if self.snap is None:
            self.snap = fresh
            return
        self.snap = dataclasses.replace(self.snap, plan=fresh.plan,
                                        max_inflight=fresh.max_inflight,
                                        sequential=fresh.sequential)

    @property
    def settings(self) -> Settings:
        """The engine's settings with this portal's own dispatcher limits (K, sequential)."""
        snap = self.snap
        if snap is None:
            return self.engine.settings
        limits = (snap.max_inflight, snap.sequential)
        if self._settings is None or self._settings[0] != limits:
            self._settings = (limits, self.engine.settings.portal(*limits))
        return self._settings[1]

    def poke(self) -> None:
        """New commands may be ready, or a slot is free: look again."""
        self._poked = True
        self._pokes += 1
        self._wakeup.set()

    @property
    def slots(self) -> int:
        """K: batches this portal may have in flight."""
        return self.settings.slots(self.plan)

    async def run(self) -> None:
        """Send batches while there is work; then retire."""
        try:
            self.snap = await self.engine.credentials.aload(self.portal_id)
            self._limits_read = time.monotonic()
            while not self.retiring and not self.held and not self.snap.held:
                self._poked = False
                self._wakeup.clear()
                if (self._limits_stale
                        or time.monotonic() - self._limits_read > LIMITS_MAX_AGE):
                    await self._read_limits()
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
        settings = self.settings
        if any(len(b.commands) >= MAX_BATCH for b in batches):
            return 0.0
        if settings.sequential:
            return settings.linger
        due = self.last_launch + self._gap(level, capacity) - time.monotonic()
        return max(settings.linger, due)

    def _paced_out(self, level: float, capacity: float) -> bool:
        """Whether a partial batch may leave now (the pacing gap since the last launch)."""
        return (self.settings.sequential
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
        paused, allowance = await self._budgets({c.method.lower() for c in ready.candidates})
        last_slot = max(0, self.slots - self.settings.realtime_slots(self.plan)
                        - len(self.inflight))
        batches = pack_round(ready.candidates, ready.blockers, ready.deps, batches=free,
                             realtime_only_from=last_slot, paused=paused,
                             complete=ready.complete, allowance=allowance)
        doomed = {i: r for b in batches for i, r in b.doomed.items()}
        if doomed:
            await eng.run_db(store.mark_doomed, eng.db, doomed, utcnow())
            metrics.dead(self.plan, len(doomed))
            await eng.stats.dead(self.portal_id, len(doomed))
            handled = [c.id for c in ready.candidates if c.id in doomed and c.handler]
            if handled:
                await eng.run_db(flight.notify, eng.app, handled)
        self._deps = ready.deps
        return [b for b in batches if b.commands]

    async def _budgets(self, methods: set[str]) -> tuple[frozenset[str], dict[str, int]]:
        """The methods the ledger pauses now, and how many commands of each other method
        fit in its budget (seconds in flight count); the earliest end of a pause is kept in
        ``resume_at`` (epoch), so a driver that retires with only paused work is woken then."""
        key = self.member_id
        paused, room, self.resume_at = set(), {}, None
        for method in methods:
            budget = await self.engine.ledger.budget(key, method)
            if budget.until:
                paused.add(method)
                self.resume_at = min(budget.until, self.resume_at or budget.until)
            else:
                room[method] = budget.room
        return frozenset(paused), room

    @property
    def member_id(self) -> str:
        """The portal's key in the shared bucket and the ledger (never a metric label)."""
        return self.snap.member_id if self.snap else str(self.portal_id)

    async def _launch(self, batches: list[Packed]) -> bool:
        eng, now = self.engine, utcnow()
        self.last_launch = time.monotonic()
        ids = [(uuid.uuid4().hex[:16], b) for b in batches]
        leased = await eng.run_db(store.lease_round, eng.db,
                                  [(bid, [c.id for c in b.commands]) for bid, b in ids],
                                  owner=eng.owner, now=now, until=now + eng.lease_length())
        launched = False
        sending = {bid: [c for c in b.commands if c.id in leased[bid]] for bid, b in ids}
        await eng.ledger.reserve(self.member_id, {  # their seconds count before they land
            bid: Counter(c.method.lower() for c in commands)
            for bid, commands in sending.items() if commands},
            eng.lease_length().total_seconds())
        for n, (batch_id, packed) in enumerate(ids):
            commands = sending[batch_id]
            if commands:
                wire = Packed(commands).wire(self._deps)
                task = asyncio.create_task(
                    flight.fly(self, commands, wire, realtime=packed.realtime, paid=n == 0,
                               token=batch_id))
                self.inflight.add(task)
                task.add_done_callback(self._landed)
                launched = True
        return launched

    def _landed(self, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        self.poke()

