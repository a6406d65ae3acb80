"""Outcomes end to end: a real worker (its engine and its one settle actor) and sandbox
portals. Done, dead and unknown-outcome commands each reach the submitter's handler once,
with the context it attached; a command without a handler settles nobody."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from app import queue
from app.dispatcher import nudge, submit
from app.dispatcher.results import SETTLE_ACTOR
from app.extensions import db
from tests.conftest import wait_for
from tests.dispatcher.conftest import rows
from tests.dispatcher.outcome_handlers import RECORDED, TAG

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def worker(start_worker: Any, redis_client: Any) -> Any:
    """A real worker with the test's outcome handler, listening for nudges."""
    redis_client.delete(RECORDED)
    started = start_worker(threads=2, periodic=True, DISPATCH_SWEEP_INTERVAL="1",
                           DISPATCH_LINGER_MS="0",
                           modules=("workers", "tests.dispatcher.outcome_handlers"))
    channel = nudge.channel(redis_client)
    wait_for(lambda: redis_client.pubsub_numsub(channel)[0][1] >= 1, timeout=30)
    return started


def _recorded(redis_client: Any, at_least: int = 0) -> dict[int, dict[str, Any]] | None:
    found = [json.loads(o) for o in redis_client.lrange(RECORDED, 0, -1)]
    return {o["command_id"]: o for o in found} if len(found) >= at_least else None


def test_done_dead_and_unknown_reach_the_handler_with_their_context(
        make_portal, sandbox, worker, redis_client):
    portal, _ = make_portal()
    shaky, shaky_info = make_portal()
    sandbox.set_fault(shaky_info["member_id"], "executed_504", count=1)
    done = submit(portal.id, "crm.deal.add", {"fields": {"TITLE": "kept"}}, handler=TAG,
                  context={"call": "pbx-1", "step": "register"})
    dead = submit(portal.id, "crm.deal.get", {"id": 987654}, handler=TAG,
                  context={"call": "pbx-2"})
    quiet = submit(portal.id, "user.current", {})
    unknown = submit(shaky.id, "crm.deal.add", {"fields": {"TITLE": "maybe"}}, handler=TAG,
                     context={"call": "pbx-3", "nested": {"a": [1, 2]}})
    db.session.commit()

    got = wait_for(lambda: _recorded(redis_client, 3), timeout=60)
    assert set(got) == {done, dead, unknown}, "one outcome each; none for the command without"
    assert (got[done]["kind"], got[done]["context"]) == ("done",
                                                         {"call": "pbx-1", "step": "register"})
    assert isinstance(got[done]["result"], int) and got[done]["portal_id"] == portal.id
    assert (got[dead]["kind"], got[dead]["context"]) == ("dead", {"call": "pbx-2"})
    assert got[dead]["error"] == {"error": "NOT_FOUND", "error_description": "Not found"}
    assert got[dead]["reason"] == "NOT_FOUND: Not found"
    assert (got[unknown]["kind"], got[unknown]["context"]) == (
        "unknown", {"call": "pbx-3", "nested": {"a": [1, 2]}})
    assert got[unknown]["reason"].startswith("unknown outcome")
    assert got[unknown]["result"] is None and got[unknown]["portal_id"] == shaky.id
    settled = {r.id: r.settled for r in rows()}
    assert settled == {done: True, dead: True, quiet: True, unknown: True}

    queue.enqueue(SETTLE_ACTOR, [done, dead, unknown])  # sent again: no handler runs again
    time.sleep(2)
    assert redis_client.llen(RECORDED) == 3
