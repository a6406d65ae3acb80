"""The pages the portal frames, in a real browser (Debian's Chromium driven by Playwright).

The sandbox's frame page POSTs the iframe form exactly as a portal does; the
app's installer page then loads the BX24 library (the sandbox's stand-in, via
``B24_JS_SDK_URL``) and must call ``BX24.installFinish()`` from its JavaScript.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import wait_for

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser_page(tmp_path: Path):
    """A fresh Chromium page; skipped (with the reason) where Chromium is not installed."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS,
                                     env={**os.environ, "HOME": str(tmp_path)})
        page = browser.new_page()
        yield page
        browser.close()


def test_installer_page_calls_install_finish_in_a_browser(sandbox, sandbox_server, make_portal,
                                                          browser_page, tmp_path):
    portal = make_portal()
    mid = portal["member_id"]
    assert sandbox.install_state(mid)["install_finished"] is False

    browser_page.goto(f"{sandbox_server.url}/_sandbox/portals/{mid}/frame?placement=DEFAULT")
    browser_page.wait_for_load_state("networkidle")

    state = wait_for(lambda: (s := sandbox.install_state(mid))["install_finished"] and s,
                     timeout=20)
    assert state["install_finished"] is True
    bindings = sandbox.bindings(mid)
    assert {b["event"] for b in bindings["events"]} >= {"ONAPPUNINSTALL", "ONEXTERNALCALLSTART"}
    browser_page.screenshot(path=str(tmp_path / "installer.png"))


def test_settings_page_renders_the_portal_status_in_a_browser(sandbox, sandbox_server,
                                                               installed, browser_page, tmp_path):
    mid = installed["member_id"]
    browser_page.goto(f"{sandbox_server.url}/_sandbox/portals/{mid}/frame?placement=DEFAULT")
    browser_page.wait_for_load_state("networkidle")
    text = browser_page.inner_text("body")
    assert "active" in text.lower(), text
    assert "101" in text  # the admin's extension from the portal's users
    browser_page.screenshot(path=str(tmp_path / "settings.png"), full_page=True)
    if os.environ.get("B24RELAY_SCREENSHOTS"):
        shutil.copy(tmp_path / "settings.png", os.environ["B24RELAY_SCREENSHOTS"])
