"""Click-to-call actors: one try of an originate (tried again with backoff while the click
is useful) and the sweep of clicks the PBX never reported (app/telephony/click.py)."""

from __future__ import annotations

import dramatiq

from app import queue
from app.telephony import click
from workers.scheduler import periodic


@dramatiq.actor(actor_name=click.ACTOR, queue_name=click.QUEUE, max_retries=0)
def telephony_originate(originate_id: int) -> None:
    """Try the originate once; schedule the next try while the click is useful."""
    wait = click.attempt(originate_id)
    if wait is not None:
        queue.enqueue(click.ACTOR, originate_id, queue_name=click.QUEUE,
                      delay_ms=int(wait * 1000))


@periodic("TELEPHONY_ORIGINATE_SWEEP_INTERVAL")
@dramatiq.actor(queue_name="default", max_retries=0)
def sweep_originates() -> None:
    """Finish the clicks the PBX took but never reported."""
    click.sweep()
