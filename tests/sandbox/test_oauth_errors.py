"""OAuth errors the app must handle (issue #11 point 4): the sandbox is as strict as Bitrix24.

After an uninstall the old chain gets NOT_INSTALLED; a lapsed subscription answers
PAYMENT_REQUIRED from the token endpoint and REST and sends no events; a wrong client_id
gets HTTP 200 with ``wrong_client``; refresh tokens die 180 days after issue.
"""

from __future__ import annotations

import pytest

from sandbox.client import SandboxError

from .conftest import SECRET, call, refresh


def grant_code(http, sandbox, portal, client_id="app.sandbox"):
    """An authorization code through the portal's authorize page, exchanged as ``client_id``."""
    page = http.get(portal["client_endpoint"].replace("/rest/", "/oauth/authorize/"),
                    params={"client_id": "app.sandbox", "state": "s"})
    code = page.text.split("<code>")[1].split("</code>")[0]
    return http.get(sandbox.base_url + "/oauth/token/", params={
        "grant_type": "authorization_code", "client_id": client_id,
        "client_secret": SECRET, "code": code})


def test_after_uninstall_the_old_chain_gets_not_installed(sandbox, portal, http):
    sandbox.uninstall_app(portal["member_id"])
    spent = refresh(http, sandbox, portal["refresh_token"])
    assert (spent.status_code, spent.json()) == (
        401, {"error": "NOT_INSTALLED", "error_description": "Application not installed"})
    rest = call(http, portal, "profile")
    assert (rest.status_code, rest.json()["error"]) == (401, "NOT_INSTALLED")


def test_lapsed_subscription_refuses_tokens_and_rest_until_renewed(sandbox, portal, http):
    described = sandbox.set_subscription(portal["member_id"], active=False)
    assert described["subscription_active"] is False
    lapsed = refresh(http, sandbox, portal["refresh_token"])
    assert (lapsed.status_code, lapsed.json()) == (
        401, {"error": "PAYMENT_REQUIRED", "error_description": "Subscription has been ended"})
    rest = call(http, portal, "profile")
    assert (rest.status_code, rest.json()["error"]) == (401, "PAYMENT_REQUIRED")
    assert grant_code(http, sandbox, portal).json()["error"] == "PAYMENT_REQUIRED"

    sandbox.set_subscription(portal["member_id"], active=True)
    assert call(http, portal, "profile").status_code == 200
    renewed = refresh(http, sandbox, portal["refresh_token"])  # the refusal spent nothing
    assert renewed.status_code == 200 and renewed.json()["access_token"]


def test_lapsed_subscription_sends_no_events(sandbox, fake_app, http):
    portal = sandbox.create_portal(app_url=fake_app.url)
    sandbox.finish_install(portal["member_id"])
    bound = call(http, portal, "event.bind", event="ONCRMDEALUPDATE",
                 handler=fake_app.url + "/events")
    assert bound.json()["result"] is True
    data = {"FIELDS": {"ID": "7"}}

    sandbox.set_subscription(portal["member_id"], active=False)
    assert sandbox.trigger_event(portal["member_id"], "ONCRMDEALUPDATE", data)["statuses"] == []
    assert fake_app.paths("/events") == []
    assert sandbox.counters(portal["member_id"])["events_suppressed"] == 1

    sandbox.set_subscription(portal["member_id"], active=True)
    assert sandbox.trigger_event(portal["member_id"], "ONCRMDEALUPDATE", data)["statuses"] == [200]
    assert len(fake_app.paths("/events")) == 1


def test_wrong_client_id_gets_http_200_with_wrong_client(sandbox, portal, http):
    for token in (portal["refresh_token"], "unknown-refresh-token"):
        wrong = http.get(sandbox.base_url + "/oauth/token/", params={
            "grant_type": "refresh_token", "client_id": "app.not-ours",
            "client_secret": SECRET, "refresh_token": token})
        assert (wrong.status_code, wrong.json()) == (
            200, {"error": "wrong_client", "error_description": "Wrong client"})
    assert grant_code(http, sandbox, portal, client_id="app.not-ours").json() == {
        "error": "wrong_client", "error_description": "Wrong client"}
    # a wrong secret with the right client_id stays 400 invalid_client
    bad_secret = refresh(http, sandbox, portal["refresh_token"], secret="not-the-secret")
    assert (bad_secret.status_code, bad_secret.json()["error"]) == (400, "invalid_client")
    assert refresh(http, sandbox, portal["refresh_token"]).status_code == 200  # nothing spent


def test_refresh_token_dies_180_days_after_issue(sandbox, portal, http):
    moved = sandbox.age_tokens(portal["member_id"], 179)
    assert moved["moved"]["refresh"] == 1 and moved["moved"]["access"] == 1
    assert call(http, portal, "profile").json()["error"] == "expired_token"
    kept = refresh(http, sandbox, portal["refresh_token"])
    assert kept.status_code == 200
    chain = {**portal, **kept.json()}

    sandbox.age_tokens(portal["member_id"], 10)  # 189 days after the first, 10 after this one
    assert call(http, chain, "profile").json()["error"] == "expired_token"
    again = refresh(http, sandbox, chain["refresh_token"])
    assert again.status_code == 200

    sandbox.age_tokens(portal["member_id"], 180)
    dead = refresh(http, sandbox, again.json()["refresh_token"])
    assert (dead.status_code, dead.json()) == (
        400, {"error": "invalid_grant", "error_description": "Refresh token expired"})


def test_refresh_ttl_setting_and_aged_codes(sandbox, portal, http):
    sandbox.settings(refresh_ttl=30 * 86_400)  # the 2020 course's 28-30 days, say
    sandbox.age_tokens(portal["member_id"], 31)
    assert refresh(http, sandbox, portal["refresh_token"]).json()["error"] == "invalid_grant"
    page = http.get(portal["client_endpoint"].replace("/rest/", "/oauth/authorize/"),
                    params={"client_id": "app.sandbox"})
    code = page.text.split("<code>")[1].split("</code>")[0]
    sandbox.age_tokens(portal["member_id"], 1 / 86_400 * 31)  # 31 s: past the 30 s code life
    late = http.get(sandbox.base_url + "/oauth/token/", params={
        "grant_type": "authorization_code", "client_id": "app.sandbox",
        "client_secret": SECRET, "code": code})
    assert late.json()["error"] == "invalid_grant"


@pytest.mark.parametrize("body", [{"days": -1}, {}])
def test_age_tokens_refuses_nonsense(sandbox, portal, body):
    with pytest.raises(SandboxError, match="400"):
        sandbox._call("POST", f"/portals/{portal['member_id']}/age_tokens", body)
