"""OAuth through Authlib against the sandbox auth server, and Bitrix24's deviations."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from app.bitrix import OAuthClient, errors, token_url_for
from tests.bitrix.conftest import CLIENT_ID, CLIENT_SECRET
from tests.conftest import StubHandler, StubServer


class Recorder:
    """A stand-in token endpoint that records what reaches it and answers as told."""

    def __init__(self, answer: Any) -> None:
        self.requests: list[dict[str, Any]] = []
        recorder = self

        class Handler(StubHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                recorder.requests.append({"method": self.command, "path": self.path,
                                          "body": self.rfile.read(length).decode()})
                status, body = answer(self.path)
                self.reply(status, json.dumps(body).encode(), "application/json")

            do_GET = do_POST = _handle  # noqa: N815 - http.server API

        self.server = StubServer(Handler)
        self.url = f"{self.server.url}/oauth/token/"

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def recorder() -> Iterator[Any]:
    made: list[Recorder] = []

    def make(answer: Any) -> Recorder:
        made.append(Recorder(answer))
        return made[-1]

    yield make
    for r in made:
        r.close()


def _forward(sandbox: Any) -> Any:
    def answer(path: str) -> tuple[int, Any]:
        resp = httpx.get(f"{sandbox.base_url}{path}")
        return resp.status_code, resp.json()
    return answer


def test_token_url_comes_from_server_endpoint_host():
    assert token_url_for("https://oauth.bitrix.info/rest/") == \
        "https://oauth.bitrix.info/oauth/token/"
    assert token_url_for("https://oauth.bitrix24.tech/rest/") == \
        "https://oauth.bitrix24.tech/oauth/token/"
    assert token_url_for("https://oauth.bitrix.info/rest/", "https://x/t/") == "https://x/t/"


def test_refresh_rotates_and_persists_through_update_token(portal, oauth, sandbox):
    stored: list[Any] = []
    tokens = oauth.refresh(portal["server_endpoint"], portal["refresh_token"],
                           update_token=stored.append)
    assert stored == [tokens]  # persisted before refresh() returned
    assert tokens.refresh_token != portal["refresh_token"]
    assert tokens.client_endpoint == portal["client_endpoint"]
    assert tokens.member_id == portal["member_id"] and tokens.expires_in == 3600
    with pytest.raises(errors.InvalidGrant):  # the old refresh token is spent
        oauth.refresh(portal["server_endpoint"], portal["refresh_token"])


def test_refresh_is_a_get_with_everything_in_the_query(portal, sandbox, recorder):
    rec = recorder(_forward(sandbox))
    client = OAuthClient(CLIENT_ID, CLIENT_SECRET, token_url=rec.url)
    client.refresh(portal["server_endpoint"], portal["refresh_token"])
    (request,) = rec.requests
    query = parse_qs(urlsplit(request["path"]).query)
    assert request["method"] == "GET" and request["body"] == ""
    assert query == {"grant_type": ["refresh_token"], "refresh_token": [portal["refresh_token"]],
                     "client_id": [CLIENT_ID], "client_secret": [CLIENT_SECRET]}


def test_error_with_http_200_is_an_error(recorder, portal):
    rec = recorder(lambda path: (200, {"error": "wrong_client",
                                       "error_description": "Wrong client"}))
    client = OAuthClient(CLIENT_ID, CLIENT_SECRET, token_url=rec.url)
    with pytest.raises(errors.InvalidClient, match="wrong_client"):
        client.refresh(portal["server_endpoint"], portal["refresh_token"])


def test_wrong_secret_is_invalid_client(portal):
    client = OAuthClient(CLIENT_ID, "not-the-secret")
    with pytest.raises(errors.InvalidClient):
        client.refresh(portal["server_endpoint"], portal["refresh_token"])


def test_token_endpoint_gateway_page_is_a_transport_error(recorder, portal):
    rec = recorder(lambda path: (502, "<html>bad gateway</html>"))
    client = OAuthClient(CLIENT_ID, CLIENT_SECRET, token_url=rec.url)
    with pytest.raises(errors.TransportError):
        client.refresh(portal["server_endpoint"], portal["refresh_token"])


def test_authorization_code_exchange_and_app_info(sandbox, oauth):
    info = sandbox.create_portal(client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                                 redirect_url="http://127.0.0.1:9/callback")
    authorize = httpx.get(f"http://{info['domain']}/oauth/authorize/",
                          params={"client_id": CLIENT_ID, "state": "s1"})
    assert authorize.status_code == 302
    code = parse_qs(urlsplit(authorize.headers["location"]).query)["code"][0]
    tokens = oauth.exchange_code(info["server_endpoint"], code)
    assert tokens.member_id == info["member_id"]
    with pytest.raises(errors.InvalidGrant):  # a code is single-use
        oauth.exchange_code(info["server_endpoint"], code)

    about = oauth.app_info(info["server_endpoint"], tokens.access_token)
    assert about["client_id"] == CLIENT_ID
    assert about["install"]["member_id"] == info["member_id"]
    with pytest.raises(errors.InvalidToken):
        oauth.app_info(info["server_endpoint"], "forged-token")
