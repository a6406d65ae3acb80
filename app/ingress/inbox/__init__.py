"""The inbox: every accepted event, stored once, until a worker has handled it.

Four parts, one module each: storing (``storing``: the one INSERT), handing rows to the
broker (``enqueueing``), queueing again what got stuck (``sweeping``), and what operators
see and do (``admin``: depth, dead letters, replay, discard, a key's rows). Handling a row is
app/ingress/processing.py; the order of a key's rows is app/ingress/ordering.py.

The names below are the inbox's interface, so callers write ``inbox.store(...)`` without
knowing which part holds what.
"""

from app.ingress.inbox.admin import (
    DeadLetter,
    KeyedEvent,
    dead_ids,
    dead_kinds,
    dead_letters,
    dead_payloads,
    depth,
    discard_dead,
    events_for_key,
    replay_dead,
)
from app.ingress.inbox.enqueueing import (
    ACTOR,
    ACTOR_GROUP,
    ENQUEUE_TIMEOUT_SECONDS,
    QUEUE,
    enqueue,
    fast_redis,
    init_app,
    mark_received,
)
from app.ingress.inbox.storing import (
    HANDLER_KEY_IN_KEY,
    NewEvent,
    Stored,
    b24_dedupe_key,
    digest,
    store,
    store_verified,
)
from app.ingress.inbox.sweeping import SweepPolicy, requeue_stuck, stuck_rows

__all__ = [
    "ACTOR", "ACTOR_GROUP", "ENQUEUE_TIMEOUT_SECONDS", "QUEUE",
    "DeadLetter", "HANDLER_KEY_IN_KEY", "KeyedEvent", "NewEvent", "Stored", "SweepPolicy",
    "b24_dedupe_key", "dead_ids", "dead_kinds", "dead_letters", "dead_payloads", "discard_dead",
    "events_for_key",
    "depth", "digest", "enqueue", "fast_redis", "init_app", "mark_received", "replay_dead",
    "requeue_stuck", "store", "store_verified", "stuck_rows",
]
