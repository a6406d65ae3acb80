"""Who may frame the pages the portal shows: only a portal the app verified or already knows.

An attacker can POST our installer or a placement with any ``DOMAIN`` in the
query; before anything is verified, that DOMAIN must not decide who frames the
answer. The pages are fetched over real HTTP from the live app; the portals are
the sandbox's.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from tests.install.conftest import LiveApp, iframe_form, portal_count

NOBODY = "frame-ancestors 'none'"


def _iframe_post(live_app: LiveApp, path: str, portal: dict[str, Any], domain: str,
                 protocol: str = "0", **form: str) -> httpx.Response:
    """The iframe POST a portal makes (query and form as in protocol §2.3), fields overridable."""
    query = urlencode({"DOMAIN": domain, "PROTOCOL": protocol, "LANG": "en", "APP_SID": "x"})
    fields = {"AUTH_ID": portal["access_token"], "AUTH_EXPIRES": "3600",
              "REFRESH_ID": portal["refresh_token"], "member_id": portal["member_id"],
              "status": "P", "PLACEMENT": "DEFAULT",
              # the long form's extras, where the portal has them (the short form has not)
              "SERVER_ENDPOINT": portal.get("server_endpoint") or "",
              "APPLICATION_TOKEN": portal.get("application_token") or "", **form}
    with live_app.http() as http:
        return http.post(f"{path}?{query}", data={k: v for k, v in fields.items() if v})


def _assert_framed_by_nobody(resp: httpx.Response) -> None:
    assert resp.headers["Content-Security-Policy"] == NOBODY
    assert resp.headers["X-Frame-Options"] == "DENY"


@pytest.mark.parametrize("auth_id", ["forged0123", None], ids=["forged-token", "real-token"])
def test_an_install_naming_a_made_up_domain_is_framed_by_nobody(make_portal, live_app, auth_id):
    portal = make_portal()
    form = {"AUTH_ID": auth_id} if auth_id else {}
    resp = _iframe_post(live_app, "/install", portal, "attacker.example", **form)
    assert resp.status_code in (401, 403), resp.text  # verification failed either way
    _assert_framed_by_nobody(resp)
    assert portal_count() == 0


def test_a_failing_install_from_a_known_portal_is_framed_by_that_portal_only(installed,
                                                                           live_app):
    # The query says https; the portal the app knows (verified at install) is on http.
    resp = _iframe_post(live_app, "/install", installed, installed["domain"], protocol="1",
                        AUTH_ID="forged0123")
    assert resp.status_code == 401
    assert resp.headers["Content-Security-Policy"] == \
        f"frame-ancestors http://{installed['domain']}"
    assert "X-Frame-Options" not in resp.headers


def test_a_successful_install_is_framed_by_the_verified_origin(make_portal, live_app):
    portal = make_portal()
    resp = _iframe_post(live_app, "/install", portal, portal["domain"], protocol="1")
    assert resp.status_code == 200 and "installFinish" in resp.text
    # app.info named http://<domain>; the query's PROTOCOL=1 does not make it https.
    assert resp.headers["Content-Security-Policy"] == f"frame-ancestors http://{portal['domain']}"
    assert "X-Frame-Options" not in resp.headers


@pytest.mark.parametrize("path", ["/placements/settings", "/placements/dashboard"])
def test_a_placement_naming_a_made_up_domain_is_framed_by_nobody(installed, live_app, path):
    resp = _iframe_post(live_app, path, installed, "attacker.example", AUTH_ID="forged0123")
    assert resp.status_code == 401
    _assert_framed_by_nobody(resp)


def test_a_placement_refusal_for_a_known_portal_is_framed_by_it(sandbox, installed, live_app):
    url, form = iframe_form(sandbox.open_placement(installed["member_id"]))
    form["AUTH_ID"] = "forged0123"
    resp = httpx.post(url.replace("PROTOCOL=0", "PROTOCOL=1"), data=form, timeout=30)
    assert resp.status_code == 401
    assert resp.headers["Content-Security-Policy"] == \
        f"frame-ancestors http://{installed['domain']}"


def test_pages_outside_the_iframe_may_not_be_framed(installed, live_app):
    with live_app.http() as http:
        _assert_framed_by_nobody(http.get("/placements/settings"))  # opened outside the portal
        _assert_framed_by_nobody(http.get("/oauth/start"))  # the OAuth flow runs top-level
        _assert_framed_by_nobody(http.post("/placements/settings", data={"form_token": "x.y.z"}))
