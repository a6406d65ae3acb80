"""The async REST client for the dispatcher: ``call`` and ``batch`` on an event loop.

It speaks exactly what the sync ``RestClient`` speaks (same body, same decoding through
``rest.decode`` and ``rest.parse_batch``, same errors), so a batch in flight holds a
socket, not a thread. One instance per event loop; its pool is shared by every portal.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

import httpx

from app.bitrix import tls
from app.bitrix.rest import (
    DEFAULT_TIMEOUT,
    USER_AGENT,
    BatchResult,
    batch_params,
    decode,
    parse_batch,
    transport_error,
)


def ssl_verify(verify: bool | str | ssl.SSLContext) -> bool | ssl.SSLContext:
    """httpx's ``verify``: a CA bundle path (``B24_CA_BUNDLE``) becomes ``tls.trust``'s context."""
    return tls.trust(verify) if isinstance(verify, str) else verify


class AsyncRestClient:
    """Calls REST methods with an access token from async code; knows nothing of tenants."""

    def __init__(self, *, timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
                 max_connections: int = 1000, verify: bool | str | ssl.SSLContext = True,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.http = httpx.AsyncClient(
            transport=transport, timeout=timeout, verify=ssl_verify(verify),
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections))

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.http.aclose()

    async def call(self, client_endpoint: str, method: str, params: Mapping[str, Any] | None,
                   access_token: str) -> dict[str, Any]:
        """POST one method as JSON; return the whole body (``result``, ``time``, ``next``...)."""
        body = {**(params or {}), "auth": access_token}
        try:
            response = await self.http.post(client_endpoint + method, json=body)
        except httpx.HTTPError as exc:
            raise transport_error(exc) from exc
        return decode(response)

    async def batch(self, client_endpoint: str,
                    commands: Mapping[str, tuple[str, Mapping[str, Any]]],
                    access_token: str, halt: bool = False) -> BatchResult:
        """Send up to 50 ``{key: (method, params)}`` commands as one ``batch`` request."""
        body = await self.call(client_endpoint, "batch", batch_params(commands, halt),
                               access_token)
        return parse_batch(body, tuple(commands))
