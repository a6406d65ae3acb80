"""The settings and self-diagnosis pages in Debian's Chromium, inside the sandbox portal's page
(/_sandbox/.../frame), which POSTs the iframe form into its frame as a portal does.

Each test saves screenshots to tests/artifacts/ (kept as test artifacts). A user whose name is
markup is on every portal here: no dialog may ever fire.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from app.ingress.auth import issue_api_key
from tests import browser
from tests.conftest import ROOT
from tests.install.conftest import LiveApp, portal_row

chromium, page = browser.chromium, browser.page
pytestmark = pytest.mark.timeout(180)

ARTIFACTS = Path(ROOT) / "tests" / "artifacts"
USERS = [
    {"id": 1, "name": "Ada", "last_name": "Admin", "admin": True, "extension": "101"},
    {"id": 2, "name": '"><img src=x onerror=alert(1)>', "admin": False, "extension": "102"},
    {"id": 3, "name": "Вера", "admin": True, "extension": "103", "lang": "ru"},  # reads Russian
]
RUSSIAN_ADMIN = 3
START = {"event": "start", "at": "2026-12-07T10:00:00+00:00", "direction": "in",
         "phone": "+74951234567", "extensions": ["101"], "line": "+74950000000"}


def _shot(tab: Any, name: str) -> None:
    """The portal's page with the whole app frame in view (the frame is 100vh tall)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    tall = int(tab.frame(name="app").evaluate("document.documentElement.scrollHeight"))
    tab.set_viewport_size({"width": 1100, "height": min(max(tall, 720), 8000)})
    tab.screenshot(path=str(ARTIFACTS / f"{name}.png"))


@pytest.fixture
def portal(sandbox: Any, make_portal: Any, live_app: LiveApp) -> str:
    """An installed portal: its member_id."""
    made = make_portal(users=USERS)
    assert sandbox.install_app(made["member_id"], live_app.url)["status"] == 200
    sandbox.finish_install(made["member_id"])
    return str(made["member_id"])


@pytest.fixture
def dialogs(page: Any) -> list[str]:
    """Every dialog the page opens (an alert() would be a script that got through)."""
    seen: list[str] = []

    def dismiss(dialog: Any) -> None:
        seen.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", dismiss)
    return seen


def _open(sandbox: Any, tab: Any, member_id: str, user_id: int | None = None) -> Any:
    """The app's frame inside the portal's page (as ``user_id``, in their language), once the
    settings page is in it."""
    tab.goto(sandbox.frame_url(member_id, user_id=user_id))
    tab.wait_for_selector("iframe[name=app]")
    frame = tab.frame(name="app")
    frame.wait_for_selector("#settings-form", timeout=15000)
    return frame


def _session(frame: Any) -> str:
    return str(frame.eval_on_selector("#settings-form input[name=s]", "e => e.value"))


def _session_of_page(frame: Any) -> str:
    """The page session the frame's section links carry."""
    href = str(frame.get_attribute("nav.sections a", "href"))
    return href.split("s=", 1)[1].split("&", 1)[0]


def _settings(member_id: str) -> Any:
    return portal_row(member_id).settings


def test_the_settings_page_renders_in_english_and_in_russian(sandbox, portal, live_app, page,
                                                              dialogs):
    frame = _open(sandbox, page, portal)
    assert frame.inner_text("#settings-form button[type=submit]") == "Save"
    assert frame.eval_on_selector("html", "e => e.lang") == "en"
    assert "Ada Admin" in frame.inner_text("#users")
    assert '"><img src=x onerror=alert(1)>' in frame.inner_text("#users")  # text, not markup
    assert frame.locator("#users img").count() == 0
    _shot(page, "settings-en")

    # A user who reads the portal in Russian: the portal puts LANG=ru into the frame's URL.
    frame = _open(sandbox, page, portal, user_id=RUSSIAN_ADMIN)
    assert frame.eval_on_selector("html", "e => e.lang") == "ru"
    assert frame.inner_text("#settings-form button[type=submit]") == "Сохранить"
    assert "Внешние линии" in frame.inner_text("main")
    assert frame.inner_text("nav.sections a[data-section='settings.settings_page']") == \
        "Настройки"
    _shot(page, "settings-ru")
    assert dialogs == []


def test_settings_save_and_a_bad_value_shows_its_message_next_to_it(sandbox, portal, page,
                                                                    dialogs):
    frame = _open(sandbox, page, portal)
    frame.fill("#pbx_originate_url", "https://pbx.example.com/originate")
    frame.fill("#default_country", "de")
    frame.select_option("#add_to_chat", "0")
    frame.click("#settings-form button[type=submit]")
    frame.wait_for_selector("#notice")
    assert frame.inner_text("#notice") == "Settings saved."
    saved = _settings(portal)
    assert (saved.pbx_originate_url, saved.default_country, saved.add_to_chat) == \
        ("https://pbx.example.com/originate", "DE", False)

    # A bad country and a good CRM source: the message sits right after the country's field,
    # nothing is stored, and what the admin typed is still there.
    frame.fill("#default_country", "XX")
    frame.fill("#crm_source", "WEB")
    frame.click("#settings-form button[type=submit]")
    error = frame.wait_for_selector("#default_country + .field-error")
    assert "'XX' is not a known two-letter country code" in error.inner_text()
    assert frame.get_attribute("#default_country", "aria-invalid") == "true"
    assert frame.input_value("#default_country") == "XX"
    assert frame.input_value("#crm_source") == "WEB"
    assert frame.locator(".field-error").count() == 1
    _shot(page, "settings-bad-value")
    after = _settings(portal)
    assert (after.default_country, after.crm_source) == ("DE", None)
    assert dialogs == []


def test_the_api_key_rotates_and_is_shown_once(sandbox, portal, live_app, page, dialogs):
    old = issue_api_key(portal_row(portal))
    frame = _open(sandbox, page, portal)
    assert old[:12] in frame.inner_text("#api-key-prefix")
    frame.click("#rotate-key button[type=submit]")
    new = frame.wait_for_selector("#new-api-key code").inner_text().strip()
    assert new.startswith("b24r_") and new != old
    _shot(page, "settings-api-key")

    with live_app.http() as http:
        def send(key: str, call_id: str) -> int:
            return http.post("/api/v1/calls/events", json={**START, "call_id": call_id},
                             headers={"Authorization": f"Bearer {key}"}).status_code

        assert send(old, "rotated-1") == 401
        assert send(new, "rotated-2") == 202

    # Shown once: the page opened again names the key by its prefix only.
    frame.goto(f"{live_app.url}/placements/app/settings?s={_session(frame)}")
    frame.wait_for_selector("#settings-form")
    assert frame.locator("#new-api-key").count() == 0
    assert new not in frame.content() and new[:12] in frame.inner_text("#api-key-prefix")
    assert dialogs == []


def test_the_diagnosis_page_finds_seeded_faults_and_names_their_fixes(sandbox, portal, live_app,
                                                                     page, dialogs,
                                                                     start_worker):
    start_worker(threads=2, **live_app.worker_env())
    sandbox.set_outgoing_line(portal, "sip12")  # the app is not the default line
    sandbox.set_scope(portal, "telephony,placement,user_basic")  # crm withdrawn
    frame = _open(sandbox, page, portal)
    frame.click("nav.sections a[data-section='settings.diagnosis']")
    frame.wait_for_selector("#check-now")
    frame.click("#check-now button[type=submit]")
    frame.wait_for_selector("#checking")
    line = frame.wait_for_selector("tr[data-code=outgoing_line]:not([data-level=ok])",
                                   timeout=90000)
    assert "sip12" in line.inner_text()
    assert "Telephony > Telephony settings" in line.inner_text()  # where to fix it
    scopes = frame.wait_for_selector("tr[data-code=scopes]")
    assert scopes.get_attribute("data-level") == "error"
    assert "crm" in scopes.inner_text() and "reinstall the app" in scopes.inner_text()
    assert frame.locator("#checking").count() == 0  # the new report replaced "checking"
    _shot(page, "diagnosis-faults")

    # The settings page says the same about the default line, with how to fix it.
    frame.click("nav.sections a[data-section='settings.settings_page']")
    outgoing = frame.wait_for_selector("#outgoing-line")
    assert "sip12" in outgoing.inner_text()
    assert "Telephony > Telephony settings" in outgoing.inner_text()

    # The same report for a user who reads the portal in Russian: findings and fixes in Russian.
    frame = _open(sandbox, page, portal, user_id=RUSSIAN_ADMIN)
    frame.click("nav.sections a[data-section='settings.diagnosis']")
    line = frame.wait_for_selector("tr[data-code=outgoing_line]:not([data-level=ok])",
                                   timeout=90000)
    assert "Что сделать:" in line.inner_text() and "sip12" in line.inner_text()
    assert "Telephony > Telephony settings" not in line.inner_text()
    _shot(page, "diagnosis-faults-ru")
    assert dialogs == []
    assert httpx.get(live_app.url + "/placements/app/diagnosis").status_code == 401


def test_the_diagnosis_page_finds_five_seeded_faults_each_with_its_fix(sandbox, make_portal,
                                                                      live_app, page, dialogs,
                                                                      start_worker):
    """Issue 24's five faults at once: a missing event binding, the app not the default line,
    a user without an extension, a missing scope, a clock 10 minutes off."""
    from app.dispatcher import direct
    from app.installation import plan

    made = make_portal(users=[*USERS, {"id": 3, "name": "Carl", "extension": ""}])
    member_id = str(made["member_id"])
    assert sandbox.install_app(member_id, live_app.url)["status"] == 200
    sandbox.finish_install(member_id)
    start_worker(threads=2, **live_app.worker_env())
    direct.call_method(portal_row(member_id), "event.unbind",
                       {"event": "ONUSERADD", "handler": plan.event_handler_url(member_id)})
    sandbox.set_outgoing_line(member_id, "sip12")
    sandbox.set_scope(member_id, "telephony,placement,user_basic")
    sandbox.set_clock_skew(member_id, 600)

    frame = _open(sandbox, page, member_id)
    frame.click("nav.sections a[data-section='settings.diagnosis']")
    frame.click("#check-now button[type=submit]")
    frame.wait_for_selector("tr[data-code=clock]:not([data-level=ok])", timeout=90000)
    fixes = {  # each finding: something it names, and words of its fix
        "events": ("ONUSERADD", f"flask portals setup {member_id}"),
        "outgoing_line": ("sip12", "Telephony > Telephony settings"),
        "extensions_missing": ("Carl (3)", "internal number"),
        "scopes": ("crm", "reinstall the app"),
        "clock": ("s ahead of ours", "timedatectl"),
    }
    for code, (named, fix) in fixes.items():
        row = frame.wait_for_selector(f"tr[data-code={code}]")
        text = row.inner_text()
        assert row.get_attribute("data-level") != "ok", (code, text)
        assert named in text and fix in text, (code, text)
    _shot(page, "diagnosis-five-faults")
    assert dialogs == []
