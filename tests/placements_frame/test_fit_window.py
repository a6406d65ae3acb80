"""The portal's frame API from the app's pages: the BX24 library the portal provides fits the
portal's iframe to the page (issue 24 point 7), in Debian's Chromium inside the sandbox portal's
own page, which sizes its iframe only when the page asks through ``resizeWindow``."""

from __future__ import annotations

from tests import browser

chromium, page = browser.chromium, browser.page

FRAME_START = 400  # px: the portal page's iframe before the app asks for a size


def _fitted(page) -> int:
    handle = page.wait_for_selector("iframe#app[data-fitted]", state="attached", timeout=15000)
    return int(handle.get_attribute("data-fitted"))


def test_the_settings_page_fits_the_portals_frame_to_its_content(sandbox, installed, page):
    page.goto(sandbox.frame_url(installed["member_id"]))
    app = page.frame(name="app")
    app.wait_for_selector('[data-status="active"]', timeout=15000)
    # The app's document is on another origin: measured from inside, the size from outside.
    content = app.evaluate("() => document.documentElement.scrollHeight")
    page.wait_for_function(f"() => document.getElementById('app').dataset.fitted == {content}",
                           timeout=15000)
    assert content != FRAME_START
    assert _fitted(page) == content


def test_the_frame_follows_the_page_when_its_content_grows(sandbox, installed, page):
    page.goto(sandbox.frame_url(installed["member_id"]))
    app = page.frame(name="app")
    app.wait_for_selector('[data-status="active"]', timeout=15000)
    before = _fitted(page)
    app.evaluate("() => { const p = document.createElement('div');"
                 " p.style.height = '1500px'; document.querySelector('main').appendChild(p); }")
    page.wait_for_function(
        f"() => Number(document.getElementById('app').dataset.fitted) >= {before + 1400}",
        timeout=15000)
