"""Dead letters and call lookup in Chromium, inside the sandbox portal's frame page.

The app's page opens as the portal opens it (the sandbox's frame page POSTs the DEFAULT
placement into its iframe); the tests follow the section links from there. A real worker
(inbox actors, the dispatcher's engine) and the sandbox portal do the rest:

- one inbox dead letter (a PBX start) and one outbox dead letter (``user.current``) are
  retried from the page: the start is handled and its register reaches the portal, and the
  command is sent; the portal's command log shows both. Values an attacker controls are on
  the page as text, and no script of theirs runs (no dialog);
- a small day of calls from bench/pbx_day_gen.py, posted by bench/pbx_day_stack.py's replay
  (as ``bench.pbx_day`` posts a day, with its times moved onto the wall clock), is found by
  the call lookup, and one call's story shows its PBX events and the commands sent.

Screenshots go to tests/artifacts/ (not committed).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from app.dispatcher import nudge
from app.extensions import db
from app.ingress import auth
from app.ingress.models import InboxEvent
from app.telephony.models import Call
from bench import pbx_day_gen, pbx_day_stack
from tests import browser
from tests.conftest import wait_for
from tests.ingress.conftest import add_inbox_row
from tests.install.conftest import portal_row
from tests.placements_calls.conftest import dead_command

chromium, page = browser.chromium, browser.page
pytestmark = pytest.mark.timeout(300)

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
REGISTER = "telephony.externalcall.register"
SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'


@pytest.fixture
def worker(start_worker, live_app, redis_client):
    """A real worker (inbox actors, the dispatcher's engine listening for nudges)."""
    started = start_worker(threads=4, **live_app.worker_env())
    wait_for(lambda: redis_client.pubsub_numsub(nudge.channel(redis_client))[0][1] >= 1,
             timeout=60)
    return started


@pytest.fixture
def line(installed):
    """The installed portal with a fallback user (the day's extensions are not its users')."""
    portal = portal_row(installed["member_id"])
    portal.settings.default_user_id = 1
    portal.settings.crm_create = False
    db.session.commit()
    return portal


def open_section(page, sandbox, member_id: str, section: str):
    """The portal's page, then the app's section link in its frame; the frame."""
    page.goto(sandbox.frame_url(member_id))
    frame = wait_for(lambda: page.frame(name="app"), timeout=20)
    frame.wait_for_selector(f'a[data-section="{section}"]', timeout=20000)
    frame.click(f'a[data-section="{section}"]')
    frame.wait_for_selector(f'a[data-section="{section}"][aria-current="page"]', timeout=20000)
    return frame


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def inbox_status(row_id: int) -> str | None:
    db.session.expire_all()
    row = db.session.get(InboxEvent, row_id)
    return row.status if row is not None else None


def test_dead_letters_are_retried_from_the_page_and_reach_the_portal(
        sandbox, installed, line, live_app, worker, page):
    member = installed["member_id"]
    start = {"call_id": "dead-start-1", "event": "start",
             "at": datetime.now(UTC).isoformat(timespec="seconds"), "direction": "in",
             "phone": "+74951234567", "extensions": ["101"], "caller_name": IMG}
    event = add_inbox_row("dead", line, source="pbx", event_type="start", payload=start,
                          order_key="dead-start-1", attempts=5, last_error=SCRIPT)
    command = dead_command(line, "user.current", reason=f"ERROR_CORE: {IMG}")
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

    frame = open_section(page, sandbox, member, "dead.dead_letters")
    row = frame.wait_for_selector(f'#dead-events tr[data-id="{event}"]')
    assert SCRIPT in row.inner_text()  # shown as text
    assert IMG in frame.inner_text(f'#dead-commands tr[data-id="{command}"]')
    shot(page, "dead-letters")
    frame.click(f'#dead-events tr[data-id="{event}"] button[data-action="retry"]')
    frame.wait_for_selector("#notice", timeout=20000)
    frame.click(f'#dead-commands tr[data-id="{command}"] button[data-action="retry"]')
    frame.wait_for_selector("#notice", timeout=20000)
    shot(page, "dead-letters-retried")

    wait_for(lambda: inbox_status(event) == "done", timeout=60)
    registers = wait_for(lambda: [e for e in sandbox.log(member, method=REGISTER)
                                  if e["params"].get("PHONE_NUMBER") == "+74951234567"],
                         timeout=60)
    assert len(registers) == 1
    assert wait_for(lambda: sandbox.log(member, method="user.current"), timeout=60)
    assert dialogs == []
    assert "Retry" in frame.inner_text("body") or "No event" in frame.inner_text("body")


def test_the_call_lookup_shows_a_call_of_a_pbx_day_run(sandbox, installed, line, live_app,
                                                        worker, page):
    member = installed["member_id"]
    key = auth.issue_api_key(line)
    db.session.commit()
    recordings, recordings_url = pbx_day_stack.recordings_server()
    try:
        day = pbx_day_gen.generate(calls=4, seed=24, extensions=4, out_of_order=0.0,
                                   recordings_url=recordings_url)
        plan = pbx_day_stack.schedule(day, pbx_day_gen.all_events(day), minutes=0.05,
                                      t0=time.time(), wall_at=True)
        # In a thread of its own: Playwright's sync API holds this thread's event loop.
        with ThreadPoolExecutor(1) as pool:
            replayed = pool.submit(asyncio.run, pbx_day_stack.replay(
                live_app.url, key, plan, tick=0.05, progress=lambda *a: None)).result()
        assert replayed.failed == [] and len(replayed.accepted) == 4
        wanted = day.calls[0]
        call = wait_for(lambda: _finished(line.id, wanted.call_id), timeout=120)
    finally:
        recordings.shutdown()
        recordings.server_close()

    frame = open_section(page, sandbox, member, "calls.lookup")
    frame.fill("#q", wanted.phone)
    frame.click("#call-search button[type=submit]")
    frame.wait_for_selector(f'#calls-found tr[data-id="{call.id}"]', timeout=20000)
    shot(page, "call-lookup")
    frame.click(f'#calls-found tr[data-id="{call.id}"] a')
    frame.wait_for_selector("#call-events", timeout=20000)
    assert frame.inner_text("#call-pbx-id") == wanted.call_id
    assert frame.inner_text("#call-b24-id") == call.b24_call_id
    events = frame.eval_on_selector_all("#call-events tr[data-event]",
                                        "rows => rows.map(r => r.dataset.event)")
    assert events[0] == "start" and "end" in events
    methods = frame.eval_on_selector_all("#call-commands tr[data-method]",
                                         "rows => rows.map(r => r.dataset.method)")
    assert methods[0] == REGISTER and "telephony.externalcall.finish" in methods
    shot(page, "call-story")


def _finished(portal_id: int, pbx_call_id: str) -> Call | None:
    db.session.expire_all()
    call = db.session.scalars(select(Call).where(Call.portal_id == portal_id,
                                                 Call.pbx_call_id == pbx_call_id)).first()
    return call if call is not None and call.finish_outcome == "done" else None
