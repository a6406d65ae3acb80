"""REST calls and ``batch`` against a portal's ``client_endpoint`` (protocol §4, §5)."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from app.bitrix import errors, tls
from app.bitrix.query import command

MAX_BATCH = 50
USER_AGENT = "b24relay/0.1 (+https://github.com/b24relay)"
DEFAULT_TIMEOUT = httpx.Timeout(65.0, connect=5.0)  # a cloud request is killed at 60 s


def rest_base(url: str) -> str:
    """The ``.../rest/`` prefix of a REST URL (used for redirect targets)."""
    parts = urlsplit(url)
    path = parts.path
    cut = path.find("/rest/")
    base_path = path[: cut + len("/rest/")] if cut >= 0 else "/rest/"
    return f"{parts.scheme}://{parts.netloc}{base_path}"


def decode(response: httpx.Response) -> dict[str, Any]:
    """The JSON body of a Bitrix24 answer, or the matching BitrixError."""
    if response.is_redirect and "location" in response.headers:
        target = urljoin(str(response.request.url), response.headers["location"])
        raise errors.PortalMoved(rest_base(target))
    try:
        body = response.json()
    except ValueError:
        raise errors.TransportError(
            f"HTTP {response.status_code} with a non-JSON body "
            f"({response.headers.get('content-type', 'no content type')})",
            response.status_code) from None
    if not isinstance(body, dict):
        raise errors.TransportError(f"HTTP {response.status_code}: unexpected JSON shape",
                                    response.status_code)
    if "error" in body:
        raise errors.from_body(body, response.status_code)
    if response.status_code >= 400:
        raise errors.TransportError(f"HTTP {response.status_code} without an error code",
                                    response.status_code)
    return body


# Raised before a byte of the request left: the portal surely never saw it.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def transport_error(exc: httpx.HTTPError) -> errors.TransportError:
    """The TransportError for an httpx failure: ``sent`` False when the request never left."""
    message = tls.describe(exc)
    if isinstance(exc, _NOT_SENT):
        return errors.TransportError(message, sent=False)
    if isinstance(exc, httpx.ReadTimeout):
        return errors.AnswerTimeout(message)
    return errors.TransportError(message)


def batch_params(commands: Mapping[str, tuple[str, Mapping[str, Any]]],
                 halt: bool) -> dict[str, Any]:
    """The ``batch`` request's parameters for up to 50 ``{key: (method, params)}`` commands."""
    if len(commands) > MAX_BATCH:
        raise ValueError(f"a batch takes at most {MAX_BATCH} commands, got {len(commands)}")
    cmd = {key: command(method, params) for key, (method, params) in commands.items()}
    return {"halt": 1 if halt else 0, "cmd": cmd}


def as_dict(section: Any) -> dict[str, Any]:
    """Batch sections come back as ``[]`` when empty and as lists for numeric keys."""
    if isinstance(section, dict):
        return section
    if isinstance(section, list):
        return {str(index): item for index, item in enumerate(section)}
    return {}


@dataclass
class BatchResult:
    """Per-command outcome of one ``batch`` request."""

    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, errors.ApiError] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    nexts: dict[str, Any] = field(default_factory=dict)
    times: dict[str, Any] = field(default_factory=dict)
    time: dict[str, Any] = field(default_factory=dict)
    keys: tuple[str, ...] = ()

    @property
    def skipped(self) -> list[str]:
        """Commands with neither a result nor an error (stopped by ``halt``, or cut)."""
        return [k for k in self.keys if k not in self.results and k not in self.errors]

    @property
    def ok(self) -> bool:
        """True when every command has a result."""
        return not self.errors and not self.skipped


def _answered_error(value: Any) -> bool:
    """An error a method answers with HTTP 200 (``placement.bind`` does, protocol §7.1) arrives
    inside a batch as that command's *result*: ``{"error": ..., "error_description": ...}``."""
    return (isinstance(value, dict) and isinstance(value.get("error"), str)
            and set(value) <= {"error", "error_description"})


def parse_batch(body: dict[str, Any], keys: tuple[str, ...]) -> BatchResult:
    """Normalise a batch body into a BatchResult; an error answered as a result is an error."""
    inner = result if isinstance(result := body.get("result"), dict) else {}
    results = as_dict(inner.get("result"))
    failed = {
        key: errors.from_body(err if isinstance(err, dict) else {"error": str(err)})
        for key, err in as_dict(inner.get("result_error")).items()
    }
    for key in [k for k, v in results.items() if _answered_error(v)]:
        failed[key] = errors.from_body(results.pop(key), 200)
    return BatchResult(results=results, errors=failed,
                       totals=as_dict(inner.get("result_total")),
                       nexts=as_dict(inner.get("result_next")),
                       times=as_dict(inner.get("result_time")),
                       time=body.get("time") or {}, keys=keys)


class RestClient:
    """Calls REST methods with an access token; knows nothing of tenants or storage."""

    def __init__(self, http: httpx.Client | None = None, *,
                 transport: httpx.BaseTransport | None = None,
                 timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
                 verify: ssl.SSLContext | bool = True) -> None:
        self.http = http or httpx.Client(
            transport=transport, timeout=timeout, follow_redirects=False, verify=verify,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50))

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def call(self, client_endpoint: str, method: str, params: Mapping[str, Any] | None,
             access_token: str) -> dict[str, Any]:
        """POST one method as JSON; return the whole body (``result``, ``time``, ``next``...)."""
        body = {**(params or {}), "auth": access_token}
        try:
            response = self.http.post(client_endpoint + method, json=body)
        except httpx.HTTPError as exc:
            raise transport_error(exc) from exc
        return decode(response)

    def batch(self, client_endpoint: str, commands: Mapping[str, tuple[str, Mapping[str, Any]]],
              access_token: str, halt: bool = False) -> BatchResult:
        """Send up to 50 ``{key: (method, params)}`` commands as one ``batch`` request."""
        body = self.call(client_endpoint, "batch", batch_params(commands, halt), access_token)
        return parse_batch(body, tuple(commands))
