"""installFinish for real: only the installer page's script, run by a browser inside the portal's
page, finishes an install (issue #11 point 1).

The portal page (``frame_url``) frames the installer by an iframe POST and answers the frame's
BX24 messages. A page whose script never gets to ``BX24.installFinish()`` (a JS error first, the
BX24 library not loaded) or that runs outside the portal's page leaves the install pending: no
events, widgets hidden.
"""

from __future__ import annotations

import html
from urllib.parse import parse_qsl

import pytest

from sandbox import SandboxError
from tests import browser

from .conftest import call

chromium, page = browser.chromium, browser.page

INSTALLER = ("<html><body>installing<script src='{sdk}'></script>"
             "<script>BX24.init(function () {{ {before}BX24.installFinish(); }});</script>"
             "</body></html>")
PAGES = {
    "calls_install_finish": {"before": ""},
    "js_error_before_the_call": {"before": "settings.load(); "},
    "bx24_js_not_loaded": {"before": "", "sdk": "/bx24-missing.js"},
}


@pytest.fixture
def portal_for(sandbox, fake_app, http):
    """A portal whose installer is ``fake_app`` serving ``PAGES[kind]``, with an event and a
    widget bound already (both must stay dead until the install is finished)."""

    def make(kind: str) -> dict:
        spec = PAGES[kind]
        fake_app.install_html = INSTALLER.format(
            sdk=sandbox.base_url + spec.get("sdk", "/bx24.js"), before=spec["before"])
        p = sandbox.create_portal(app_url=fake_app.url)
        events, widget = fake_app.url + "/b24/events", fake_app.url + "/placements/card"
        assert call(http, p, "event.bind", event="ONCRMDEALUPDATE", handler=events).json()
        assert call(http, p, "placement.bind", PLACEMENT="CALL_CARD", HANDLER=widget).json()
        return p

    return make


def deal_update(sandbox, p) -> list:
    """What the app's handlers answered to one ONCRMDEALUPDATE ([] = nothing was sent)."""
    return sandbox.trigger_event(p["member_id"], "ONCRMDEALUPDATE", {"FIELDS": {"ID": "7"}})[
        "statuses"]


def assert_pending(sandbox, http, p) -> None:
    """The install is not finished: app.info says so, no event goes out, widgets are hidden."""
    assert sandbox.install_state(p["member_id"])["install_finished"] is False
    assert call(http, p, "app.info").json()["result"]["INSTALLED"] is False
    assert deal_update(sandbox, p) == []
    with pytest.raises(SandboxError, match="409"):
        sandbox.open_placement(p["member_id"], "CALL_CARD")


def test_the_installer_script_finishes_the_install_inside_the_portal_page(
        sandbox, fake_app, http, portal_for, page):
    p = portal_for("calls_install_finish")
    # As on a portal, the finished installer gives way to the app's page in the same frame.
    with page.expect_response(fake_app.url + "/placements/settings?**", timeout=10000):
        page.goto(sandbox.frame_url(p["member_id"]))
    # The installer ran inside the portal page's iframe, on the portal's origin.
    assert page.url.startswith(f"http://{p['domain']}/")
    assert [h.path.split("?")[0] for h in fake_app.hits] == ["/install", "/placements/settings"]
    assert sandbox.install_state(p["member_id"])["install_finished"] is True
    assert call(http, p, "app.info").json()["result"]["INSTALLED"] is True
    assert deal_update(sandbox, p) == [200]
    assert sandbox.open_placement(p["member_id"], "CALL_CARD")["status"] == 200


@pytest.mark.parametrize("kind", ["js_error_before_the_call", "bx24_js_not_loaded"])
def test_a_page_that_never_runs_install_finish_leaves_the_install_pending(
        sandbox, fake_app, http, portal_for, page, kind):
    p = portal_for(kind)
    # The page's text names BX24.installFinish(): the portal's install POST alone finishes nothing.
    headless = sandbox.install_app(p["member_id"])
    assert "BX24.installFinish()" in headless["body"]
    assert headless["install_finished"] is False
    assert_pending(sandbox, http, p)
    with page.expect_event("pageerror") as error:  # the script stops before the call
        page.goto(sandbox.frame_url(p["member_id"]))
    assert "not defined" in str(error.value)
    assert page.frame(name="app").url.startswith(fake_app.url + "/install?")
    page.wait_for_load_state("networkidle")
    assert_pending(sandbox, http, p)


def test_install_finish_outside_the_portal_page_does_nothing(sandbox, fake_app, http,
                                                             portal_for, page):
    p = portal_for("calls_install_finish")
    sent = sandbox.install_app(p["member_id"])  # a real installer form with its APP_SID...
    inputs = "".join(f'<input type="hidden" name="{k}" value="{html.escape(v)}">'
                     for k, v in parse_qsl(sent["form"]))
    action = f"{fake_app.url}/install?DOMAIN={p['domain']}&PROTOCOL=0&LANG=en&APP_SID=" \
             f"{sent['app_sid']}"
    page.set_content(f'<form id="f" method="post" action="{action}">{inputs}</form>'
                     '<script>document.getElementById("f").submit();</script>')
    page.wait_for_url(fake_app.url + "/install?**")  # ...opened top-level, not by the portal
    page.wait_for_function("typeof BX24 === 'object'")
    page.evaluate("BX24.installFinish()")
    page.wait_for_load_state("networkidle")
    assert_pending(sandbox, http, p)


def test_the_portal_page_alone_may_finish_an_install(sandbox, fake_app, http, portal_for):
    p = portal_for("calls_install_finish")
    parent = http.get(sandbox.frame_url(p["member_id"]), follow_redirects=True)
    sid = parent.text.split('var SID = "', 1)[1].split('"', 1)[0]
    finish = f"http://{p['domain']}/_sandbox/frame/install_finish?APP_SID={sid}"
    # A script on the app's page (its own origin) cannot skip the frame protocol.
    assert http.post(finish, headers={"Origin": fake_app.url}).status_code == 403
    assert_pending(sandbox, http, p)
    done = http.post(finish, headers={"Origin": f"http://{p['domain']}"})
    assert done.json() == {"install_finished": True, "reload": True}
    assert deal_update(sandbox, p) == [200]
