"""Who may read and change a portal's settings and keys from the settings page (issue 24,
"Security tests"): real HTTP to the live app, the sandbox portal opening the page as its
iframe, the test database and Redis.

A change needs an administrator's page session of the portal AND an unspent form token of
that same portal; anything else is refused and writes nothing.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from sqlalchemy import select

from app.extensions import db
from app.ingress.models import PortalApiKey
from placements import page_session
from tests.install.conftest import portal_row
from tests.placements_settings.conftest import (
    EMPLOYEE,
    form_token,
    install_another,
    open_page,
    post,
    session_of,
)

ROTATE = "/placements/app/settings/api-key"
PAGE = "/placements/app/settings"
HOSTILE_SCRIPT = "<script>alert(1)</script>"
HOSTILE_ATTR = '"><img src=x onerror=alert(2)>'


def _key_hash(member_id: str) -> str | None:
    db.session.remove()
    row = db.session.scalars(select(PortalApiKey).where(
        PortalApiKey.portal_id == portal_row(member_id).id)).first()
    return row.key_hash if row else None


def _country(member_id: str) -> str | None:
    db.session.remove()
    return portal_row(member_id).settings.default_country


@pytest.fixture
def two(sandbox, installed, make_portal, live_app) -> tuple[dict[str, Any], dict[str, Any]]:
    """Portal A (installed) and portal B, both with the app."""
    return installed, install_another(sandbox, make_portal, live_app)


def test_a_session_of_portal_a_reads_only_portal_a(sandbox, two, live_app):
    a, b = two
    session_a = session_of(open_page(sandbox, a["member_id"]))
    with live_app.http() as http:
        page = http.get(PAGE, params={"s": session_a})
    assert page.status_code == 200
    assert a["domain"] in page.text and b["domain"] not in page.text
    assert page.headers["Content-Security-Policy"] == f"frame-ancestors http://{a['domain']}"

    # A's session with its payload rewritten to name B: the signature no longer matches.
    payload, stamp, signature = session_a.rsplit(".", 2)
    codec = URLSafeTimedSerializer("not-the-key")  # payload encoding only
    claims = codec.load_payload(payload.encode())
    claims.update(p=portal_row(b["member_id"]).id, m=b["member_id"])
    forged = f"{codec.dump_payload(claims).decode()}.{stamp}.{signature}"
    with live_app.http() as http:
        refused = http.get(PAGE, params={"s": forged})
    assert refused.status_code == 401 and b["domain"] not in refused.text


def test_a_form_token_of_portal_a_cannot_change_portal_b(sandbox, two, live_app):
    a, b = two
    page_a, page_b = open_page(sandbox, a["member_id"]), open_page(sandbox, b["member_id"])
    before_a, before_b = _key_hash(a["member_id"]), _key_hash(b["member_id"])

    # B's admin session carrying A's token (and the other way round): refused, no key changes.
    for session, token in ((session_of(page_b), form_token(page_a, "rotate-key")),
                           (session_of(page_a), form_token(page_b, "rotate-key"))):
        resp = post(live_app, ROTATE, session, form_token=token)
        assert resp.status_code == 403 and "another portal" in resp.text
        assert "b24r_" not in resp.text
    assert (_key_hash(a["member_id"]), _key_hash(b["member_id"])) == (before_a, before_b)

    # The settings form: A's token inside B's session writes neither portal.
    resp = post(live_app, "/placements/settings", None, s=session_of(page_b),
                form_token=form_token(page_a), default_country="DE", lines="")
    assert resp.status_code == 403
    assert _country(a["member_id"]) is None and _country(b["member_id"]) is None


def test_an_employee_cannot_change_anything(sandbox, installed, live_app):
    member_id = installed["member_id"]
    employee_page = open_page(sandbox, member_id, user_id=EMPLOYEE)
    assert 'name="form_token"' not in employee_page
    assert "Only a portal administrator" in employee_page
    employee = session_of(employee_page)
    admin_page = open_page(sandbox, member_id)
    before = _key_hash(member_id)

    # Even holding an administrator's unspent tokens, the employee's session changes nothing.
    for path, form in ((ROTATE, "rotate-key"), ("/placements/app/settings/sync-users",
                                                "sync-users"),
                       ("/placements/app/settings/overrides", "override-add"),
                       ("/placements/app/settings/test-originate", "test-originate")):
        resp = post(live_app, path, employee, form_token=form_token(admin_page, form),
                    extension="5555", user_id="2")
        assert resp.status_code == 403, (path, resp.text)
    resp = post(live_app, "/placements/settings", None, s=employee,
                form_token=form_token(admin_page), default_country="DE", lines="")
    assert resp.status_code == 403
    assert _key_hash(member_id) == before and _country(member_id) is None
    assert "5555" not in open_page(sandbox, member_id)  # no override was added


class _Then(TimestampSigner):
    """A signer whose clock is the session's TTL + 1 s behind: a session that old."""

    def get_timestamp(self) -> int:
        return int(time.time()) - page_session.TTL_SECONDS - 1


@pytest.mark.parametrize("kind", ["missing", "forged", "expired"])
def test_a_missing_forged_or_expired_session_is_refused(sandbox, installed, live_app, kind):
    member_id = installed["member_id"]
    admin_page = open_page(sandbox, member_id)
    row = portal_row(member_id)
    session = {
        "missing": None,
        "forged": session_of(admin_page)[:-4] + "AAAA",
        "expired": URLSafeTimedSerializer(live_app.app.config["SECRET_KEY"],
                                          salt=page_session.SALT, signer=_Then).dumps(
            {"p": row.id, "m": member_id, "u": 1, "a": True, "l": "en", "t": 0}),
    }[kind]
    before = _key_hash(member_id)
    with live_app.http() as http:
        for path in (PAGE, "/placements/app/diagnosis"):
            resp = http.get(path, params={"s": session} if session else None)
            assert resp.status_code == 401, (path, resp.text)
            assert 'name="form_token"' not in resp.text
        polled = http.get("/placements/app/diagnosis/last",
                          params={"s": session} if session else None)
        assert polled.status_code == 401 and "error" in polled.json()
    resp = post(live_app, ROTATE, session, form_token=form_token(admin_page, "rotate-key"))
    assert resp.status_code == 401 and _key_hash(member_id) == before


def test_without_a_valid_single_use_token_nothing_changes(sandbox, installed, live_app):
    member_id = installed["member_id"]
    page = open_page(sandbox, member_id)
    session = session_of(page)
    before = _key_hash(member_id)
    assert post(live_app, ROTATE, session).status_code == 403  # no token: a cross-site post
    assert post(live_app, ROTATE, session, form_token="forged").status_code == 403
    assert _key_hash(member_id) == before

    token = form_token(page, "rotate-key")
    first = post(live_app, ROTATE, session, form_token=token)
    assert first.status_code == 200 and 'id="new-api-key"' in first.text
    rotated = _key_hash(member_id)
    assert rotated != before
    replay = post(live_app, ROTATE, session, form_token=token)
    assert replay.status_code == 403 and "already used" in replay.text
    assert _key_hash(member_id) == rotated

    save = form_token(page)
    ok = post(live_app, "/placements/settings", None, s=session, form_token=save,
              default_country="de", lines="")
    assert ok.status_code == 200 and _country(member_id) == "DE"
    again = post(live_app, "/placements/settings", None, s=session, form_token=save,
                 default_country="FR", lines="")
    assert again.status_code == 403 and _country(member_id) == "DE"


@pytest.fixture
def hostile_pbx() -> Iterator[str]:
    """A PBX whose answer is markup: its originate URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            data = f"{HOSTILE_SCRIPT}{HOSTILE_ATTR}".encode()
            self.send_response(400)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/originate"
    server.shutdown()
    server.server_close()


def _no_live_markup(body: str) -> None:
    assert "<script>alert" not in body and "<img src=x" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body


def test_values_an_attacker_controls_are_escaped(sandbox, make_portal, live_app, hostile_pbx):
    users = [{"id": 1, "name": HOSTILE_SCRIPT, "last_name": "", "admin": True,
              "extension": "101"},
             {"id": 2, "name": HOSTILE_ATTR, "admin": False, "extension": "102"}]
    portal = make_portal(users=users)
    member_id = portal["member_id"]
    assert sandbox.install_app(member_id, live_app.url)["status"] == 200  # users read here
    sandbox.finish_install(member_id)
    page = open_page(sandbox, member_id)
    _no_live_markup(page)  # user names (user.get)
    assert "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in page

    # Line names and a PBX answer: stored and shown, never as markup.
    saved = post(live_app, "/placements/settings", None, s=session_of(page),
                 form_token=form_token(page), lines=f"74950001 {HOSTILE_SCRIPT}",
                 pbx_originate_url=hostile_pbx, pbx_secret="s" * 20)
    assert saved.status_code == 200, saved.text
    _no_live_markup(saved.text)
    answered = post(live_app, "/placements/app/settings/test-originate", session_of(saved.text),
                    form_token=form_token(saved.text, "test-originate"))
    assert answered.status_code == 200 and 'data-status-code="400"' in answered.text
    _no_live_markup(answered.text)
    assert "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in answered.text
