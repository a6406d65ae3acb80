"""Stored rows go to the broker off the request path, several to a message.

An event is acknowledged once the commit that holds it returns; handing its row to the
broker is not part of that promise (a row the broker never got is queued again by the
sweeper). So intake puts the row's id on a per-process queue and answers, and one thread
per process sends whatever has gathered meanwhile (waiting ``LINGER_SECONDS`` for it) as
one message (``inbox.enqueue`` with ``together``: a worker splits it into one message per
row). Under load that is one broker round trip for many events, and none on any request's
way; an idle process's thread ends and the next event starts another.

The cost: a process killed between an answer and the send leaves those rows ``queued``
until the sweeper's ``INBOX_REQUEUE_AFTER`` (120 s); none is lost. gunicorn's worker exit
hook drains the queue first (:func:`drain`), so a graceful restart leaves none.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from flask import Flask, current_app

from app.ingress import inbox

log = logging.getLogger(__name__)

IDLE_SECONDS = 5.0  # a thread with nothing to send for this long ends
MAX_PER_MESSAGE = 500
# Woken by an id, the thread waits this long for its neighbours before sending. Without
# it, a thread woken per row sent about 2 rows a message under a closed loop of 32
# connections, and 1 at 500 events/s; with 5 ms, about 8 under that loop, and at most
# 200 wake-ups a second whatever the rate (bench/ingest, issue #13). A row reaches the
# broker up to 5 ms later; its answer is not delayed.
LINGER_SECONDS = 0.005


class Enqueuer:
    """One app's queue of stored row ids, and the thread that sends them."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.ids: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.pending = 0  # ids put and not sent yet

    def put(self, row_id: int) -> None:
        """Queue a committed row; it is sent within moments."""
        self.ids.put(row_id)
        with self.lock:  # after the put: a thread that found nothing pending has ended
            self.pending += 1
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="inbox-enqueuer",
                                               daemon=True)
                self.thread.start()

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            try:
                with self.app.app_context():
                    inbox.enqueue(batch, "b24", together=True)
            except Exception:  # a bug must not stop the thread; the sweeper has the rows
                log.exception("could not queue %d inbox rows; the sweeper will", len(batch))
            finally:
                with self.lock:
                    self.pending -= len(batch)

    def _next_batch(self) -> list[int] | None:
        """What has gathered (waiting for the first id); None once idle: the thread ends."""
        try:
            batch = [self.ids.get(timeout=IDLE_SECONDS)]
        except queue.Empty:
            with self.lock:
                if self.pending == 0:
                    self.thread = None
                    return None
            return []
        time.sleep(LINGER_SECONDS)
        while len(batch) < MAX_PER_MESSAGE:
            try:
                batch.append(self.ids.get_nowait())
            except queue.Empty:
                break
        return batch

    def drain(self, timeout: float) -> bool:
        """Wait until every queued id was sent (or ``timeout``); True when none is left."""
        deadline = time.monotonic() + timeout
        while self.pending:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True


def put(row_id: int) -> None:
    """Queue a committed row of the current app for the broker (see the module docstring)."""
    ext = current_app.extensions
    found = ext.get("ingress_enqueuer")
    if found is None:
        found = ext.setdefault("ingress_enqueuer", Enqueuer(current_app._get_current_object()))  # type: ignore[attr-defined]
    found.put(row_id)


def drain(app: Any, timeout: float = 5.0) -> bool:
    """Send what ``app`` still holds (a worker about to exit; tests reading the queue)."""
    found = app.extensions.get("ingress_enqueuer")
    return found is None or found.drain(timeout)
