"""In a real browser: a page on another origin that frames a forged installer POST sees nothing.

The attacker's page (served here from its own port, so its own origin) posts
the installer form into an iframe, naming its own host as ``DOMAIN``. The app
answers the refusal with ``frame-ancestors 'none'``, so Chromium does not render
it inside the attacker's page.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from urllib.parse import urlencode

import pytest

from tests.conftest import StubHandler
from tests.install import test_browser

browser_page = test_browser.browser_page  # the same Chromium page fixture


def _attack_page(action: str, fields: dict[str, str]) -> bytes:
    inputs = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                     for k, v in fields.items())
    return (f'<!doctype html><html><body><iframe name="victim" id="victim"></iframe>'
            f'<form id="f" method="post" target="victim" action="{html.escape(action)}">'
            f'{inputs}</form><script>document.getElementById("f").submit();</script>'
            f"</body></html>").encode()


@pytest.fixture
def attacker_site() -> Iterator[tuple[str, dict[str, bytes]]]:
    """An HTTP server on its own port serving ``pages[path]`` (its origin is not a portal's)."""
    pages: dict[str, bytes] = {}

    class Handler(StubHandler):
        def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
            self.reply(200, pages.get(self.path, b""), "text/html")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_port}", pages
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_a_forged_install_framed_by_another_origin_is_not_shown(make_portal, live_app,
                                                                attacker_site, browser_page):
    portal = make_portal()
    host, pages = attacker_site
    query = urlencode({"DOMAIN": host, "PROTOCOL": "0", "LANG": "en", "APP_SID": "x"})
    fields = {"AUTH_ID": "forged0123", "AUTH_EXPIRES": "3600", "REFRESH_ID": "forged0456",
              "member_id": portal["member_id"], "status": "P", "PLACEMENT": "DEFAULT",
              "SERVER_ENDPOINT": portal.get("server_endpoint") or "",
              "APPLICATION_TOKEN": portal.get("application_token") or ""}
    pages["/"] = _attack_page(f"{live_app.url}/install?{query}",
                              {k: v for k, v in fields.items() if v})
    with browser_page.expect_response(lambda r: "/install?" in r.url, timeout=20000) as seen:
        browser_page.goto(f"http://{host}/")
    browser_page.wait_for_load_state("networkidle")
    assert seen.value.status == 401  # the app did answer the framed POST...
    frame = browser_page.frame(name="victim")
    assert frame is not None
    assert "could not be installed" not in frame.content()  # ...and Chromium showed none of it
