"""An outcome handler loaded into real worker processes by the dispatcher tests
(``dramatiq workers tests.dispatcher.outcome_handlers``).

It records every outcome it receives in a Redis list, so a test sees what reached the
submitter's handler, in which process, and how often.
"""

from __future__ import annotations

import json
import os

from app.dispatcher import Outcome, outcome_handler
from app.extensions import redis_ext

TAG = "tests.record"
RECORDED = "b24relay:test:outcomes"


@outcome_handler(TAG)
def record(outcome: Outcome) -> None:
    """Append the outcome (as JSON) to the ``RECORDED`` list."""
    redis_ext.client.rpush(RECORDED, json.dumps({
        "command_id": outcome.command_id, "portal_id": outcome.portal_id,
        "method": outcome.method, "kind": outcome.kind.value, "result": outcome.result,
        "error": outcome.error, "reason": outcome.reason, "context": dict(outcome.context),
        "pid": os.getpid()}))
