"""One Chromium per test module, a fresh context per test: for modules with several browser tests.

Import the fixtures into a test module (``chromium, page = browser.chromium, browser.page``).
Skipped, with the reason, where Chromium is not installed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.install.test_browser import ARGS, CHROMIUM


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Debian's Chromium driven by Playwright, shared by the module's tests."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    home = tmp_path_factory.mktemp("chromium-home")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS,
                                     env={**os.environ, "HOME": str(home)})
        yield browser
        browser.close()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    """A page in a context of its own (no cookies or storage shared between tests)."""
    context = chromium.new_context()
    yield context.new_page()
    context.close()
