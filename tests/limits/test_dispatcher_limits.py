"""A portal's own dispatcher limits in a real dispatcher run against the sandbox: a portal set
to sequential mode never has two batches in flight while another on automatic has many, and
a settings save reaches a running engine (and a driver in the middle of a backlog) within
seconds. The sandbox's request log shows each batch's time on the wire."""

from __future__ import annotations

import time
from typing import Any

import pytest

from app.dispatcher import submit
from app.extensions import db
from app.installation import settings_form
from tests.conftest import wait_for
from tests.dispatcher.conftest import settled, start_engine  # noqa: F401 - fixture
from tests.limits.conftest import overlap
from tests.tenants.conftest import make_portal, oauth_app  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(180)
BATCH = 50


def _backlog(portal: Any, batches: int, tag: str) -> int:
    """``batches`` full batches of independent commands (each its own key); committed."""
    count = batches * BATCH
    for n in range(count):
        submit(portal.id, "telephony.externalcall.register",
               {"USER_ID": 1, "PHONE_NUMBER": f"+4930{n:07d}", "TYPE": 2,
                "EXTERNAL_CALL_ID": f"{tag}-{n}", "SHOW": 0}, key=f"{tag}-{n}")
    db.session.commit()
    return count


def _save(portal: Any, **values: str) -> None:
    """Save settings as the page and the CLI do: apply, commit, then announce."""
    applied = settings_form.apply(portal, values)
    db.session.commit()
    settings_form.after_commit(portal, applied)


def _entries(sandbox: Any, info: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return [e for e in sandbox.log(info["member_id"])
            if str(e["params"].get("EXTERNAL_CALL_ID", "")).startswith(f"{tag}-")]


def test_a_sequential_portal_never_has_two_batches_in_flight_while_an_automatic_one_does(
        make_portal, sandbox, start_engine):  # noqa: F811 - the imported fixtures
    slow, _ = make_portal()
    fast, _ = make_portal()
    _save(slow, sequential="1")
    for portal in (slow, fast):
        sandbox.set_latency(portal.member_id, 400)
    start_engine()
    total = _backlog(slow, 6, "s") + _backlog(fast, 6, "f")
    started = time.monotonic()
    assert all(r.status == "done" for r in settled(slow.id, total // 2, timeout=60))
    assert all(r.status == "done" for r in settled(fast.id, total // 2, timeout=60))
    wall = time.monotonic() - started
    slow_log = _entries(sandbox, {"member_id": slow.member_id}, "s")
    fast_log = _entries(sandbox, {"member_id": fast.member_id}, "f")
    assert len(slow_log) == len(fast_log) == 300
    assert overlap(slow_log) == 1, "the sequential portal had two batches in flight"
    assert overlap(fast_log) >= 3, "the automatic portal sent its batches one by one"
    assert wall >= 6 * 0.4 - 0.1  # six round trips, one after the other


def test_a_settings_change_reaches_a_running_engine_within_seconds(
        make_portal, sandbox, start_engine):  # noqa: F811 - the imported fixtures
    portal, info = make_portal()
    _save(portal, sequential="1")
    sandbox.set_latency(portal.member_id, 500)
    start_engine()

    # A backlog of 16 batches, sequential: 8 s. Two batches in, the admin switches to
    # automatic: the driver, mid-backlog, sends the rest together.
    _backlog(portal, 16, "a")
    wait_for(lambda: len(_entries(sandbox, info, "a")) >= 2 * BATCH, timeout=20)
    switched = time.time()
    _save(portal, sequential="0")
    assert all(r.status == "done" for r in settled(portal.id, 16 * BATCH, timeout=30))
    before = [e for e in _entries(sandbox, info, "a") if e["finish"] < switched]
    after = [e for e in _entries(sandbox, info, "a") if e["start"] > switched]
    assert overlap(before) == 1
    assert after and overlap(after) >= 3, "the new limit did not reach the running driver"
    assert max(e["finish"] for e in _entries(sandbox, info, "a")) - switched < 4.0

    # Back to sequential, and a number of batches in flight set while sequential wins.
    _save(portal, sequential="1", max_batches_in_flight="10")
    time.sleep(0.3)
    _backlog(portal, 5, "b")
    assert all(r.status == "done" for r in settled(portal.id, 21 * BATCH, timeout=30))
    assert overlap(_entries(sandbox, info, "b")) == 1

    # Sequential off: the portal's own K (3, one of them kept for real-time work) caps it,
    # far below the automatic 60.
    _save(portal, sequential="", max_batches_in_flight="3")
    time.sleep(0.3)
    _backlog(portal, 9, "c")
    assert all(r.status == "done" for r in settled(portal.id, 30 * BATCH, timeout=30))
    assert 2 <= overlap(_entries(sandbox, info, "c")) <= 3
