"""Telephony actors: a call's recording downloaded from the PBX and attached
(app/telephony/recording.py), and the sweep that re-queues lost recording jobs."""

from __future__ import annotations

import logging

import dramatiq

from app.telephony import recording
from workers.scheduler import periodic

log = logging.getLogger(__name__)


@dramatiq.actor(actor_name=recording.ACTOR, queue_name=recording.QUEUE, max_retries=0)
def telephony_attach_record(call_id: int) -> None:
    """Download one call's recording and attach it; its retries are counted on the call."""
    recording.run(int(call_id))


@periodic("TELEPHONY_RECORD_SWEEP_INTERVAL")
@dramatiq.actor(queue_name="default", max_retries=0)
def telephony_record_sweep() -> None:
    """Queue again recording jobs whose message was lost or whose worker stopped."""
    sent = recording.sweep()
    if sent:
        log.info("recordings: %d job(s) queued again", sent)
