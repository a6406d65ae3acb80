"""OAuth: rotation, reuse, client checks, expiry, the authorization-code grant, auth-server
app.info.
"""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

from .conftest import call, refresh


def test_refresh_rotates_and_kills_the_old_pair(sandbox, portal, http):
    resp = refresh(http, sandbox, portal["refresh_token"])
    assert resp.status_code == 200
    body = resp.json()
    # documented answer shape (§1.4), field order included
    assert list(body) == [
        "access_token",
        "expires",
        "expires_in",
        "scope",
        "domain",
        "server_endpoint",
        "status",
        "client_endpoint",
        "member_id",
        "user_id",
        "refresh_token",
    ]
    assert body["domain"] == sandbox.base_url.split("//")[1]  # the auth server, not the portal
    assert body["client_endpoint"] == portal["client_endpoint"]
    assert (
        body["expires_in"] == 3600
        and body["member_id"] == portal["member_id"]
        and body["user_id"] == 1
    )
    old = call(http, portal, "profile")
    assert old.status_code == 401 and old.json()["error"] == "invalid_token"
    assert call(http, portal, "profile", body["access_token"]).status_code == 200
    assert sandbox.counters(portal["member_id"])["refreshes"] == 1


def test_reused_refresh_token_is_invalid_grant_and_revokes_the_chain(sandbox, portal, http):
    first = refresh(http, sandbox, portal["refresh_token"]).json()
    again = refresh(http, sandbox, portal["refresh_token"])
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    assert sandbox.counters(portal["member_id"])["violations"]["refresh_token_reuse"] == 1
    # stricter reading of an UNCONFIRMED rule: reuse also kills the newer pair
    assert call(http, portal, "profile", first["access_token"]).json()["error"] == "invalid_token"
    assert refresh(http, sandbox, first["refresh_token"]).json()["error"] == "invalid_grant"


def test_bad_client_and_missing_parameter(sandbox, portal, http):
    bad = refresh(http, sandbox, portal["refresh_token"], secret="wrong")
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_client"
    missing = http.get(sandbox.base_url + "/oauth/token/", params={"grant_type": "refresh_token"})
    assert missing.status_code == 400 and missing.json()["error"] == "invalid_request"
    # the bad-client attempt did not spend the token
    assert refresh(http, sandbox, portal["refresh_token"]).status_code == 200


def test_post_form_is_accepted(sandbox, portal, http):
    resp = http.post(
        sandbox.base_url + "/oauth/token/",
        data={
            "grant_type": "refresh_token",
            "client_id": "app.sandbox",
            "client_secret": "sandbox-secret",
            "refresh_token": portal["refresh_token"],
        },
    )
    assert resp.status_code == 200 and resp.json()["access_token"]


def test_expired_token_then_refresh(sandbox, portal, http):
    sandbox.expire_tokens(portal["member_id"])
    resp = call(http, portal, "profile")
    assert resp.status_code == 401
    assert resp.json() == {
        "error": "expired_token",
        "error_description": "The access token provided has expired.",
    }
    new = refresh(http, sandbox, portal["refresh_token"]).json()
    assert call(http, portal, "profile", new["access_token"]).status_code == 200


def test_token_ttl_setting(sandbox, http):
    sandbox.settings(token_ttl=1)
    p = sandbox.create_portal()
    assert call(http, p, "profile").status_code == 200
    time.sleep(1.1)
    assert call(http, p, "profile").json()["error"] == "expired_token"


def test_unknown_and_missing_token(portal, http):
    assert call(http, portal, "profile", "nope").json()["error"] == "invalid_token"
    resp = http.post(portal["client_endpoint"] + "profile", json={})
    assert resp.status_code == 401 and resp.json()["error"] == "NO_AUTH_FOUND"


def test_authorization_code_grant(sandbox, http):
    p = sandbox.create_portal(app_url="http://127.0.0.1:9/app")
    domain = p["domain"]
    resp = http.get(
        f"http://{domain}/oauth/authorize/", params={"client_id": "app.sandbox", "state": "xyz"}
    )
    assert resp.status_code == 302
    loc = urlsplit(resp.headers["location"])
    assert loc.path == "/app/oauth/callback"
    q = {k: v[0] for k, v in parse_qs(loc.query).items()}
    assert q["state"] == "xyz" and q["domain"] == domain and q["member_id"] == p["member_id"]
    assert q["server_domain"] == sandbox.base_url.split("//")[1] and q["scope"] == p["scope"]
    params = {
        "grant_type": "authorization_code",
        "client_id": "app.sandbox",
        "client_secret": "sandbox-secret",
        "code": q["code"],
    }
    body = http.get(sandbox.base_url + "/oauth/token/", params=params).json()
    assert body["client_endpoint"] == p["client_endpoint"] and "expires" not in body
    assert (
        http.get(sandbox.base_url + "/oauth/token/", params=params).json()["error"]
        == "invalid_grant"
    )
    assert (
        http.get(f"http://{domain}/oauth/authorize/", params={"client_id": "other"}).status_code
        == 400
    )


def test_authorization_code_expires(sandbox, http):
    sandbox.settings(code_ttl=0.2)
    p = sandbox.create_portal(app_url="http://127.0.0.1:9")
    loc = http.get(
        f"http://{p['domain']}/oauth/authorize/", params={"client_id": "app.sandbox"}
    ).headers["location"]
    code = parse_qs(urlsplit(loc).query)["code"][0]
    time.sleep(0.3)
    resp = http.get(
        sandbox.base_url + "/oauth/token/",
        params={
            "grant_type": "authorization_code",
            "client_id": "app.sandbox",
            "client_secret": "sandbox-secret",
            "code": code,
        },
    )
    assert resp.json()["error"] == "invalid_grant"


def test_auth_server_app_info(sandbox, portal, http):
    resp = http.get(portal["server_endpoint"] + "app.info", params={"auth": portal["access_token"]})
    result = resp.json()["result"]
    assert result["client_id"] == "app.sandbox" and result["user_id"] == 1
    assert result["install"]["member_id"] == portal["member_id"]
    assert result["install"]["client_endpoint"] == portal["client_endpoint"]
    assert http.get(portal["server_endpoint"] + "app.info", params={"auth": "x"}).status_code == 401
