"""The app's installer in Chromium, inside the sandbox portal's page: only its script finishes the
install (issue #11 point 1, the app's side).

The sandbox portal finishes an install only when the installer page, framed by the portal's
page, sends ``installFinish`` through the BX24 library it loaded from ``B24_JS_SDK_URL``. So
this fails if the page stops calling it, if the library does not load (a wrong URL, or a
Content-Security-Policy on the installer that blocks the script), or if the portal may not
frame the page.
"""

from __future__ import annotations

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests import browser
from tests.install.conftest import portal_row, process_queued

chromium, page = browser.chromium, browser.page


def test_the_installer_page_finishes_the_install_in_a_browser(sandbox, make_portal, live_app,
                                                              page):
    portal = make_portal()
    member_id = portal["member_id"]
    errors: list[str] = []
    page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
    # As on a portal, the finished installer gives way to the app's own page in the frame.
    try:
        with page.expect_response(live_app.url + "/placements/settings?**", timeout=10000):
            page.goto(sandbox.frame_url(member_id))
    except PlaywrightTimeout:
        pytest.fail(f"the installer never finished the install; browser errors: {errors}")
    assert not [e for e in errors if "Content Security Policy" in e]  # the SDK script loaded
    assert sandbox.install_state(member_id)["install_finished"] is True
    bound = {b["event"] for b in sandbox.bindings(member_id)["events"]}
    assert bound >= {"ONAPPINSTALL", "ONAPPUNINSTALL", "ONEXTERNALCALLSTART"}

    # installFinish sent ONAPPINSTALL to the handler the installer had bound; the app kept it.
    assert process_queued("ONAPPINSTALL") == ["done"]
    row = portal_row(member_id)
    assert row.status == "active"
    assert row.application_token == portal["application_token"]
    page.frame(name="app").wait_for_selector('[data-status="active"]', timeout=10000)
