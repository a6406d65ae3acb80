"""Click-to-call and callback actors: one try of an originate (tried again with backoff
while the click or callback is useful), the sweep of originates the PBX never reported
(app/telephony/click.py), and a web-form callback's choice of employee and register
(app/telephony/callback.py)."""

from __future__ import annotations

import dramatiq

from app import queue
from app.telephony import callback, click
from workers.scheduler import periodic


@dramatiq.actor(actor_name=click.ACTOR, queue_name=click.QUEUE, max_retries=0)
def telephony_originate(originate_id: int) -> None:
    """Try the originate once; schedule the next try while the click is useful."""
    wait = click.attempt(originate_id)
    if wait is not None:
        queue.enqueue(click.ACTOR, originate_id, queue_name=click.QUEUE,
                      delay_ms=int(wait * 1000))


@dramatiq.actor(actor_name=callback.ACTOR, queue_name=click.QUEUE, max_retries=0)
def telephony_callback(originate_id: int) -> None:
    """Choose a callback's employee and register its call (the originate follows)."""
    callback.choose(originate_id)


@periodic("TELEPHONY_ORIGINATE_SWEEP_INTERVAL")
@dramatiq.actor(queue_name="default", max_retries=0)
def sweep_originates() -> None:
    """Finish the clicks and callbacks the PBX took but never reported; queue the choice
    again for callbacks whose message was lost."""
    click.sweep()
    callback.sweep()
