"""The pages the portal frames, in a real browser (Debian's Chromium driven by Playwright).

The sandbox's frame page is the portal's own page: it POSTs the iframe form into its
iframe exactly as a portal does. The installer's run in it is in
test_install_finish_browser.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

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


def test_settings_page_renders_the_portal_status_in_a_browser(sandbox, sandbox_server,
                                                               installed, browser_page, tmp_path):
    mid = installed["member_id"]
    browser_page.goto(f"{sandbox_server.url}/_sandbox/portals/{mid}/frame?placement=DEFAULT")
    browser_page.wait_for_load_state("networkidle")
    text = browser_page.frame(name="app").inner_text("body")  # the portal page's iframe
    assert "active" in text.lower(), text
    assert "101" in text  # the admin's extension from the portal's users
    browser_page.screenshot(path=str(tmp_path / "settings.png"), full_page=True)
    if os.environ.get("B24RELAY_SCREENSHOTS"):
        shutil.copy(tmp_path / "settings.png", os.environ["B24RELAY_SCREENSHOTS"])
