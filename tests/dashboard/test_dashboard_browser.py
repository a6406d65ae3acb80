"""The live dashboard in Chromium, inside the sandbox portal's frame page, opened from the
TELEPHONY_ANALYTICS_MENU widget: charts drawn from a real dispatcher run, numbers that
update without a reload, and an attacker's text shown as text."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.dispatcher import submit
from app.extensions import db
from app.tenants.models import Portal
from tests import browser
from tests.conftest import ROOT
from tests.dispatcher.conftest import call_commands, settled
from tests.install.conftest import installed, live_app, make_portal  # noqa: F401 - fixtures

chromium, page = browser.chromium, browser.page
ARTIFACTS = ROOT / "tests" / "artifacts"
EVIL = 'crm.<img src=x onerror="window.__xss=1">'


@pytest.fixture
def form_kind() -> str:
    """One iframe form is enough here (tests/install covers both)."""
    return "full"


@pytest.fixture
def engine(live_app):  # noqa: F811 - the imported fixture
    """A dispatcher engine in this process, on the live app's settings."""
    from app.dispatcher.engine import Engine

    live_app.app.config["DISPATCH_LINGER_MS"] = 0
    started = Engine(live_app.app).start()
    yield started
    started.stop(timeout=5)


def _portal(member_id: str) -> Portal:
    db.session.remove()
    found = Portal.by_member_id(member_id)
    assert found is not None
    return found


def _dashboard_frame(page, timeout: float = 15.0):
    """The portal page's app frame once it shows the dashboard (the widget's POST)."""
    for _ in range(int(timeout * 10)):
        frame = page.frame(name="app")
        if frame is not None and "/placements/dashboard?" in frame.url:
            return frame
        page.wait_for_timeout(100)  # lets Playwright hear the frame's navigation
    pytest.fail(f"the dashboard never opened: {[(f.name, f.url) for f in page.frames]}")


def _number(frame, field: str) -> str:
    return frame.locator(f'[data-field="{field}"]').first.inner_text()


def test_the_dashboard_charts_a_real_run_and_updates_without_reload(  # noqa: PLR0915
        sandbox, installed, engine, page):  # noqa: F811 - the imported fixture
    member_id = installed["member_id"]
    portal = _portal(member_id)
    sandbox.set_latency(member_id, 200)
    ids = [i for call in range(8) for i in call_commands(portal, call)]
    db.session.commit()
    assert {r.status for r in settled(portal.id, len(ids), timeout=60)} == {"done"}

    page.set_viewport_size({"width": 1280, "height": 2400})  # the whole page in the screenshot
    page.goto(sandbox.frame_url(member_id, placement="TELEPHONY_ANALYTICS_MENU"))
    frame = _dashboard_frame(page)
    frame.wait_for_selector("#chart-round-trip canvas", timeout=15000)
    frame.wait_for_selector("#chart-rate canvas", timeout=15000)
    series = frame.evaluate(
        "JSON.parse(document.getElementById('dashboard-data').textContent).series")
    assert sum(m["done"] for m in series) == len(ids)
    assert any(m["p50"] for m in series)
    assert int(frame.get_attribute("#chart-round-trip", "data-points")) >= 1
    assert int(frame.get_attribute("#chart-rate", "data-points")) >= 1
    legend = frame.locator("#chart-round-trip .u-legend").inner_text()
    assert "p95" in legend
    assert _number(frame, "outbox.dead") == "0"

    # More commands, one of them dead with a hostile method name: the page refreshes itself.
    frame.evaluate("window.__still_here = true")
    more = [i for call in range(8, 12) for i in call_commands(portal, call)]
    submit(portal.id, EVIL, {"ID": 1})
    db.session.commit()
    settled(portal.id, len(ids) + len(more) + 1, timeout=60)
    frame.wait_for_function(
        "document.querySelector('[data-field=\"outbox.dead\"]').textContent === '1'",
        timeout=20000)
    assert frame.evaluate("window.__still_here") is True, "the page was reloaded"
    row = frame.locator("#errors tbody tr").first
    assert EVIL in row.inner_text()  # shown as text ...
    assert frame.locator("#errors img").count() == 0  # ... never as markup
    assert frame.evaluate("window.__xss") is None
    assert len(frame.locator("#operating tbody tr").all()) >= 1

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(Path(ARTIFACTS, "dashboard.png")), full_page=True)
