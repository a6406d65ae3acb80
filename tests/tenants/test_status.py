"""The status machine: what Bitrix24 answers moves the portal, and held portals send nothing."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from app.bitrix import errors
from app.dispatcher import direct
from app.extensions import db
from app.tenants import service
from app.tenants.models import PortalStatus
from app.tenants.status import PortalUnavailable
from tests.tenants.conftest import reload_portal


@pytest.mark.parametrize(("fault", "status", "hint"), [
    ("portal_deleted", PortalStatus.PORTAL_DELETED, "deleted"),
    ("payment_required", PortalStatus.PAYMENT_REQUIRED, "Renew it"),
    ("access_denied", PortalStatus.ACCESS_DENIED, "access rights"),
    ("not_installed", PortalStatus.UNINSTALLED, "Install it again"),
])
def test_error_moves_portal_and_holds_later_calls(make_portal, sandbox, fault, status, hint):
    portal, _ = make_portal()
    sandbox.set_fault(portal.member_id, fault, count=1)
    with pytest.raises(PortalUnavailable) as exc_info:
        direct.call_method(portal, "user.current")
    assert isinstance(exc_info.value.__cause__, errors.ApiError)
    stored = reload_portal(portal.member_id)
    assert stored.status == status.value
    assert hint in stored.status_reason
    sent = sandbox.counters(portal.member_id)["rest_requests"]
    with pytest.raises(PortalUnavailable):
        direct.call_method(stored, "user.current")
    assert sandbox.counters(portal.member_id)["rest_requests"] == sent  # held: nothing sent


def test_deleted_portal_becomes_portal_deleted(make_portal, sandbox):
    portal, _ = make_portal()
    sandbox.delete_portal(portal.member_id)
    with pytest.raises(PortalUnavailable):
        direct.call_batch(portal, {"me": ("user.current", {})})
    assert reload_portal(portal.member_id).status == PortalStatus.PORTAL_DELETED.value


def test_missing_scope_becomes_access_denied(make_portal):
    portal, _ = make_portal(scope="crm,user_basic")  # granted without telephony
    with pytest.raises(PortalUnavailable):
        direct.call_method(portal, "telephony.externalLine.get")
    stored = reload_portal(portal.member_id)
    assert stored.status == PortalStatus.ACCESS_DENIED.value
    assert "insufficient_scope" in stored.status_reason


def test_batch_command_errors_do_not_change_status(make_portal):
    portal, _ = make_portal()
    result = direct.call_batch(portal, {"me": ("user.current", {}),
                                         "bad": ("no.such.method", {"x": 1})})
    assert result.results["me"]["ID"] == "1"
    assert isinstance(result.errors["bad"], errors.MethodNotFound)
    assert reload_portal(portal.member_id).status == PortalStatus.ACTIVE.value


def test_invalid_grant_marks_auth_failed_and_a_new_chain_recovers(make_portal, sandbox):
    portal, _ = make_portal()
    portal.refresh_token = "not-a-live-refresh-token"
    db.session.commit()
    sandbox.expire_tokens(portal.member_id)
    with pytest.raises(PortalUnavailable) as exc_info:
        direct.call_method(portal, "user.current")
    assert exc_info.value.status == PortalStatus.AUTH_FAILED.value
    stored = reload_portal(portal.member_id)
    assert stored.status == PortalStatus.AUTH_FAILED.value
    assert "Open the app in Bitrix24 once as an administrator" in stored.status_reason
    assert stored.refresh_token == "not-a-live-refresh-token"  # held, not dropped

    fresh = sandbox.issue_tokens(portal.member_id)  # what the next admin iframe open carries
    service.store_new_chain(stored, access_token=fresh["access_token"],
                            refresh_token=fresh["refresh_token"], expires_in=3600,
                            user_id=fresh["user_id"])
    stored = reload_portal(portal.member_id)
    assert stored.status == PortalStatus.ACTIVE.value and stored.status_reason is None
    assert stored.auth_user_id == fresh["user_id"]
    assert direct.call_method(stored, "user.current")["ID"] == "1"


def test_rename_302_updates_endpoints_and_repeats_the_call(make_portal, sandbox):
    portal, info = make_portal()
    moved = sandbox.rename_portal(portal.member_id)
    assert moved["client_endpoint"] != info["client_endpoint"]
    assert direct.call_method(portal, "user.current")["ID"] == "1"
    stored = reload_portal(portal.member_id)
    assert stored.client_endpoint == moved["client_endpoint"]
    assert stored.domain == moved["domain"]
    log = sandbox.log(portal.member_id, method="user.current")
    assert len(log) == 1  # the 302 ran nothing; the repeat ran once on the new host


def test_set_status_and_held_portal(make_portal, sandbox):
    portal, _ = make_portal()
    service.set_status(portal, PortalStatus.DISABLED, "maintenance")
    with pytest.raises(PortalUnavailable, match="maintenance"):
        direct.call_method(portal, "user.current")
    assert sandbox.counters(portal.member_id)["rest_requests"] == 0


def test_new_chain_clears_auth_failed_set_by_another_process(make_portal, sandbox):
    portal, _ = make_portal()  # in memory: active
    with db.engine.begin() as conn:  # another process lost the chain meanwhile
        conn.execute(text("UPDATE portals SET status = 'auth_failed', status_reason = 'lost'"))
    fresh = sandbox.issue_tokens(portal.member_id)
    service.store_new_chain(portal, access_token=fresh["access_token"],
                            refresh_token=fresh["refresh_token"], expires_in=3600)
    stored = reload_portal(portal.member_id)
    assert (stored.status, stored.status_reason) == (PortalStatus.ACTIVE.value, None)


def test_new_chain_keeps_other_held_states_unless_the_caller_sets_one(make_portal, sandbox):
    portal, _ = make_portal()
    service.set_status(portal, PortalStatus.UNINSTALLED)
    fresh = sandbox.issue_tokens(portal.member_id)
    service.store_new_chain(portal, access_token=fresh["access_token"],
                            refresh_token=fresh["refresh_token"], expires_in=3600)
    assert reload_portal(portal.member_id).status == PortalStatus.UNINSTALLED.value
    portal.status = PortalStatus.ACTIVE.value  # a reinstall decides for itself
    service.store_new_chain(portal, access_token=fresh["access_token"],
                            refresh_token=fresh["refresh_token"], expires_in=3600)
    assert reload_portal(portal.member_id).status == PortalStatus.ACTIVE.value
