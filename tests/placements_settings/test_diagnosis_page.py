"""The self-diagnosis page over HTTP: the last report in words, a check asked by an
administrator only, and the round that follows a settings change (a real worker runs it).
"""

from __future__ import annotations

import re

import pytest

from app.extensions import db
from app.installation import diagnosis
from tests.conftest import wait_for
from tests.install.conftest import portal_row
from tests.placements_settings.conftest import EMPLOYEE, form_token, open_page, post, session_of

pytestmark = pytest.mark.timeout(120)
DIAGNOSIS = "/placements/app/diagnosis"


def _trigger(member_id: str) -> str | None:
    db.session.remove()
    last = diagnosis.last_report(portal_row(member_id))
    return last[1].trigger if last else None


def test_before_any_check_the_page_says_so_and_only_an_admin_may_ask(sandbox, installed,
                                                                     live_app):
    member_id = installed["member_id"]
    admin = session_of(open_page(sandbox, member_id))
    with live_app.http() as http:
        page = http.get(DIAGNOSIS, params={"s": admin})
        assert page.status_code == 200 and 'id="no-report"' in page.text
        assert http.get(f"{DIAGNOSIS}/last", params={"s": admin}).json() == {"checked_at": ""}
        employee = session_of(open_page(sandbox, member_id, user_id=EMPLOYEE))
        seen = http.get(DIAGNOSIS, params={"s": employee})
    assert seen.status_code == 200 and 'id="check-now"' not in seen.text
    token = form_token(page.text, "check-now")
    refused = post(live_app, DIAGNOSIS, employee, form_token=token)
    assert refused.status_code == 403 and 'id="checking"' not in refused.text
    assert post(live_app, DIAGNOSIS, admin).status_code == 403  # no form token


def test_a_settings_change_is_followed_by_a_check_shown_on_the_page(sandbox, installed,
                                                                   live_app, start_worker):
    live_app.app.config["DIAGNOSIS_SETTLE_SECONDS"] = 0.0
    start_worker(threads=2, DIAGNOSIS_MIN_INTERVAL="0", **live_app.worker_env())
    member_id = installed["member_id"]
    page = open_page(sandbox, member_id)
    saved = post(live_app, "/placements/settings", None, s=session_of(page),
                 form_token=form_token(page), lines="", default_country="FR")
    assert saved.status_code == 200 and "Settings saved." in saved.text
    assert wait_for(lambda: _trigger(member_id) == "settings", timeout=60)
    with live_app.http() as http:
        shown = http.get(DIAGNOSIS, params={"s": session_of(page)})
    assert 'data-trigger="settings"' in shown.text
    assert re.search(r'<tr data-code="scopes" data-level="ok"', shown.text), shown.text

    # The button: the page waits ("checking") until the worker's new report is there.
    checking = post(live_app, DIAGNOSIS, session_of(page),
                    form_token=form_token(shown.text, "check-now"))
    assert checking.status_code == 200 and 'id="checking"' in checking.text
    since = re.search(r'data-since="([^"]*)"', checking.text).group(1)
    with live_app.http() as http:
        def newer() -> bool:
            last = http.get(f"{DIAGNOSIS}/last", params={"s": session_of(page)}).json()
            return bool(last["checked_at"]) and last["checked_at"] != since

        assert wait_for(newer, timeout=90, interval=0.5)
    assert _trigger(member_id) == "page"
