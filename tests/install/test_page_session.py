"""The page session: the signed token carrying a verified iframe user between the app's pages."""

from __future__ import annotations

import re
import time

import pytest

from app.tenants.models import Portal
from placements import page_session
from tests.ingress.conftest import make_portal


def test_a_session_names_its_portal_user_role_and_language(app):
    with app.app_context():
        portal = make_portal()
        raw = page_session.issue(portal, 7, True, "ua")
        session = page_session.from_token(raw)
        assert (session.portal.id, session.user_id, session.is_admin, session.lang) == \
            (portal.id, 7, True, "ru")


@pytest.mark.parametrize("raw", ["", "forged", "eyJwIjoxfQ.forged.sig"])
def test_a_missing_or_forged_session_is_refused(app, raw):
    with app.app_context(), pytest.raises(page_session.SessionRefused) as refused:
        page_session.from_token(raw)
    assert refused.value.status == 401


def test_an_expired_session_is_refused(app, monkeypatch):
    with app.app_context():
        raw = page_session.issue(make_portal(), 7, True, "en")
        later = time.time() + page_session.TTL_SECONDS + 5
        monkeypatch.setattr(time, "time", lambda: later)  # itsdangerous reads the clock here
        with pytest.raises(page_session.SessionRefused, match="expired"):
            page_session.from_token(raw)


def test_a_session_signed_for_a_portal_since_reinstalled_is_refused(app):
    with app.app_context():
        portal = make_portal()
        raw = page_session.issue(portal, 7, True, "en")
        portal.member_id = "another-installation"
        from app.extensions import db
        db.session.commit()
        assert db.session.get(Portal, portal.id) is not None
        with pytest.raises(page_session.SessionRefused):
            page_session.from_token(raw)


def test_the_portals_page_links_its_sections_with_the_session(sandbox, installed):
    body = sandbox.open_placement(installed["member_id"])["body"]
    nav = re.search(r'<nav class="sections">(.*?)</nav>', body, re.S)
    assert nav, body
    for href in re.findall(r'href="([^"]+)"', nav.group(1)):
        assert "s=" in href


def test_an_employees_navigation_leaves_out_the_administrators_sections(sandbox, installed):
    admin = sandbox.open_placement(installed["member_id"])["body"]
    employee = sandbox.open_placement(installed["member_id"], user_id=2)["body"]
    assert 'data-section="dead.dead_letters"' in admin
    assert 'data-section="calls.lookup"' in admin
    assert '<nav class="sections">' in employee
    assert 'data-section="dead.dead_letters"' not in employee
    assert 'data-section="calls.lookup"' not in employee
