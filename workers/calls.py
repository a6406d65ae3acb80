"""Telephony's periodic sweep (app/telephony/sweeper.py): calls whose end never came are
finished, events whose start never came are parked."""

from __future__ import annotations

import dramatiq

from app.telephony import sweeper
from workers.scheduler import periodic


@periodic("TELEPHONY_SWEEP_INTERVAL")
@dramatiq.actor(queue_name="default", max_retries=0)
def sweep_calls() -> None:
    """Park calls that waited too long for their start; finish those whose end is late."""
    sweeper.sweep()
