"""The dispatcher's policy: what each real answer of the sandbox portal means, and which methods
may be sent twice."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.bitrix import AsyncRestClient, errors
from app.dispatcher.policy import Verdict, backoff, classify, safe_to_repeat

V = Verdict


@pytest.fixture
def portal(sandbox: Any) -> dict[str, Any]:
    return sandbox.create_portal(bucket={"drain": 100, "burst": 1000})


def failure(portal: dict[str, Any], method: str = "user.current") -> BaseException:
    """The exception one real call raises."""
    async def main() -> BaseException:
        rest = AsyncRestClient()
        try:
            await rest.call(portal["client_endpoint"], method, None, portal["access_token"])
        except Exception as exc:  # whatever it is, it gets classified
            return exc
        finally:
            await rest.aclose()
        raise AssertionError("the call succeeded")
    return asyncio.run(main())


@pytest.mark.parametrize(("fault", "verdict"), [
    ("expired_token", V.REFRESH), ("invalid_token", V.REFRESH),
    ("query_limit", V.RATE),
    ("operation_time_limit", V.OPERATING),
    ("payment_required", V.HOLD), ("not_installed", V.HOLD), ("portal_deleted", V.HOLD),
    ("access_denied", V.HOLD), ("overload_limit", V.HOLD),
    ("http_500", V.RETRY), ("html_502", V.RETRY), ("html_503", V.RETRY), ("reset", V.RETRY),
    ("html_504", V.UNKNOWN),
])
def test_every_fault_of_the_portal_gets_its_verdict(portal, sandbox, fault, verdict):
    sandbox.set_fault(portal["member_id"], fault, count=1)
    assert classify(failure(portal)) is verdict


def test_a_renamed_portal_is_moved(portal, sandbox):
    sandbox.rename_portal(portal["member_id"])
    assert classify(failure(portal)) is V.MOVED


def test_a_504_after_the_command_ran_is_an_unknown_outcome(portal, sandbox):
    sandbox.settings(request_timeout=0.05)
    sandbox.set_latency(portal["member_id"], 200)
    assert classify(failure(portal, "crm.contact.add")) is V.UNKNOWN


def test_a_repeated_bind_is_done_not_a_dead_letter(portal):
    """A resent or raced event.bind/placement.bind finds its binding there: that is success."""
    handler = "https://app.example.com/b24/events"

    async def main() -> Any:
        rest = AsyncRestClient()
        try:
            return await rest.batch(portal["client_endpoint"], {
                f"{kind}{n}": (method, params) for n in (1, 2) for kind, method, params in (
                    ("event", "event.bind", {"event": "ONCRMDEALADD", "handler": handler}),
                    ("widget", "placement.bind", {"PLACEMENT": "CALL_CARD", "HANDLER": handler}))
            }, portal["access_token"])
        finally:
            await rest.aclose()

    result = asyncio.run(main())
    assert set(result.results) == {"event1", "widget1"}
    assert {key: classify(err) for key, err in result.errors.items()} == {
        "event2": Verdict.DONE, "widget2": Verdict.DONE}


def test_per_command_errors_of_a_real_batch(portal, sandbox):
    sandbox.set_operating_limit(0.01, member_id=portal["member_id"])
    sandbox.set_latency(portal["member_id"], 20)  # latency counts as processing

    async def main() -> Any:
        rest = AsyncRestClient()
        args = (portal["client_endpoint"], portal["access_token"])
        try:
            await rest.batch(args[0], {"burn": ("crm.deal.list", {})}, args[1])
            return await rest.batch(args[0], {
                "finish": ("telephony.externalCall.finish", {"CALL_ID": "nope", "USER_ID": 1}),
                "missing": ("crm.contact.get", {"id": 999}),
                "method": ("no.such.method", {}),
                "heavy": ("crm.deal.list", {}),
                "fine": ("user.current", {}),
            }, args[1])
        finally:
            await rest.aclose()

    result = asyncio.run(main())
    verdicts = {key: classify(err) for key, err in result.errors.items()}
    assert verdicts == {"finish": V.PERMANENT, "missing": V.PERMANENT,
                        "method": V.PERMANENT, "heavy": V.OPERATING}
    assert classify(None) is V.DONE and "fine" in result.results


@pytest.mark.parametrize(("error", "verdict"), [
    (errors.classify("invalid_grant"), V.HOLD),
    (errors.classify("insufficient_scope", "", 401), V.HOLD),
    (errors.classify("NO_AUTH_FOUND", "", 401), V.REFRESH),
    (errors.classify("ERROR_UNEXPECTED_ANSWER", "", 500), V.RETRY),
    (errors.classify("ERROR_BATCH_LENGTH_EXCEEDED"), V.RETRY),
    (errors.classify("SOMETHING_NEW", "", 502), V.RETRY),
    (errors.classify("SOMETHING_NEW", "", 504), V.UNKNOWN),
    (errors.classify("ERROR_ARGUMENT", "", 400), V.PERMANENT),
    (errors.classify("ERROR_BATCH_METHOD_NOT_ALLOWED"), V.PERMANENT),
    (errors.classify("authorization_error", "", 401), V.PERMANENT),
    (errors.TransportError("HTTP 200 with a non-JSON body", 200), V.RETRY),
    (errors.TransportError("ConnectTimeout", sent=False), V.RETRY),
    (errors.AnswerTimeout("ReadTimeout"), V.UNKNOWN),
    (RuntimeError("a bug"), V.UNKNOWN),
])
def test_errors_the_sandbox_does_not_produce(error, verdict):
    assert classify(error) is verdict


@pytest.mark.parametrize(("method", "safe"), [
    ("crm.deal.get", True), ("crm.contact.list", True), ("CRM.Deal.Update", True),
    ("app.info", True), ("profile", True), ("user.current", True), ("user.get", True),
    ("event.get", True), ("placement.get", True), ("crm.deal.fields", True),
    ("telephony.externalCall.register", False), ("telephony.externalcall.show", True),
    ("telephony.externalCall.hide", True), ("telephony.externalCall.attachRecord", True),
    ("event.bind", True), ("placement.bind", True),
    ("crm.deal.add", False), ("crm.lead.add", False), ("telephony.externalCall.finish", False),
    ("im.notify.system.add", False), ("im.message.add", False), ("im.chat.get", False),
    ("user.add", False), ("crm.deal.delete", False), ("batch", False),
    ("vendor.something.strange", False), ("", False),
])
def test_safe_to_repeat_table(method, safe):
    assert safe_to_repeat(method) is safe


def test_backoff_grows_exponentially_with_full_jitter_up_to_the_cap():
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (5, 16.0), (30, 300.0), (10**6, 300.0)):
        waits = [backoff(attempt) for _ in range(400)]
        assert all(0.0 <= w <= ceiling for w in waits)
        assert max(waits) > 0.8 * ceiling and min(waits) < 0.2 * ceiling  # the whole range
    assert max(backoff(3, base=0.1, cap=0.25) for _ in range(200)) <= 0.25
