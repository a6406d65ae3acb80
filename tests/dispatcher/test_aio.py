"""AsyncRestClient over real HTTP to the sandbox portal; transport failures say whether they were
sent, the same way from the async and the sync client."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from app.bitrix import AsyncRestClient, RestClient, errors
from sandbox import SandboxControl, SandboxServer
from tests.conftest import wait_for

TRICKY = "a&b=c#d+e%f?g h/ü"


@pytest.fixture
def portal(sandbox: Any) -> dict[str, Any]:
    """A sandbox portal with a big bucket; includes the admin's first token pair."""
    return sandbox.create_portal(bucket={"drain": 100, "burst": 1000})


def run(work: Callable[[AsyncRestClient], Awaitable[Any]], **client: Any) -> Any:
    """Run ``work`` with a fresh client on a fresh event loop."""
    async def main() -> Any:
        rest = AsyncRestClient(**client)
        try:
            return await work(rest)
        finally:
            await rest.aclose()
    return asyncio.run(main())


def call(portal: dict[str, Any], method: str = "user.current", params: Any = None,
         use_async: bool = True, **client: Any) -> Any:
    """One call through the async client (or, for parity checks, the sync one)."""
    args = (portal["client_endpoint"], method, params, portal["access_token"])
    if use_async:
        return run(lambda rest: rest.call(*args), **client)
    sync = RestClient(**client)
    try:
        return sync.call(*args)
    finally:
        sync.close()


def test_call_returns_the_whole_body(portal):
    body = call(portal)
    assert body["result"]["ID"] == "1"
    assert "operating" in body["time"]


def test_batch_runs_commands_with_per_command_errors_and_references(portal, sandbox):
    fields = {"NAME": TRICKY, "PHONE": [{"VALUE": "+49 30 1234", "VALUE_TYPE": "WORK"}]}
    commands = {
        "add": ("crm.contact.add", {"fields": fields}),
        "get": ("crm.contact.get", {"id": "$result[add]"}),
        "bad": ("no.such.method", {}),
    }
    result = run(lambda rest: rest.batch(portal["client_endpoint"], commands,
                                         portal["access_token"]))
    assert result.results["get"]["NAME"] == TRICKY
    assert isinstance(result.errors["bad"], errors.MethodNotFound)
    assert set(result.times) == {"add", "get"}  # per-command timing for the ledger
    assert {e["batch_id"] for e in sandbox.log(portal["member_id"])} == {"b1"}  # one request


def test_parallel_batches_share_one_client(portal, sandbox):
    sandbox.set_latency(portal["member_id"], 300)

    async def many(rest: AsyncRestClient) -> list[Any]:
        one = {"me": ("user.current", {})}
        return await asyncio.gather(*(rest.batch(portal["client_endpoint"], one,
                                                 portal["access_token"]) for _ in range(20)))

    results = run(many)
    assert all(r.ok for r in results)
    assert sandbox.counters(portal["member_id"])["max_in_flight"] == 20


@pytest.mark.parametrize("use_async", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize(("fault", "status"), [("html_502", 502), ("html_503", 503)])
def test_gateway_html_page_is_a_transport_error(portal, sandbox, use_async, fault, status):
    sandbox.set_fault(portal["member_id"], fault, count=1)
    with pytest.raises(errors.TransportError) as exc_info:
        call(portal, use_async=use_async)
    assert exc_info.value.http_status == status and exc_info.value.sent


@pytest.mark.parametrize("use_async", [True, False], ids=["async", "sync"])
def test_reset_is_a_transport_error_that_may_have_been_sent(portal, sandbox, use_async):
    sandbox.set_fault(portal["member_id"], "reset", count=1)
    with pytest.raises(errors.TransportError) as exc_info:
        call(portal, use_async=use_async)
    assert exc_info.value.sent and not isinstance(exc_info.value, errors.AnswerTimeout)


@pytest.mark.parametrize("use_async", [True, False], ids=["async", "sync"])
def test_no_answer_in_time_is_an_answer_timeout(portal, sandbox, use_async):
    sandbox.set_latency(portal["member_id"], 600)
    with pytest.raises(errors.AnswerTimeout) as exc_info:
        call(portal, "crm.contact.add", {"fields": {"NAME": "slow"}}, use_async=use_async,
             timeout=httpx.Timeout(0.2, connect=2.0))
    assert exc_info.value.sent
    # ...and the command did run: the outcome really was unknown.
    wait_for(lambda: sandbox.log(portal["member_id"], method="crm.contact.add"), timeout=5)


@pytest.mark.parametrize("use_async", [True, False], ids=["async", "sync"])
def test_refused_connection_was_not_sent(use_async):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    closed = {"client_endpoint": f"http://127.0.0.1:{port}/rest/", "access_token": "x"}
    with pytest.raises(errors.TransportError) as exc_info:
        call(closed, use_async=use_async)
    assert exc_info.value.sent is False


def test_waiting_for_a_pooled_connection_too_long_was_not_sent(portal, sandbox):
    sandbox.set_latency(portal["member_id"], 500)

    async def two(rest: AsyncRestClient) -> list[Any]:
        args = (portal["client_endpoint"], "user.current", None, portal["access_token"])
        return await asyncio.gather(rest.call(*args), rest.call(*args),
                                    return_exceptions=True)

    first, second = run(two, max_connections=1, timeout=httpx.Timeout(5.0, pool=0.1))
    assert first["result"]["ID"] == "1"
    assert isinstance(second, errors.TransportError) and second.sent is False


def test_gateway_504_after_the_command_ran(portal, sandbox):
    sandbox.settings(request_timeout=0.2)
    sandbox.set_latency(portal["member_id"], 600)
    with pytest.raises(errors.TransportError) as exc_info:
        call(portal, "crm.contact.add", {"fields": {"NAME": "ran anyway"}})
    assert exc_info.value.http_status == 504 and exc_info.value.sent
    wait_for(lambda: sandbox.log(portal["member_id"], method="crm.contact.add"), timeout=5)


def test_renamed_portal_raises_portal_moved(portal, sandbox):
    moved = sandbox.rename_portal(portal["member_id"])
    with pytest.raises(errors.PortalMoved) as exc_info:
        call(portal)
    assert exc_info.value.new_client_endpoint == moved["client_endpoint"]


def test_api_errors_are_classified_by_code(portal, sandbox):
    sandbox.set_fault(portal["member_id"], "query_limit", count=1)
    with pytest.raises(errors.QueryLimitExceeded):
        call(portal)
    sandbox.expire_tokens(portal["member_id"])
    with pytest.raises(errors.TokenExpired):
        call(portal)


def test_more_than_50_commands_are_refused_before_sending(portal, sandbox):
    commands = {f"c{i}": ("user.current", {}) for i in range(51)}
    with pytest.raises(ValueError, match="at most 50"):
        run(lambda rest: rest.batch(portal["client_endpoint"], commands,
                                    portal["access_token"]))
    assert sandbox.counters(portal["member_id"])["rest_requests"] == 0


def test_https_portal_is_trusted_through_the_ca_bundle_only():
    server = SandboxServer(tls=True, latency=0).start()
    control = SandboxControl(server.url, ca_file=server.ca_file)
    try:
        portal = control.create_portal()
        assert call(portal, verify=server.ca_file)["result"]["ID"] == "1"
        with pytest.raises(errors.TransportError) as exc_info:
            call(portal)  # the default trust store does not know the sandbox's CA
        assert exc_info.value.sent is False  # refused in the handshake: nothing was sent
        assert "untrusted TLS certificate" in str(exc_info.value)
    finally:
        control.close()
        server.stop()
