"""The short iframe form real portals send (protocol §2.3), end to end against the sandbox.

Install from it, the ONAPPINSTALL its installFinish sends (the application token's
only source then) through a real worker, then events verified and the settings page
open. The rest of tests/install runs with both forms (``form_kind`` in conftest);
here every portal sends the short one.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

import httpx
import pytest
from sqlalchemy import func, select

from app.extensions import db
from app.ingress.models import InboxEvent
from app.installation import install, verify
from app.tenants.models import Portal
from sandbox.appsetup import free_port
from tests.conftest import wait_for
from tests.install.conftest import iframe_form, portal_row, process_queued

SHORT_FORM = ["AUTH_ID", "AUTH_EXPIRES", "REFRESH_ID", "member_id", "status", "PLACEMENT"]
MADE_UP = "e" * 32


@pytest.fixture
def form_kind() -> str:
    """Every portal in this module sends the short form."""
    return "short"


def _rows(event_type: str, status: str | None = None) -> int:
    db.session.remove()
    query = select(func.count(InboxEvent.id)).where(InboxEvent.event_type == event_type)
    if status:
        query = query.where(InboxEvent.status == status)
    return int(db.session.scalar(query) or 0)


def _post_event(live_app, portal: dict, event: str, application_token: str) -> httpx.Response:
    """A Bitrix24-shaped event for ``portal`` carrying the given application token."""
    body = urlencode({"event": event, "data[FIELDS][ID]": "7", "ts": "1",
                      "auth[domain]": portal["domain"], "auth[member_id]": portal["member_id"],
                      "auth[application_token]": application_token})
    with live_app.http() as http:
        return http.post("/b24/events", content=body,
                         headers={"Content-Type": "application/x-www-form-urlencoded"})


def test_short_form_install_then_onappinstall_then_events_and_the_settings_page(
        sandbox, make_portal, live_app, start_worker):
    start_worker(threads=2, **live_app.worker_env())
    portal = make_portal()
    member_id = portal["member_id"]

    out = sandbox.install_app(member_id, live_app.url)
    assert out["status"] == 200, out["body"]
    assert [k for k, _ in parse_qsl(out["form"])] == SHORT_FORM  # no token, no server named
    # The installer bound ONAPPINSTALL before installFinish (the page's, here the control call).
    [onappinstall] = sandbox.finish_install(member_id)["onappinstall"]
    assert onappinstall["status"] == 200

    row = wait_for(lambda: (r := portal_row(member_id)) and r.application_token and r,
                   timeout=30)
    assert row.application_token == portal["application_token"]
    assert row.refresh_token == onappinstall["tokens"]["refresh_token"]
    assert row.server_endpoint == portal["server_endpoint"]  # the configured auth server
    assert row.status == "active"

    # A Bitrix24 event for the portal is accepted, stored and handled.
    sent = sandbox.trigger_event(member_id, "ONUSERADD", {"FIELDS": {"ID": "2"}})
    assert sent["statuses"] == [200]
    wait_for(lambda: _rows("ONUSERADD", "done") == 1, timeout=30)

    # A forged one is refused and nothing is stored.
    assert _post_event(live_app, portal, "ONCRMDEALUPDATE", MADE_UP).status_code == 401
    assert _rows("ONCRMDEALUPDATE") == 0

    # The settings page opens for the admin, from the short form too.
    opened = sandbox.open_placement(member_id)
    assert opened["status"] == 200
    assert [k for k, _ in parse_qsl(opened["form"])] == SHORT_FORM
    assert 'data-status="active"' in opened["body"] and 'name="form_token"' in opened["body"]


def test_a_placement_form_cannot_set_the_application_token(sandbox, make_portal, live_app):
    portal = make_portal()
    member_id = portal["member_id"]
    assert sandbox.install_app(member_id, live_app.url)["status"] == 200
    sandbox.finish_install(member_id)  # what the installer page's script does
    assert portal_row(member_id).application_token is None  # ONAPPINSTALL not processed yet

    # An ordinary employee opens the app and adds a token of their choosing to the form.
    url, form = iframe_form(sandbox.open_placement(member_id, user_id=2))
    form["APPLICATION_TOKEN"] = MADE_UP
    resp = httpx.post(url, data=form, timeout=30)
    assert resp.status_code == 200  # their AUTH_ID is real: the page opens, read-only
    assert 'name="form_token"' not in resp.text
    assert portal_row(member_id).application_token is None
    # An event carrying it is only kept (the token is still missing), never processed.
    assert _post_event(live_app, portal, "ONCRMDEALUPDATE", MADE_UP).status_code == 200
    assert _rows("ONCRMDEALUPDATE", "provisional") == 1

    # The verified ONAPPINSTALL still brings the real one, and the kept event is dropped.
    assert process_queued("ONAPPINSTALL") == ["done"]
    assert portal_row(member_id).application_token == portal["application_token"]
    assert _rows("ONCRMDEALUPDATE") == 0
    assert _post_event(live_app, portal, "ONCRMDEALUPDATE", MADE_UP).status_code == 401


def test_the_configured_auth_server_verifies_a_post_that_names_none(app):
    app.config.update(B24_AUTH_SERVERS="oauth.bitrix.info,http://127.0.0.1:9",
                      B24_OAUTH_TOKEN_URL=None)
    assert verify.default_auth_server() == "https://oauth.bitrix.info/rest/"
    app.config["B24_AUTH_SERVERS"] = "http://127.0.0.1:9, oauth.bitrix.info"
    assert verify.default_auth_server() == "http://127.0.0.1:9/rest/"
    assert verify.trusted_auth_servers() == {"127.0.0.1:9", "oauth.bitrix.info"}
    # The token URL override wins: every token goes there anyway.
    app.config["B24_OAUTH_TOKEN_URL"] = "https://oauth.example/oauth/token/"
    assert verify.default_auth_server() == "https://oauth.example/rest/"

    short = {"AUTH_ID": "a", "REFRESH_ID": "r", "member_id": "m", "status": "L"}
    auth = verify.parse_iframe({"DOMAIN": "x.bitrix24.com"}, short)
    assert auth.server_endpoint == "https://oauth.example/rest/"
    assert (auth.application_token, auth.scope) == ("", "")
    full = {**short, "SERVER_ENDPOINT": "https://oauth.bitrix24.tech/rest/",
            "APPLICATION_TOKEN": "t", "APPLICATION_SCOPE": "crm"}
    auth = verify.parse_iframe({"DOMAIN": "x.bitrix24.com"}, full)
    assert (auth.server_endpoint, auth.application_token, auth.scope) == \
        ("https://oauth.bitrix24.tech/rest/", "t", "crm")
    with pytest.raises(verify.BadIframeRequest, match="missing fields: REFRESH_ID"):
        verify.parse_iframe({"DOMAIN": "x.bitrix24.com"}, {**short, "REFRESH_ID": ""})


def test_a_post_that_names_no_auth_server_is_asked_at_each_trusted_one(sandbox, make_portal,
                                                                       live_app):
    # West and East portals have auth servers of their own and the short form names
    # neither: the first trusted server (here one that does not answer) is not the last word.
    sandbox_cloud = live_app.app.config["B24_AUTH_SERVERS"]
    live_app.app.config["B24_AUTH_SERVERS"] = f"http://127.0.0.1:{free_port()},{sandbox_cloud}"
    portal = make_portal()
    out = sandbox.install_app(portal["member_id"], live_app.url)
    assert out["status"] == 200, out["body"]
    assert portal_row(portal["member_id"]).server_endpoint == portal["server_endpoint"]
    sandbox.finish_install(portal["member_id"])  # what the installer page's script does
    # The settings page is asked the same way, and names the same server for the portal.
    opened = sandbox.open_placement(portal["member_id"])
    assert opened["status"] == 200 and 'name="form_token"' in opened["body"]


def _committed_status(member_id: str) -> str | None:
    """The portal's status as another connection sees it (what is committed)."""
    with db.engine.connect() as conn:
        return conn.scalar(select(Portal.status).where(Portal.member_id == member_id))


def test_install_leaves_the_commit_to_its_caller(sandbox, make_portal, live_app):
    portal = make_portal()
    tokens = sandbox.issue_tokens(portal["member_id"], user_id=1)
    auth = verify.parse_iframe(
        {"DOMAIN": portal["domain"], "PROTOCOL": "0"},
        {"AUTH_ID": tokens["access_token"], "REFRESH_ID": tokens["refresh_token"],
         "member_id": portal["member_id"], "status": "P"})
    row, report = install.install(auth)
    assert row.status == "active" and report.events_bound
    # Only the side transaction before the portal calls committed (status "installing");
    # the outcome is the caller's to commit.
    assert _committed_status(portal["member_id"]) == "installing"
    db.session.commit()
    assert _committed_status(portal["member_id"]) == "active"
