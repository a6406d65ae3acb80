"""Everything the Bitrix24 client raises.

Errors are classified by Bitrix24's ``error`` string, never by HTTP status alone:
the same code arrives with different statuses from different sources
(``insufficient_scope`` 401 or 403, ``PORTAL_DELETED`` 410 or 500,
``wrong_client`` even on 200, ``QUERY_LIMIT_EXCEEDED`` 429 before Dec 2024 and
503 since). The tree::

    BitrixError
    ├── TransportError               no usable answer: timeout, reset, refused,
    │   │                            non-JSON body (a gateway's HTML 502/503/504);
    │   │                            ``sent`` is False only when the request surely
    │   │                            never reached the server (connect, pool timeout)
    │   └── AnswerTimeout            sent, but no answer in time: it may have run
    ├── PortalMoved                  302 to a new host: update client_endpoint, repeat
    └── ApiError(code, description, http_status)
        ├── TokenExpired             expired_token: refresh, retry once
        ├── InvalidToken             invalid_token, NO_AUTH_FOUND
        ├── InvalidGrant             invalid_grant, bad_verification_code: chain lost
        ├── InvalidClient            invalid_client, wrong_client: our credentials
        ├── AuthorizationError       authorization_error: the token's user is gone
        ├── QueryLimitExceeded       QUERY_LIMIT_EXCEEDED: the portal's leaky bucket
        ├── OverloadLimit            OVERLOAD_LIMIT: manual block by Bitrix24 support
        ├── OperationTimeLimit       OPERATION_TIME_LIMIT (reset_at when known)
        ├── PortalDeleted            PORTAL_DELETED
        ├── PaymentRequired          PAYMENT_REQUIRED
        ├── AccessDenied             ACCESS_DENIED, insufficient_scope, invalid_scope,
        │                            INVALID_CREDENTIALS, user_access_error, WRONG_AUTH_TYPE
        ├── NotInstalled             ERROR_OAUTH, NOT_INSTALLED, APPLICATION_NOT_FOUND
        ├── MethodNotFound           ERROR_METHOD_NOT_FOUND
        ├── MethodConfirmRequired    METHOD_CONFIRM_WAITING, METHOD_CONFIRM_DENIED
        ├── ServerError              INTERNAL_SERVER_ERROR, ERROR_UNEXPECTED_ANSWER
        └── BatchLengthExceeded      ERROR_BATCH_LENGTH_EXCEEDED (per batch command)

Any other code (``ERROR_CORE``, ``NOT_FOUND``, ...) is a plain ``ApiError``.
"""

from __future__ import annotations

from typing import Any


class BitrixError(Exception):
    """Base of everything the client raises."""


class TransportError(BitrixError):
    """The request got no usable answer; it may or may not have run on the portal.

    ``sent`` is False only when the request surely never reached the server (the
    connection was never made, or no pooled connection was free): repeating it is safe.
    """

    def __init__(self, message: str, http_status: int | None = None, *, sent: bool = True) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.sent = sent


class AnswerTimeout(TransportError):
    """The request left but no answer came in time: its outcome is unknown."""


class PortalMoved(BitrixError):
    """The portal answered 302: it was renamed and lives at ``new_client_endpoint`` now."""

    def __init__(self, new_client_endpoint: str) -> None:
        super().__init__(f"portal moved to {new_client_endpoint}")
        self.new_client_endpoint = new_client_endpoint


class ApiError(BitrixError):
    """Bitrix24 answered with ``{"error": code, "error_description": ...}``."""

    codes: frozenset[str] = frozenset()

    def __init__(self, code: str, description: str = "", http_status: int | None = None) -> None:
        super().__init__(f"{code}: {description}" if description else code)
        self.code = code
        self.description = description
        self.http_status = http_status


class TokenExpired(ApiError):
    codes = frozenset({"EXPIRED_TOKEN"})


class InvalidToken(ApiError):
    codes = frozenset({"INVALID_TOKEN", "NO_AUTH_FOUND"})


class InvalidGrant(ApiError):
    codes = frozenset({"INVALID_GRANT", "BAD_VERIFICATION_CODE"})


class InvalidClient(ApiError):
    codes = frozenset({"INVALID_CLIENT", "WRONG_CLIENT"})


class AuthorizationError(ApiError):
    codes = frozenset({"AUTHORIZATION_ERROR"})


class QueryLimitExceeded(ApiError):
    codes = frozenset({"QUERY_LIMIT_EXCEEDED"})


class OverloadLimit(ApiError):
    codes = frozenset({"OVERLOAD_LIMIT"})


class OperationTimeLimit(ApiError):
    """The method is blocked for this app until ``reset_at`` (unix time), when known."""

    codes = frozenset({"OPERATION_TIME_LIMIT"})

    def __init__(self, code: str, description: str = "", http_status: int | None = None,
                 reset_at: float | None = None) -> None:
        super().__init__(code, description, http_status)
        self.reset_at = reset_at


class PortalDeleted(ApiError):
    codes = frozenset({"PORTAL_DELETED"})


class PaymentRequired(ApiError):
    codes = frozenset({"PAYMENT_REQUIRED"})


class AccessDenied(ApiError):
    codes = frozenset({"ACCESS_DENIED", "INSUFFICIENT_SCOPE", "INVALID_SCOPE",
                       "INVALID_CREDENTIALS", "USER_ACCESS_ERROR", "WRONG_AUTH_TYPE"})


class NotInstalled(ApiError):
    codes = frozenset({"ERROR_OAUTH", "NOT_INSTALLED", "APPLICATION_NOT_FOUND"})


class MethodNotFound(ApiError):
    codes = frozenset({"ERROR_METHOD_NOT_FOUND", "METHOD_NOT_FOUND"})


class MethodConfirmRequired(ApiError):
    codes = frozenset({"METHOD_CONFIRM_WAITING", "METHOD_CONFIRM_DENIED"})


class ServerError(ApiError):
    codes = frozenset({"INTERNAL_SERVER_ERROR", "ERROR_UNEXPECTED_ANSWER"})


class BatchLengthExceeded(ApiError):
    codes = frozenset({"ERROR_BATCH_LENGTH_EXCEEDED"})


_BY_CODE: dict[str, type[ApiError]] = {
    code: cls
    for cls in (TokenExpired, InvalidToken, InvalidGrant, InvalidClient, AuthorizationError,
                QueryLimitExceeded, OverloadLimit, OperationTimeLimit, PortalDeleted,
                PaymentRequired, AccessDenied, NotInstalled, MethodNotFound,
                MethodConfirmRequired, ServerError, BatchLengthExceeded)
    for code in cls.codes
}


def classify(code: str, description: str = "", http_status: int | None = None,
             reset_at: float | None = None) -> ApiError:
    """The ApiError subclass for a Bitrix24 ``error`` string (case-insensitive)."""
    cls = _BY_CODE.get(str(code).upper(), ApiError)
    if cls is OperationTimeLimit:
        return OperationTimeLimit(code, description, http_status, reset_at=reset_at)
    return cls(code, description, http_status)


# A bind refused because the binding exists: what the command asked for is already so.
ALREADY_EXISTS = frozenset({"ERROR_HANDLER_ALREADY_EXIST", "ERROR_PLACEMENT_HANDLER_EXISTS"})


def already_done(error: ApiError) -> bool:
    """The command failed only because what it would create exists (a repeated bind)."""
    return error.code in ALREADY_EXISTS or "already exists" in (error.description or "").lower()


def from_body(body: dict[str, Any], http_status: int | None = None) -> ApiError:
    """The error carried by a decoded ``{"error": ...}`` body."""
    timing = body.get("time") if isinstance(body.get("time"), dict) else {}
    reset_at = timing.get("operating_reset_at") if timing else None
    return classify(str(body.get("error")), str(body.get("error_description") or ""),
                    http_status, reset_at=float(reset_at) if reset_at else None)
