"""OAuth 2.0 against the Bitrix24 auth server, through Authlib's httpx client.

Bitrix24's deviations from RFC 6749 live here, registered on the Authlib
client, not at call sites:

* the token endpoint is ``GET`` with every parameter, client credentials
  included, in the query string (protocol §1.3): a client auth method
  (``client_secret_query``) and a ``refresh_token_request`` compliance hook
  move them there, and ``_http_post`` sends what the hook built as GET;
* errors may come with HTTP 200 (``wrong_client``, §1.7): an
  ``access_token_response``/``refresh_token_response`` hook turns any body
  with an ``error`` key into an error response before Authlib parses it;
* the token URL comes from the portal's ``server_endpoint`` host (East and
  West portals use different auth servers); ``B24_OAUTH_TOKEN_URL`` overrides.
"""

from __future__ import annotations

import ssl
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from authlib.common.urls import add_params_to_uri, url_decode
from authlib.deprecate import AuthlibDeprecationWarning
from authlib.integrations.base_client import OAuthError

with warnings.catch_warnings():
    # Authlib 1.9 nudges towards the separate httpx2 package; the project is on httpx.
    warnings.simplefilter("ignore", AuthlibDeprecationWarning)
    from authlib.integrations.httpx_client import OAuth2Client

from app.bitrix import errors, tls
from app.bitrix.rest import USER_AGENT, decode

TOKEN_TIMEOUT = httpx.Timeout(8.0, connect=3.0)


def token_url_for(server_endpoint: str, override: str | None = None) -> str:
    """``<server_endpoint host>/oauth/token/``, unless an override is configured."""
    if override:
        return override
    parts = urlsplit(server_endpoint)
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"server_endpoint is not a URL: {server_endpoint!r}")
    return f"{parts.scheme}://{parts.netloc}/oauth/token/"


@dataclass(frozen=True)
class TokenSet:
    """A token response, with the fields the app stores."""

    access_token: str
    refresh_token: str
    expires_in: int
    expires_at: datetime
    client_endpoint: str | None
    server_endpoint: str | None
    scope: str | None
    member_id: str | None
    user_id: int | None
    status: str | None

    @classmethod
    def from_response(cls, data: dict[str, Any]) -> TokenSet:
        """Build from a decoded token response (§1.4)."""
        expires_in = int(data.get("expires_in") or 3600)
        if data.get("expires"):
            expires_at = datetime.fromtimestamp(int(data["expires"]), UTC)
        else:
            expires_at = datetime.now(UTC) + timedelta(seconds=expires_in)
        user_id = data.get("user_id")
        return cls(access_token=str(data["access_token"]), refresh_token=str(data["refresh_token"]),
                   expires_in=expires_in, expires_at=expires_at,
                   client_endpoint=data.get("client_endpoint"),
                   server_endpoint=data.get("server_endpoint"), scope=data.get("scope"),
                   member_id=data.get("member_id"),
                   user_id=int(user_id) if user_id not in (None, "") else None,
                   status=data.get("status"))


def _client_secret_query(client: Any, method: str, uri: str, headers: Any, body: Any) -> Any:
    """Client authentication in the query string, as Bitrix24's GET token endpoint wants."""
    uri = add_params_to_uri(uri, [("client_id", client.client_id),
                                  ("client_secret", client.client_secret or "")])
    return uri, headers, body


def _params_to_query(url: str, headers: dict[str, str], body: str) -> tuple[str, dict, str]:
    """refresh_token_request hook: the grant parameters go into the query string."""
    headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
    return add_params_to_uri(url, url_decode(body)), headers, ""


def _error_even_on_200(response: httpx.Response) -> httpx.Response:
    """Token response hook: a body with ``error`` is an error whatever the status."""
    if response.status_code != 200:
        return response
    try:
        body = response.json()
    except ValueError:
        return response
    if isinstance(body, dict) and "error" in body:
        return httpx.Response(400, json=body, request=response.request)
    return response


class BitrixOAuth2Client(OAuth2Client):
    """Authlib's httpx OAuth2 client with Bitrix24's token-endpoint deviations registered."""

    def __init__(self, client_id: str, client_secret: str, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", TOKEN_TIMEOUT)
        kwargs.setdefault("follow_redirects", False)
        kwargs.setdefault("headers", {"User-Agent": USER_AGENT})
        super().__init__(client_id, client_secret,
                         token_endpoint_auth_method="client_secret_query", **kwargs)
        self.register_client_auth_method(("client_secret_query", _client_secret_query))
        self.register_compliance_hook("refresh_token_request", _params_to_query)
        self.register_compliance_hook("refresh_token_response", _error_even_on_200)
        self.register_compliance_hook("access_token_response", _error_even_on_200)

    def _http_post(self, url: str, body: Any = None, auth: Any = None, headers: Any = None,
                   **kwargs: Any) -> httpx.Response:
        # The refresh hook has put every parameter in the URL; Bitrix24 documents GET (§1.3).
        return self.get(url, headers=headers, auth=auth, **kwargs)


class OAuthClient:
    """Token grants and token introspection for one app (client_id/secret)."""

    def __init__(self, client_id: str, client_secret: str, *, token_url: str | None = None,
                 transport: httpx.BaseTransport | None = None,
                 timeout: httpx.Timeout | float = TOKEN_TIMEOUT,
                 verify: ssl.SSLContext | bool = True) -> None:
        if not client_id or not client_secret:
            raise ValueError("B24_CLIENT_ID and B24_CLIENT_SECRET are required for OAuth")
        self.client_id, self.client_secret = client_id, client_secret
        self.token_url_override = token_url
        self.transport, self.timeout, self.verify = transport, timeout, verify

    def _client(self, update_token: Callable[..., None] | None = None) -> BitrixOAuth2Client:
        return BitrixOAuth2Client(self.client_id, self.client_secret, transport=self.transport,
                                  timeout=self.timeout, verify=self.verify,
                                  update_token=update_token)

    def refresh(self, server_endpoint: str, refresh_token: str,
                update_token: Callable[[TokenSet], None] | None = None) -> TokenSet:
        """Spend ``refresh_token`` for a new pair; ``update_token`` persists it before return."""

        def persist(token: dict[str, Any], refresh_token: str | None = None) -> None:
            if update_token is not None:
                update_token(TokenSet.from_response(dict(token)))

        url = token_url_for(server_endpoint, self.token_url_override)
        with self._client(persist) as client:
            data = _grant(lambda: client.refresh_token(url, refresh_token=refresh_token))
        return TokenSet.from_response(data)

    def exchange_code(self, server_endpoint: str, code: str) -> TokenSet:
        """The authorization_code grant (the code lives 30 s: call this at once)."""
        url = token_url_for(server_endpoint, self.token_url_override)
        with self._client() as client:
            data = _grant(lambda: client.fetch_token(url, method="GET",
                                                     grant_type="authorization_code", code=code))
        return TokenSet.from_response(data)

    def app_info(self, server_endpoint: str, access_token: str) -> dict[str, Any]:
        """The auth server's ``app.info`` for a token: client_id, scope, install{member_id...}."""
        url = server_endpoint.rstrip("/") + "/app.info"
        try:
            with httpx.Client(transport=self.transport, timeout=self.timeout,
                              follow_redirects=False, verify=self.verify,
                              headers={"User-Agent": USER_AGENT}) as http:
                response = http.get(url, params={"auth": access_token})
        except httpx.HTTPError as exc:
            raise errors.TransportError(tls.describe(exc)) from exc
        return decode(response).get("result") or {}


def _grant(request: Callable[[], Any]) -> dict[str, Any]:
    """Run one token request, translating Authlib/httpx failures into BitrixErrors."""
    try:
        return dict(request())
    except OAuthError as exc:
        raise errors.classify(exc.error, exc.description or "") from exc
    except httpx.HTTPStatusError as exc:
        raise errors.TransportError(f"token endpoint answered HTTP {exc.response.status_code}",
                                    exc.response.status_code) from exc
    except httpx.HTTPError as exc:
        raise errors.TransportError(tls.describe(exc)) from exc
    except ValueError as exc:  # a non-JSON body below HTTP 400
        raise errors.TransportError(str(exc)) from exc
