"""OAuth errors against the stricter sandbox (issue #11 point 4): what the app moves the portal
to, what it holds, what it tells the admin and the operator.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
from prometheus_client import REGISTRY
from werkzeug.serving import make_server

from app.bitrix import errors
from app.config import ConfigError
from app.dispatcher import direct
from app.tenants import service
from app.tenants.models import PortalStatus, aware, utcnow
from app.tenants.status import PortalUnavailable
from tests.tenants.conftest import CLIENT_ID, reload_portal


def refreshes(outcome: str) -> float:
    """How many refreshes ended with ``outcome`` (b24relay_token_refreshes_total)."""
    return REGISTRY.get_sample_value("b24relay_token_refreshes_total", {"outcome": outcome}) or 0.0


def cli(app: Any, *args: str) -> str:
    """``flask portals ...``; its output (the command must succeed)."""
    result = app.test_cli_runner().invoke(args=["portals", *args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def settings_page(oauth_app: Any, sandbox_server: Any) -> Iterator[str]:
    """The app on a real loopback port, trusting the sandbox's auth server: its settings URL."""
    cloud = urlsplit(sandbox_server.url)
    oauth_app.config["B24_AUTH_SERVERS"] = f"{cloud.scheme}://{cloud.netloc}"
    server = make_server("127.0.0.1", 0, oauth_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="settings-page", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/placements/settings"
    server.shutdown()
    thread.join(10)
    server.server_close()


def open_app(sandbox: Any, member_id: str, page: str) -> str:
    """The portal's admin opens the app (DEFAULT placement); the page the app answered."""
    opened = sandbox.open_placement(member_id, "DEFAULT", handler=page)
    assert opened["status"] == 200, opened
    return opened["body"]


def expired_portal(make_portal: Any) -> tuple[Any, dict[str, Any]]:
    """A portal whose stored access token has expired: its next call refreshes first."""
    return make_portal(expires_at=utcnow() - timedelta(minutes=1))


# ---------------------------------------------------------------- NOT_INSTALLED


def test_uninstalled_chain_marks_the_portal_uninstalled_once(oauth_app, make_portal, sandbox):
    portal, info = expired_portal(make_portal)
    sandbox.uninstall_app(portal.member_id)  # its ONAPPUNINSTALL reached nobody
    before = refreshes("uninstalled")
    with pytest.raises(PortalUnavailable) as exc_info:
        direct.call_method(portal, "user.current")
    assert exc_info.value.status == PortalStatus.UNINSTALLED.value
    stored = reload_portal(portal.member_id)
    assert stored.status == PortalStatus.UNINSTALLED.value
    assert "Install it again from Bitrix24 Market" in stored.status_reason
    assert "NOT_INSTALLED" in stored.status_reason
    assert stored.refresh_token == info["refresh_token"]  # held, not dropped

    for _ in range(3):  # held: later calls and the keep-alive send nothing, retry nothing
        with pytest.raises(PortalUnavailable):
            direct.call_method(stored, "user.current")
    assert service.refresh_idle_portals(days=0) == []
    assert refreshes("uninstalled") == before + 1
    assert sandbox.counters(portal.member_id)["rest_requests"] == 0

    listed = cli(oauth_app, "list")
    assert f"{portal.member_id} " in listed and " uninstalled " in listed
    assert "Install it again from Bitrix24 Market" in cli(oauth_app, "show", portal.member_id)


# ---------------------------------------------------------------- PAYMENT_REQUIRED


def test_payment_required_from_rest_holds_until_renewed_and_an_admin_opens_the_app(
        make_portal, sandbox, settings_page):
    portal, _ = make_portal()
    member_id = portal.member_id
    sandbox.finish_install(member_id)
    sandbox.set_subscription(member_id, active=False)
    with pytest.raises(PortalUnavailable) as exc_info:
        direct.call_method(portal, "user.current")
    assert exc_info.value.status == PortalStatus.PAYMENT_REQUIRED.value
    stored = reload_portal(member_id)
    assert "Renew it in Bitrix24 Market" in stored.status_reason
    assert "PAYMENT_REQUIRED" in stored.status_reason
    sent = sandbox.counters(member_id)["rest_requests"]
    with pytest.raises(PortalUnavailable):
        direct.call_method(stored, "user.current")
    assert sandbox.counters(member_id)["rest_requests"] == sent

    page = open_app(sandbox, member_id, settings_page)  # still unpaid: told why, still held
    assert 'data-status="payment_required"' in page and "Renew it in Bitrix24 Market" in page
    assert reload_portal(member_id).status == PortalStatus.PAYMENT_REQUIRED.value

    sandbox.set_subscription(member_id, active=True)
    page = open_app(sandbox, member_id, settings_page)
    assert "The app is connected again." in page and 'data-status="active"' in page
    stored = reload_portal(member_id)
    assert stored.status == PortalStatus.ACTIVE.value and stored.status_reason is None
    assert direct.call_method(stored, "user.current")["ID"] == "1"


def test_payment_required_from_the_token_endpoint_keeps_the_chain(make_portal, sandbox):
    portal, info = expired_portal(make_portal)
    sandbox.set_subscription(portal.member_id, active=False)
    before = refreshes("payment_required")
    with pytest.raises(PortalUnavailable) as exc_info:
        direct.call_method(portal, "user.current")
    assert exc_info.value.status == PortalStatus.PAYMENT_REQUIRED.value
    assert isinstance(exc_info.value.__cause__, errors.PaymentRequired)
    stored = reload_portal(portal.member_id)
    assert "Renew it in Bitrix24 Market" in stored.status_reason
    assert (stored.refresh_token, stored.token_version) == (info["refresh_token"], 1)
    assert stored.refresh_started_at is None  # answered: nothing rotated, nothing in doubt
    assert refreshes("payment_required") == before + 1
    assert sandbox.counters(portal.member_id)["rest_requests"] == 0

    sandbox.set_subscription(portal.member_id, active=True)
    service.set_status(stored, PortalStatus.ACTIVE)  # what an admin's open (above) also does
    assert direct.call_method(stored, "user.current")["ID"] == "1"  # the kept chain lives
    assert reload_portal(portal.member_id).token_version == 2


# ---------------------------------------------------------------- wrong_client


def test_wrong_client_is_our_misconfiguration_not_the_tenants(oauth_app, make_portal, sandbox,
                                                             caplog):
    portal, info = expired_portal(make_portal)
    oauth_app.config["B24_CLIENT_ID"] = "app.not-registered"
    before = refreshes("client_rejected")
    with caplog.at_level(logging.ERROR, logger="app.tenants.tokens"):
        with pytest.raises(errors.InvalidClient, match="wrong_client"):
            direct.call_method(portal, "user.current")
        assert service.refresh_idle_portals(days=0) == []  # the keep-alive is refused alike
    stored = reload_portal(portal.member_id)
    assert (stored.status, stored.status_reason) == (PortalStatus.ACTIVE.value, None)
    assert (stored.refresh_token, stored.token_version) == (info["refresh_token"], 1)
    assert stored.refresh_started_at is None
    errors_logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors_logged) == 2 and portal.member_id in errors_logged[0]
    assert "B24_CLIENT_ID" in errors_logged[0] and "wrong_client" in errors_logged[0]
    assert refreshes("client_rejected") == before + 2

    oauth_app.config["B24_CLIENT_ID"] = CLIENT_ID  # the operator fixes the setting
    assert direct.call_method(stored, "user.current")["ID"] == "1"
    assert reload_portal(portal.member_id).token_version == 2


# ---------------------------------------------------------------- 180 days


def aged_portal(make_portal: Any, sandbox: Any, days: int) -> Any:
    """A portal whose chain was issued ``days`` ago and never used since, on both sides."""
    ago = utcnow() - timedelta(days=days)
    portal, _ = make_portal(installed_at=ago, last_refresh_at=ago, last_activity_at=ago,
                            expires_at=ago + timedelta(hours=1))
    sandbox.age_tokens(portal.member_id, days)
    return portal


def test_keep_alive_renews_a_chain_idle_175_days_for_another_180(oauth_app, make_portal,
                                                                  sandbox):
    portal = aged_portal(make_portal, sandbox, 175)
    in_5_days = (utcnow() + timedelta(days=5)).strftime("%Y-%m-%d")
    assert f"refresh token dies:       {in_5_days}" in cli(oauth_app, "show", portal.member_id)
    assert service.refresh_idle_portals() == [portal.member_id]
    stored = reload_portal(portal.member_id)
    assert stored.token_version == 2
    assert utcnow() - aware(stored.last_refresh_at) < timedelta(minutes=1)

    sandbox.age_tokens(portal.member_id, 10)  # 185 days after the first chain's issue
    assert direct.call_method(stored, "user.current")["ID"] == "1"
    assert reload_portal(portal.member_id).token_version == 3  # expired access, live refresh
    in_180_days = (utcnow() + timedelta(days=180)).strftime("%Y-%m-%d")
    assert in_180_days in cli(oauth_app, "show", portal.member_id)


def test_a_chain_idle_181_days_is_lost_and_the_admin_is_told_to_reconnect(make_portal, sandbox):
    portal = aged_portal(make_portal, sandbox, 181)
    before = refreshes("chain_lost")
    assert service.refresh_idle_portals() == []
    stored = reload_portal(portal.member_id)
    assert stored.status == PortalStatus.AUTH_FAILED.value
    assert "Open the app in Bitrix24 once as an administrator" in stored.status_reason
    assert "invalid_grant Refresh token expired" in stored.status_reason
    assert refreshes("chain_lost") == before + 1
    with pytest.raises(PortalUnavailable):
        direct.call_method(stored, "user.current")
    assert sandbox.counters(portal.member_id)["rest_requests"] == 0


@pytest.mark.parametrize("days", ["0", "179", "151"])
def test_an_idle_threshold_the_180_day_tokens_cannot_survive_is_refused(make_app, days):
    with pytest.raises(ConfigError, match="IDLE_REFRESH_DAYS must be 1..150"):
        make_app(IDLE_REFRESH_DAYS=int(days))
