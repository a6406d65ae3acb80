"""call_method / call_batch against the sandbox portal over real HTTP."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text

from app.crypto import DecryptionError
from app.dispatcher import direct
from app.extensions import db
from app.tenants import service
from app.tenants.models import utcnow
from tests.tenants.conftest import CLIENT_ID, CLIENT_SECRET, reload_portal


def test_call_method_returns_result_and_records_activity(make_portal, sandbox):
    portal, _ = make_portal()
    assert portal.last_activity_at is None
    me = direct.call_method(portal, "user.current")
    assert me["ID"] == "1"
    assert reload_portal(portal.member_id).last_activity_at is not None
    assert sandbox.counters(portal.member_id)["refreshes"] == 0


def test_expired_token_refreshes_once_and_retries(make_portal, sandbox):
    portal, info = make_portal()
    sandbox.expire_tokens(portal.member_id)
    me = direct.call_method(portal, "user.current")
    assert me["ID"] == "1"
    assert sandbox.counters(portal.member_id)["refreshes"] == 1
    stored = reload_portal(portal.member_id)
    assert stored.token_version == 2
    assert stored.access_token != info["access_token"]
    assert stored.refresh_token != info["refresh_token"]
    assert stored.refresh_started_at is None and stored.last_refresh_at is not None
    # the new pair works without another refresh
    assert direct.call_method(stored, "user.current")["ID"] == "1"
    assert sandbox.counters(portal.member_id)["refreshes"] == 1


def test_stored_expiry_past_refreshes_before_calling(make_portal, sandbox):
    portal, _ = make_portal()
    portal.expires_at = utcnow() - timedelta(seconds=5)
    db.session.commit()
    direct.call_method(portal, "user.current")
    counters = sandbox.counters(portal.member_id)
    assert counters["refreshes"] == 1
    assert counters["status_401"] == 0  # nothing was sent with the stale token


def test_refreshed_tokens_are_stored_encrypted(make_portal, sandbox, make_app):
    portal, _ = make_portal()
    sandbox.expire_tokens(portal.member_id)
    direct.call_method(portal, "user.current")
    stored = reload_portal(portal.member_id)
    plain = (stored.access_token, stored.refresh_token)
    raw = db.session.execute(text("SELECT access_token, refresh_token FROM portals WHERE id = :id"),
                             {"id": stored.id}).one()
    for cipher_text, secret in zip(raw, plain, strict=True):
        assert secret not in cipher_text
    db.session.remove()
    with make_app(TOKEN_ENCRYPTION_KEY=Fernet.generate_key().decode()).app_context():
        with pytest.raises(DecryptionError):
            service.get_portal(portal.member_id).refresh_token  # noqa: B018
        db.session.remove()


def test_a_refresh_writes_no_secret_to_the_logs(make_portal, sandbox, caplog):
    portal, info = make_portal()
    sandbox.expire_tokens(portal.member_id)
    with caplog.at_level(logging.INFO):
        direct.call_method(portal, "user.current")
    assert sandbox.counters(portal.member_id)["refreshes"] == 1
    stored = reload_portal(portal.member_id)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (CLIENT_SECRET, info["refresh_token"], stored.refresh_token,
                   stored.access_token):
        assert secret not in logged


def test_redis_failure_after_a_successful_call_does_not_fail_it(make_portal, sandbox, make_app):
    portal, _ = make_portal()
    member_id = portal.member_id
    broken = make_app(REDIS_URL="redis://127.0.0.1:1/0", B24_CLIENT_ID=CLIENT_ID,
                      B24_CLIENT_SECRET=CLIENT_SECRET)
    with broken.app_context():
        fresh = service.get_portal(member_id)
        assert direct.call_method(fresh, "user.current")["ID"] == "1"
        db.session.remove()
