"""The extension map on the settings page: users with their Bitrix24 extension, overrides added
and removed, the fallback user, "sync users now", and a generated originate secret shown once.
"""

from __future__ import annotations

import pytest
from sqlalchemy import delete

from app.extensions import db
from app.tenants.users import PortalUser, extension_map, find_user
from tests.conftest import wait_for
from tests.install.conftest import portal_row
from tests.placements_settings.conftest import form_token, open_page, post, session_of

pytestmark = pytest.mark.timeout(120)
ADD = "/placements/app/settings/overrides"
REMOVE = "/placements/app/settings/overrides/remove"


def _map(member_id: str) -> dict[str, int]:
    db.session.remove()
    return extension_map(portal_row(member_id))


def test_an_override_is_added_and_removed(sandbox, installed, live_app):
    member_id = installed["member_id"]
    page = open_page(sandbox, member_id)
    assert 'data-user="2"' in page and "<td>102</td>" in page  # Bob, with his extension
    added = post(live_app, ADD, session_of(page), form_token=form_token(page, "override-add"),
                 extension="55501", user_id="2", note="front desk")
    assert added.status_code == 200 and 'data-extension="55501"' in added.text
    assert _map(member_id)["55501"] == 2

    removed = post(live_app, REMOVE, session_of(added.text),
                   form_token=form_token(added.text, "override-remove-1"), extension="55501")
    assert removed.status_code == 200 and 'data-extension="55501"' not in removed.text
    assert "55501" not in _map(member_id)


def test_a_bad_override_says_why_by_its_fields_and_adds_nothing(sandbox, installed, live_app):
    member_id = installed["member_id"]
    page = open_page(sandbox, member_id)
    resp = post(live_app, ADD, session_of(page), form_token=form_token(page, "override-add"),
                extension="", user_id="77")
    assert resp.status_code == 400
    assert 'id="error-override_extension"' in resp.text and 'id="error-override_user"' in resp.text
    assert _map(member_id) == {"101": 1, "102": 2}


def test_the_fallback_user_is_chosen_from_the_portals_users(sandbox, installed, live_app):
    member_id = installed["member_id"]
    page = open_page(sandbox, member_id)
    saved = post(live_app, "/placements/settings", None, s=session_of(page),
                 form_token=form_token(page), lines="", default_user_id="3")
    assert saved.status_code == 200
    assert portal_row(member_id).settings.default_user_id == 3
    assert '<option value="3" selected>' in saved.text
    bad = post(live_app, "/placements/settings", None, s=session_of(saved.text),
               form_token=form_token(saved.text), lines="", default_user_id="77")
    assert bad.status_code == 400 and 'id="error-default_user_id"' in bad.text
    assert "user 77 is not a user of this portal" in bad.text
    assert portal_row(member_id).settings.default_user_id == 3


def test_a_new_secret_is_shown_once(sandbox, installed, live_app):
    member_id = installed["member_id"]
    page = open_page(sandbox, member_id)
    saved = post(live_app, "/placements/settings", None, s=session_of(page),
                 form_token=form_token(page), lines="", pbx_secret="new")
    stored = portal_row(member_id).settings.pbx_secret
    assert stored and stored != "new" and saved.text.count(stored) == 1
    assert 'id="new-secret"' in saved.text
    again = open_page(sandbox, member_id)
    assert stored not in again and 'id="new-secret"' not in again
    # An empty secret field keeps the secret (the page never shows it to be sent back).
    post(live_app, "/placements/settings", None, s=session_of(again),
         form_token=form_token(again), lines="", pbx_secret="")
    assert portal_row(member_id).settings.pbx_secret == stored


def test_sync_users_now_reads_the_users_again(sandbox, installed, live_app, start_worker):
    member_id = installed["member_id"]
    portal_id = portal_row(member_id).id
    db.session.execute(delete(PortalUser).where(PortalUser.portal_id == portal_id,
                                                PortalUser.user_id == 2))
    db.session.commit()
    page = open_page(sandbox, member_id)
    assert 'data-user="2"' not in page
    start_worker(threads=2, **live_app.worker_env())
    resp = post(live_app, "/placements/app/settings/sync-users", session_of(page),
                form_token=form_token(page, "sync-users"))
    assert resp.status_code == 200 and "being read again" in resp.text

    def back() -> bool:
        db.session.remove()
        return find_user(portal_row(member_id), 2) is not None

    assert wait_for(back, timeout=60)
    assert 'data-user="2"' in open_page(sandbox, member_id)
