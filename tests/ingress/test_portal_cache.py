"""Intake's portal cache at SaaS scale: no short expiry, yet every change counts at once.

The cache keeps what intake knows of a portal (a keyed hash of its application_token, its
status) until the portal changes; every change is published to every process, and the
writer's commit returns only once they have dropped it.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import httpx
from sqlalchemy import select, update

from app import create_app
from app.extensions import db
from app.ingress import token_hash
from app.tenants import install, status
from app.tenants.models import Portal, PortalStatus
from tests.ingress.conftest import FORM, b24_body, make_portal


def _post(url: str, portal: Portal, token: str) -> httpx.Response:
    body = b24_body(portal.member_id, token, ts=str(time.time_ns()))
    return httpx.post(f"{url}/b24/events", content=body, headers=FORM, timeout=10)


def _warm(url: str, portal: Portal, token: str) -> None:
    """Events until the server process has subscribed and cached the portal."""
    for _ in range(5):
        assert _post(url, portal, token).status_code == 200
        time.sleep(0.1)


def test_a_new_token_counts_in_another_process_as_soon_as_its_commit_returns(app, gunicorn):
    portal = make_portal()
    old, new = portal.application_token, secrets.token_hex(16)
    _warm(gunicorn.url, portal, old)
    assert install.record_application_token(portal, new)
    db.session.commit()  # returns once every listening process dropped the portal
    assert _post(gunicorn.url, portal, old).status_code == 401
    assert _post(gunicorn.url, portal, new).status_code == 200


def test_an_uninstalled_portals_dropped_token_is_refused_in_another_process_at_once(
        app, gunicorn):
    portal = make_portal()
    token = portal.application_token
    _warm(gunicorn.url, portal, token)
    portal.status = PortalStatus.UNINSTALLED.value  # its token died with the installation
    portal.application_token = None
    db.session.commit()
    assert _post(gunicorn.url, portal, token).status_code == 401


def test_a_status_written_outside_the_session_drops_the_portal_in_every_app(app, client):
    other = create_app(dict(app.config))
    portal = make_portal()
    caches = [_cached(app, client, portal), _cached(other, other.test_client(), portal)]
    status.record(portal, PortalStatus.AUTH_FAILED, "refresh chain lost")  # a Core UPDATE
    assert all(portal.member_id not in cache.entries for cache in caches)


def _cached(application: Any, client: Any, portal: Portal) -> Any:
    """Deliver events through ``application`` until its cache holds ``portal``; the cache."""
    cache = application.extensions["ingress_portal_cache"]
    deadline = time.monotonic() + 5
    while portal.member_id not in cache.entries:
        assert time.monotonic() < deadline, "the portal was never cached"
        body = b24_body(portal.member_id, portal.application_token, ts=str(time.time_ns()))
        assert client.post("/b24/events", data=body, headers=FORM).status_code == 200
        time.sleep(0.05)
    return cache


def test_the_stored_hash_is_set_with_the_token_and_never_the_token_itself(app):
    portal = make_portal()
    stored = db.session.scalar(select(Portal.application_token_hash)
                               .where(Portal.id == portal.id))
    assert stored and portal.application_token not in stored
    assert token_hash.matches(stored, portal.application_token)
    assert not token_hash.matches(stored, portal.application_token[:-1] + "x")


def test_a_row_from_before_the_hash_is_checked_and_filled_on_first_use(app, deliver):
    portal = make_portal()
    db.session.execute(update(Portal).where(Portal.id == portal.id)
                       .values(application_token_hash=None))
    db.session.commit()
    assert deliver.b24(portal, token="forged" + portal.application_token).status_code == 401
    assert deliver.b24(portal).status_code == 200
    stored = db.session.scalar(select(Portal.application_token_hash)
                               .where(Portal.id == portal.id))
    assert token_hash.matches(stored, portal.application_token)


def test_a_hash_made_under_another_secret_key_is_made_again(app, deliver):
    portal = make_portal()
    db.session.execute(update(Portal).where(Portal.id == portal.id)
                       .values(application_token_hash="00000000:" + "ab" * 32))
    db.session.commit()
    assert deliver.b24(portal).status_code == 200
    stored = db.session.scalar(select(Portal.application_token_hash)
                               .where(Portal.id == portal.id))
    assert token_hash.current(stored) and token_hash.matches(stored, portal.application_token)
