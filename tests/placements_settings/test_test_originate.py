"""The settings page's "send a test originate" against the test PBX (sandbox/pbx.py): signed as
click-to-call signs, marked as a test, and no call placed for it.
"""

from __future__ import annotations

import html
import re

from sandbox.pbx import TestPBX
from tests.placements_settings.conftest import form_token, open_page, post, session_of

TEST = "/placements/app/settings/test-originate"
SECRET = "a-shared-originate-secret-0123"


def _save_pbx(live_app, page: str, url: str, secret: str) -> str:
    saved = post(live_app, "/placements/settings", None, s=session_of(page),
                 form_token=form_token(page), lines="", pbx_originate_url=url,
                 pbx_secret=secret)
    assert saved.status_code == 200 and "Settings saved." in saved.text, saved.text
    assert secret not in saved.text  # write-only
    return saved.text


def _test(live_app, page: str) -> str:
    answered = post(live_app, TEST, session_of(page), form_token=form_token(page,
                                                                            "test-originate"))
    assert answered.status_code == 200, answered.text
    return answered.text


def test_the_pbx_takes_the_signature_and_places_no_call(sandbox, installed, live_app):
    with TestPBX(app=live_app.url, api_key="unused", secret=SECRET) as pbx:
        page = _save_pbx(live_app, open_page(sandbox, installed["member_id"]), pbx.url, SECRET)
        answer = _test(live_app, page)
        assert 'data-status-code="200"' in answer  # signed right: a test, no call placed
        assert "The PBX answered and took the signature." in answer
        assert '"test": true' in html.unescape(answer)  # the PBX's own answer, shown
        assert re.search(r"<td>\d+ ms</td>", answer)
        assert pbx.originates == [] and pbx.refused == []
        assert [t["kind"] for t in pbx.tests] == ["test"]

        # The PBX holds another secret: the page says the signature was refused.
        page = _save_pbx(live_app, answer, pbx.url, "another-secret-of-the-portal")
        answer = _test(live_app, page)
        assert 'data-status-code="401"' in answer and "refused the signature" in answer
        assert pbx.originates == [] and pbx.refused[-1].reason == "bad signature"
        assert len(pbx.tests) == 1  # the refused one was not taken as a test


def test_no_pbx_listening_is_shown_as_no_answer(sandbox, installed, live_app):
    page = _save_pbx(live_app, open_page(sandbox, installed["member_id"]),
                     "http://127.0.0.1:9/originate", SECRET)
    answer = _test(live_app, page)
    assert 'data-status-code=""' in answer and "ConnectError" in answer
    assert "did not answer properly" in answer


def test_without_a_url_the_page_says_what_to_set_first(sandbox, installed, live_app):
    answer = _test(live_app, open_page(sandbox, installed["member_id"]))
    assert "Set the PBX originate URL and its secret first" in answer
    assert 'id="pbx-answer"' not in answer
