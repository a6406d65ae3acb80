"""REST calls, batch encoding and error classification over real HTTP to the sandbox portal."""

from __future__ import annotations

import pytest

from app.bitrix import errors, php_query
from app.bitrix.rest import MAX_BATCH

TRICKY = "a&b=c#d+e%f?g h/ü"


def test_call_returns_the_whole_body(portal, rest):
    body = rest.call(portal["client_endpoint"], "user.current", None, portal["access_token"])
    assert body["result"]["ID"] == "1"
    assert "operating" in body["time"]


def test_php_query_shapes():
    assert php_query({"a": [1, 2], "fields": {"TITLE": "x y"}}) == \
        "a[]=1&a[]=2&fields[TITLE]=x%20y"
    assert php_query({"f": {">ID": 0}, "rows": [{"N": "1"}], "flag": True}) == \
        "f[%3EID]=0&rows[0][N]=1&flag=1"


def test_php_query_leaves_none_out_instead_of_sending_an_empty_string():
    # Bitrix24 reads KEY= as "" and "" as set (CRM_ENTITY_TYPE="" skips its phone match).
    assert php_query({"A": None, "B": "", "C": 0, "L": [1, None], "M": {"X": None, "Y": 2}}) \
        == "B=&C=0&L[]=1&M[Y]=2"


def test_a_none_param_never_reaches_the_portal_in_a_batch(portal, rest, sandbox):
    result = rest.batch(portal["client_endpoint"], {
        "add": ("crm.contact.add", {"fields": {"NAME": "x", "SECOND_NAME": None}}),
    }, portal["access_token"])
    assert result.ok, result.errors
    added = next(e for e in sandbox.log(portal["member_id"]) if e["method"] == "crm.contact.add")
    assert added["params"]["fields"] == {"NAME": "x"}


def test_batch_params_survive_php_parsing_on_the_portal(portal, rest, sandbox):
    fields = {"NAME": TRICKY, "PHONE": [{"VALUE": "+49 30 1234", "VALUE_TYPE": "WORK"}]}
    result = rest.batch(portal["client_endpoint"], {
        "add": ("crm.contact.add", {"fields": fields}),
        "ids": ("user.get", {"FILTER": {"ID": [1, 2]}}),
    }, portal["access_token"])
    assert result.ok, result.errors
    added = next(e for e in sandbox.log(portal["member_id"]) if e["method"] == "crm.contact.add")
    assert added["params"]["fields"] == fields
    got = rest.call(portal["client_endpoint"], "crm.contact.get", {"id": result.results["add"]},
                    portal["access_token"])
    assert got["result"]["NAME"] == TRICKY


def test_batch_per_command_errors_numeric_keys_and_halt(portal, rest):
    result = rest.batch(portal["client_endpoint"], {
        "0": ("user.current", {}), "1": ("no.such.method", {}), "2": ("user.current", {}),
    }, portal["access_token"])
    assert set(result.results) == {"0", "2"}  # JSON lists came back, keyed again
    assert isinstance(result.errors["1"], errors.MethodNotFound)
    assert not result.ok

    halted = rest.batch(portal["client_endpoint"], {
        "a": ("user.current", {}), "b": ("crm.contact.get", {"id": 999}), "c": ("user.current", {}),
    }, portal["access_token"], halt=True)
    assert set(halted.results) == {"a"} and halted.errors["b"].code == "NOT_FOUND"
    assert halted.skipped == ["c"]


def test_an_error_a_method_answers_with_http_200_is_that_commands_error(portal, rest):
    """placement.bind answers its errors with HTTP 200, so inside a batch they sit among the
    results; the client must still report them as errors (a dispatcher would call them done)."""
    handler = "https://app.example.com/placements/x"
    result = rest.batch(portal["client_endpoint"], {
        "ok": ("placement.bind", {"PLACEMENT": "CALL_CARD", "HANDLER": handler}),
        "bad": ("placement.bind", {"PLACEMENT": "PAGE_BACKGROUND_WORKER", "HANDLER": handler}),
    }, portal["access_token"])
    assert result.results == {"ok": True}
    assert result.errors["bad"].code == "EMPTY_ERROR_HANDLER_URL"
    assert result.errors["bad"].http_status == 200
    assert not result.ok


def test_batch_refuses_more_than_50(portal, rest):
    commands = {f"c{i}": ("user.current", {}) for i in range(MAX_BATCH + 1)}
    with pytest.raises(ValueError, match="at most 50"):
        rest.batch(portal["client_endpoint"], commands, portal["access_token"])


@pytest.mark.parametrize(("fault", "raised", "status"), [
    ("html_502", errors.TransportError, 502),
    ("html_504", errors.TransportError, 504),
    ("reset", errors.TransportError, None),
    ("query_limit", errors.QueryLimitExceeded, 503),
    ("overload_limit", errors.OverloadLimit, 503),
    ("operation_time_limit", errors.OperationTimeLimit, 429),
    ("http_500", errors.ServerError, 500),
    ("expired_token", errors.TokenExpired, 401),
    ("portal_deleted", errors.PortalDeleted, 500),
    ("not_installed", errors.NotInstalled, 401),
])
def test_answers_are_classified_by_error_code(portal, rest, sandbox, fault, raised, status):
    sandbox.set_fault(portal["member_id"], fault, count=1)
    with pytest.raises(raised) as exc_info:
        rest.call(portal["client_endpoint"], "user.current", None, portal["access_token"])
    assert exc_info.value.http_status == status


def test_same_code_same_class_whatever_the_status():
    assert isinstance(errors.classify("insufficient_scope", "", 401), errors.AccessDenied)
    assert isinstance(errors.classify("insufficient_scope", "", 403), errors.AccessDenied)
    assert isinstance(errors.classify("QUERY_LIMIT_EXCEEDED", "", 429), errors.QueryLimitExceeded)
    assert isinstance(errors.classify("wrong_client", "", 200), errors.InvalidClient)
    assert type(errors.classify("ERROR_CORE", "bad", 400)) is errors.ApiError


def test_renamed_portal_raises_portal_moved(portal, rest, sandbox):
    moved = sandbox.rename_portal(portal["member_id"])
    with pytest.raises(errors.PortalMoved) as exc_info:
        rest.call(portal["client_endpoint"], "user.current", None, portal["access_token"])
    assert exc_info.value.new_client_endpoint == moved["client_endpoint"]
