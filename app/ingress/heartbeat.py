"""A worker's sign of life for the inbox rows it holds, so a dead worker's are taken over soon.

A claimed row is ``processing``, and its ``claimed_at`` is the claim's last sign of life.
While a handler runs, the process that claimed the row renews that time every
``INBOX_HEARTBEAT_INTERVAL`` (10 s) from a daemon thread of its own (:func:`holding`);
the sweeper takes a ``processing`` row not renewed for ``INBOX_HEARTBEAT_TIMEOUT`` (30 s)
as abandoned and queues it again. A worker killed (SIGKILL, out of memory, a lost host)
therefore gives its rows up within the timeout plus one sweep (``INBOX_SWEEP_INTERVAL``,
15 s), not after a fixed wait for the longest handler.

A handler still running after ``INBOX_PROCESSING_TIMEOUT`` (600 s) is renewed no more: a
hung handler gives its row up as before, and its late result is discarded (the claim is
no longer its own: app/ingress/processing.py checks the attempt number when it finishes).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, current_app
from sqlalchemy import tuple_, update
from sqlalchemy.exc import SQLAlchemyError

from app.extensions import db
from app.ingress.models import InboxEvent, InboxStatus
from app.tenants.models import utcnow

log = logging.getLogger(__name__)


class Heartbeat:
    """The claims one worker process holds for one app, and the thread that renews them."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.interval = float(app.config["INBOX_HEARTBEAT_INTERVAL"])
        self.longest = float(app.config["INBOX_PROCESSING_TIMEOUT"])
        self.lock = threading.Lock()
        self.held: dict[tuple[int, int], float] = {}  # (row id, attempt) -> claimed (monotonic)
        self.thread: threading.Thread | None = None
        self.pid = os.getpid()

    def hold(self, row_id: int, attempt: int) -> None:
        """Renew this claim from now on (the thread starts with the first claim held)."""
        with self.lock:
            self.held[(row_id, attempt)] = time.monotonic()
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="inbox-heartbeat",
                                               daemon=True)
                self.thread.start()

    def drop(self, row_id: int, attempt: int) -> None:
        """The claim is finished (or given back): renew it no more."""
        with self.lock:
            self.held.pop((row_id, attempt), None)

    def _due(self) -> list[tuple[int, int]] | None:
        """The claims to renew now; None (and the thread ends) when none is held."""
        with self.lock:
            if not self.held:
                self.thread = None
                return None
            now = time.monotonic()
            return [claim for claim, since in self.held.items() if now - since < self.longest]

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            claims = self._due()
            if claims is None:
                return
            if claims:
                self._renew(claims)

    def _renew(self, claims: list[tuple[int, int]]) -> None:
        """One UPDATE for every claim still ours (same attempt, still processing)."""
        try:
            with self.app.app_context(), db.engine.begin() as conn:
                conn.execute(update(InboxEvent)
                             .where(tuple_(InboxEvent.id, InboxEvent.attempts).in_(claims),
                                    InboxEvent.status == InboxStatus.PROCESSING.value)
                             .values(claimed_at=utcnow()))
        except SQLAlchemyError as exc:  # tried again next interval; the timeout allows a few
            log.warning("inbox claims not renewed (%d held): %s", len(claims),
                        str(exc).partition("\n")[0])


def _heartbeat() -> Heartbeat:
    """This process's heartbeat for the current app (a fresh one after a fork)."""
    ext = current_app.extensions
    beat = ext.get("inbox_heartbeat")
    if beat is None or beat.pid != os.getpid():
        beat = ext["inbox_heartbeat"] = Heartbeat(current_app._get_current_object())  # type: ignore[attr-defined]
    return beat


@contextmanager
def holding(row_id: int, attempt: int) -> Iterator[None]:
    """Keep the claim on ``row_id`` (under ``attempt``) alive while the block runs."""
    beat = _heartbeat()
    beat.hold(row_id, attempt)
    try:
        yield
    finally:
        beat.drop(row_id, attempt)
