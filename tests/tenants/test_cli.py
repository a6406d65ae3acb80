"""`flask portals ...` through Flask's CLI runner against the real database and sandbox."""

from __future__ import annotations

from app.dispatcher import direct
from app.tenants.models import PortalStatus
from tests.tenants.conftest import reload_portal


def _run(app, *args):
    result = app.test_cli_runner().invoke(args=["portals", *args])
    return result.exit_code, result.output


def test_list_and_show(oauth_app, make_portal):
    assert _run(oauth_app, "list") == (0, "no portals\n")
    portal, info = make_portal()
    code, out = _run(oauth_app, "list")
    assert code == 0 and portal.member_id in out and info["domain"] in out and "active" in out
    code, out = _run(oauth_app, "show", portal.member_id)
    assert code == 0
    assert info["client_endpoint"] in out and "token version:" in out
    assert info["access_token"] not in out and info["refresh_token"] not in out  # no secrets
    code, out = _run(oauth_app, "show", "nope")
    assert code == 1 and "no portal with member_id nope" in out


def test_refresh_spends_the_chain_once(oauth_app, make_portal, sandbox):
    portal, _ = make_portal()
    code, out = _run(oauth_app, "refresh", portal.member_id)
    assert code == 0, out
    assert "token version 2" in out
    assert sandbox.counters(portal.member_id)["refreshes"] == 1
    assert direct.call_method(reload_portal(portal.member_id), "user.current")["ID"] == "1"


def test_disable_holds_calls_and_enable_resumes(oauth_app, make_portal, sandbox):
    portal, _ = make_portal()
    code, out = _run(oauth_app, "disable", portal.member_id, "--reason", "customer asked")
    assert code == 0 and "disabled" in out
    code, out = _run(oauth_app, "show", portal.member_id)
    assert "disabled" in out and "customer asked" in out
    code, out = _run(oauth_app, "refresh", portal.member_id)
    assert code == 1 and "disabled" in out
    assert sandbox.counters(portal.member_id)["rest_requests"] == 0
    assert sandbox.counters(portal.member_id)["refreshes"] == 0

    assert _run(oauth_app, "enable", portal.member_id)[0] == 0
    stored = reload_portal(portal.member_id)
    assert stored.status == PortalStatus.ACTIVE.value and stored.status_reason is None
    assert direct.call_method(stored, "user.current")["ID"] == "1"
