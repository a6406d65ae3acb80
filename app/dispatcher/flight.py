"""Flight: one batch on the wire, and what its answer does.

A driver (``app.dispatcher.scheduling``) launches every batch it leased as a flight. A
flight takes its bucket token unless the round paid it already, sends the batch, and on
an expired token or a renamed portal refreshes or follows the rename and sends again (each
time with a token of its own, up to ``MAX_RESENDS`` times). ``outcomes.decide`` judges the
answer; the commands' rows are written (``GroupWriter``: every answer that lands meanwhile
shares one commit), then the effects are applied: fill the bucket after a rate limit, feed
the operating-time ledger, refresh the token, hold the portal, settle finished outcomes.

A flight acts on its driver's portal state: a refresh or a rename replaces the driver's
credentials snapshot for the batches after it, and a hold stops the driver (the sweep
resumes the portal). Database work goes through the engine's ``run_db``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from flask import Flask

from app.bitrix import errors
from app.dispatcher import metrics, outcomes, results, store
from app.dispatcher.credentials import Snapshot
from app.dispatcher.packer import Candidate
from app.dispatcher.policy import Verdict
from app.extensions import db
from app.tenants import status as portal_status
from app.tenants.models import Portal, utcnow

if TYPE_CHECKING:
    from app.dispatcher.engine import Engine
    from app.dispatcher.scheduling import Driver

log = logging.getLogger(__name__)
MAX_RESENDS = 3        # refreshes and renames before a batch's answer counts as a failure


async def fly(driver: Driver, commands: list[Candidate], wire: dict[str, Any], *,
              realtime: bool, paid: bool, token: str = "") -> None:
    """Send one leased batch and act on its answer; a failure here is logged, not raised
    (the batch's lease then expires and the sweep recovers its commands). ``token``: the
    batch's reservation in the operating-time ledger, settled by its answer."""
    plan = driver.plan  # the gauge goes down on the label it went up on
    metrics.inflight(plan, +1)
    try:
        if not paid:
            await _token(driver, realtime)
        started = time.monotonic()
        answer = await _exchange(driver, wire, realtime)
        elapsed = time.monotonic() - started
        metrics.round_trip(driver.plan, elapsed)
        await _settle(driver, commands, answer, elapsed, token)
    except Exception:
        log.exception("portal %s: a batch's outcome was not recorded; its lease will "
                      "expire and the sweep recovers it", driver.portal_id)
    finally:
        metrics.inflight(plan, -1)


async def _token(driver: Driver, realtime: bool) -> None:
    """Wait until the portal's bucket gives a token."""
    while (wait := await driver.engine.bucket.take(driver.member_id, driver.plan,
                                                   realtime=realtime)) > 0:
        await asyncio.sleep(wait)


async def _exchange(driver: Driver, wire: dict[str, Any], realtime: bool) -> Any:
    """Send the batch; refresh or follow a rename and send again (each with a token)."""
    eng = driver.engine
    for _ in range(MAX_RESENDS + 1):
        snap = await _usable(driver)
        if snap.held:
            return outcomes.PortalHeld(f"portal {snap.member_id} is {snap.status}")
        try:
            async with asyncio.timeout(eng.settings.request_timeout + 1):
                return await eng.client.batch(snap.client_endpoint, wire,
                                              snap.access_token or "")
        except TimeoutError as exc:
            return exc
        except errors.PortalMoved as exc:
            driver.snap = await eng.credentials.moved(snap, exc.new_client_endpoint)
        except errors.BitrixError as exc:
            if outcomes.verdict_of(exc) is not Verdict.REFRESH:
                return exc
            metrics.refreshed(driver.plan)
            driver.snap = await eng.credentials.refreshed(snap)
        await _token(driver, realtime)
    return errors.TransportError("gave up after repeated refreshes and renames")


async def _usable(driver: Driver) -> Snapshot:
    """The driver's snapshot, refreshed first if its token has expired."""
    snap = driver.snap
    assert snap is not None
    if not snap.held and snap.expires_at is not None and snap.expires_at <= utcnow():
        metrics.refreshed(driver.plan)
        driver.snap = snap = await driver.engine.credentials.refreshed(snap)
    return snap


async def _settle(driver: Driver, commands: list[Candidate], answer: Any,
                  elapsed: float | None = None, token: str = "") -> None:
    """Judge the answer, write the commands' rows, then apply the effects."""
    eng, now = driver.engine, utcnow()
    rows, effects = outcomes.decide(commands, answer, now,
                                    outcomes.Rules(eng.settings.horizon, eng.settings.resend))
    await eng.recorder.write(rows)
    metrics.settled(driver.plan, commands, rows, now)
    await eng.stats.batch(driver.portal_id, elapsed, rows, limited=effects.fill_bucket,
                          methods={c.method for c in commands})
    await _apply(driver, effects, token)


async def _apply(driver: Driver, effects: outcomes.Effects, token: str = "") -> None:
    """Do what the answer asks of the bucket, the ledger, the credentials and the portal."""
    eng, key = driver.engine, driver.member_id
    if effects.fill_bucket:
        metrics.rate_limited(driver.plan)
        await eng.bucket.fill(key, driver.snap.plan if driver.snap else "standard")
    if token:  # what it cost in place of what it reserved
        await eng.ledger.settle(key, token, effects.sent,
                                None if effects.unmeasured else effects.processing,
                                effects.costed)
    elif effects.processing:
        await eng.ledger.add_batch(key, effects.processing, effects.costed)
    for method, until in effects.operating.items():
        await eng.ledger.hold(key, method, until)
    if effects.refresh and driver.snap is not None:
        metrics.refreshed(driver.plan)
        driver.snap = await eng.credentials.refreshed(driver.snap)
    if effects.hold is not None:
        await _hold(driver, effects.hold)
    if effects.settle:
        await eng.run_db(notify, eng.app, effects.settle)


async def _hold(driver: Driver, error: BaseException) -> None:
    """Let the portal status machine judge; stop driving (the sweep resumes the portal)."""
    eng = driver.engine
    if isinstance(error, errors.ApiError):
        await eng.run_db(apply_status, eng.app, driver.portal_id, error)
    driver.snap = await eng.credentials.aload(driver.portal_id)
    driver.held = True
    log.warning("portal %s: holding its commands (%s)", driver.portal_id, error)
    driver.poke()


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


def apply_status(app: Flask, portal_id: int, error: errors.ApiError) -> None:
    """Move the portal through the status machine (in a worker thread, own app context)."""
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
