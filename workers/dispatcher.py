"""The dispatcher in the workers: an engine per worker process, the one actor that settles
outcomes, the periodic sweep, the outbox's retention, and the probe that resumes a portal
once its REST block is lifted."""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware
from flask import Flask

from app.dispatcher import results, retention, sweep
from app.extensions import db
from app.installation import blocked, lapsed
from app.tenants.models import Portal
from workers.scheduler import periodic

log = logging.getLogger(__name__)


class DispatcherMiddleware(Middleware):
    """Runs a dispatcher engine in each worker process (unless ``DISPATCH_ENABLED`` is off)."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.engine: Any = None

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        # Before the worker threads start: a message handled at once (an event that submits
        # commands) must find the engine listening, or its nudge waits for the next sweep.
        if not self.app.config["DISPATCH_ENABLED"]:
            return
        from app.dispatcher.engine import Engine

        self.engine = Engine(self.app).start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self.engine is not None:
            self.engine.stop(timeout=float(self.app.config["DISPATCH_REQUEST_TIMEOUT"]))


# Per-message retries cover a database hiccup and a handler's NotYet; the outcome stays on
# its row until settled, and the sweep sends a settle again if these run out.
@dramatiq.actor(actor_name=results.SETTLE_ACTOR, queue_name="default", max_retries=20,
                min_backoff=500, max_backoff=60_000)
def settle_outcomes(command_ids: list[int]) -> None:
    """Hand each finished command's outcome to its handler (each settled in its own commit)."""
    failed: BaseException | None = None
    for command_id in command_ids:
        try:
            results.settle(command_id)
        except results.NotYet as exc:
            failed = failed or dramatiq.Retry(str(exc), delay=2_000)
        except Exception as exc:  # the others still settle; this message is retried
            log.warning("command %s: its outcome handler failed: %r", command_id, exc)
            failed = exc
    if failed is not None:
        raise failed


@periodic("DISPATCH_SWEEP_INTERVAL")
@dramatiq.actor(queue_name="default", max_retries=0)
def sweep_outbox() -> None:
    """Recover expired leases, nudge portals with due commands, resend missed settles."""
    sweep.sweep()


@periodic("OUTBOX_PRUNE_INTERVAL")
@dramatiq.actor(queue_name="default", max_retries=0)
def prune_outbox() -> None:
    """Delete done and dead commands past their retention (app/dispatcher/retention.py)."""
    retention.prune(retention.Retention.from_config())


@periodic(60)
@dramatiq.actor(queue_name="default", max_retries=0)
def probe_blocked_portals() -> None:
    """Queue a probe for each blocked portal whose last probe is OVERLOAD_PROBE_MINUTES old."""
    for portal_id in blocked.due_for_probe():
        probe_blocked_portal.send(portal_id)


@dramatiq.actor(queue_name="default", max_retries=0)
def probe_blocked_portal(portal_id: int) -> None:
    """One app.info to a blocked portal; it resumes when the portal answers."""
    portal = db.session.get(Portal, portal_id)
    if portal is not None:
        blocked.probe(portal)


@periodic("UNINSTALL_RECHECK_INTERVAL")
@dramatiq.actor(queue_name="default", max_retries=0)
def recheck_lapsed_uninstalls() -> None:
    """Ask again about each held portal's unconfirmed uninstall that is due (its backoff over)."""
    for portal_id in lapsed.due():
        try:
            lapsed.recheck(portal_id)
        except Exception as exc:  # noqa: BLE001 - the others are still asked; this one next time
            db.session.rollback()
            log.warning("portal %s: uninstall recheck failed: %r", portal_id, exc)
