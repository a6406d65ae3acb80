"""A killed worker's claimed row is taken over within a minute: claims have a heartbeat.

The worker that claimed a row renews the claim while its handler runs; the sweeper
queues again a claim whose renewals stopped (app/ingress/heartbeat.py). Before, a
claimed row waited out a fixed 10 minutes after its worker died.
"""

from __future__ import annotations

import signal
import time

from app.config import worker_settings
from tests.conftest import wait_for
from tests.ingress.conftest import inbox_rows

HEARTBEAT = {"INBOX_HEARTBEAT_INTERVAL": "1", "INBOX_HEARTBEAT_TIMEOUT": "5"}


def _row() -> tuple[str, int]:
    [row] = inbox_rows()
    return row.status, row.attempts


def test_a_killed_workers_claim_is_taken_over_by_another_worker_within_a_minute(
        app, portal, deliver, effects, start_handler_worker):
    holder = start_handler_worker(threads=1, **HEARTBEAT)
    row_id = deliver.b24(portal, event="TESTHANGFIRST").json["id"]
    wait_for(lambda: _row() == ("processing", 1), timeout=30)
    other = start_handler_worker(threads=2, periodic=True, INBOX_SWEEP_INTERVAL="1",
                                 **HEARTBEAT)

    # Alive, the holder keeps its claim well past the timeout: nobody takes it over.
    time.sleep(3 * float(HEARTBEAT["INBOX_HEARTBEAT_TIMEOUT"]))
    assert _row() == ("processing", 1) and effects() == {}

    holder.stop(signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: effects() == {row_id: 1}, timeout=60)
    taken_over_after = time.monotonic() - killed
    assert _row() == ("done", 2)
    assert taken_over_after < 60
    print(f"\ntaken over {taken_over_after:.1f} s after the SIGKILL")
    assert "Traceback" not in other.output()


def test_by_default_a_dead_workers_claim_is_taken_over_within_a_minute():
    settings = worker_settings()
    assert settings["INBOX_HEARTBEAT_TIMEOUT"] + settings["INBOX_SWEEP_INTERVAL"] <= 60
    # A live claim is renewed at least twice within the timeout: one missed renewal is not death.
    assert settings["INBOX_HEARTBEAT_INTERVAL"] * 2 < settings["INBOX_HEARTBEAT_TIMEOUT"]
