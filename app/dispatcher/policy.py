"""What the dispatcher does with each answer, and which methods may be sent twice: data, not code.

``classify(error)`` takes a batch-level exception (the whole request failed) or a per-command
``ApiError`` from ``result_error``, and returns a ``Verdict`` (issue #12, item 6):

==========================================================  ===========  =========================
Answer                                                      Verdict      The engine then...
==========================================================  ===========  =========================
no error (``None``)                                         DONE         stores the result
``expired_token``, ``invalid_token``, ``NO_AUTH_FOUND``     REFRESH      refreshes once, resends
``QUERY_LIMIT_EXCEEDED``                                    RATE         fills the bucket, resends
``OPERATION_TIME_LIMIT``                                    OPERATING    holds the method
302 to a new host (``PortalMoved``)                         MOVED        moves, resends
``PAYMENT_REQUIRED``, ``NOT_INSTALLED``/``ERROR_OAUTH``/..  HOLD         applies the portal status
``PORTAL_DELETED``, ``ACCESS_DENIED``/``insufficient_scope``             machine; keeps commands
/.., ``invalid_grant``, ``OVERLOAD_LIMIT``                               (OVERLOAD_LIMIT: a human
                                                                         is alerted)
transport error that surely never left (``sent`` False)     RETRY        backs off, resends
``AnswerTimeout``; HTTP 504 (gateway page or JSON)          UNKNOWN      resends only if
                                                                         ``safe_to_repeat``
other 5xx: JSON ``INTERNAL_SERVER_ERROR``,                  RETRY        backs off, resends
``ERROR_UNEXPECTED_ANSWER``, any code with a 5xx status,
HTML 500/502/503; connection resets; a non-JSON answer
``ERROR_BATCH_LENGTH_EXCEEDED`` (the command never ran)     RETRY        backs off, resends
any other ``ApiError`` (``ERROR_CORE``, ``NOT_FOUND``,      PERMANENT    dead letter with reason
``ERROR_ARGUMENT``, ``ERROR_METHOD_NOT_FOUND``,
``authorization_error``, ``invalid_client``, ...)
anything that is not a ``BitrixError``                      UNKNOWN      (a bug: outcome unknown)
==========================================================  ===========  =========================

Resets are retried whatever the method, as the issue says ("HTTP 5xx, timeouts and connection
resets are retried"); only a timeout or a 504 (the request was sent and maybe ran) is an unknown
outcome. ``safe_to_repeat(method)`` is the per-method table for those; unknown methods are unsafe.
"""

from __future__ import annotations

import enum
import random

from app.bitrix import errors


class Verdict(enum.Enum):
    """What to do with a command after its answer."""

    DONE = "done"
    RETRY = "retry"
    RATE = "rate"
    REFRESH = "refresh"
    OPERATING = "operating"
    HOLD = "hold"
    MOVED = "moved"
    UNKNOWN = "unknown"
    PERMANENT = "permanent"


# First match wins; a 504 that none of these claims is an unknown outcome.
_BY_CLASS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], Verdict], ...] = (
    ((errors.TokenExpired, errors.InvalidToken), Verdict.REFRESH),
    (errors.QueryLimitExceeded, Verdict.RATE),
    (errors.OperationTimeLimit, Verdict.OPERATING),
    (errors.PortalMoved, Verdict.MOVED),
    ((errors.PaymentRequired, errors.NotInstalled, errors.PortalDeleted, errors.AccessDenied,
      errors.InvalidGrant, errors.OverloadLimit), Verdict.HOLD),
)


def classify(error: BaseException | None) -> Verdict:
    """The verdict for a batch-level exception or a per-command ApiError (None: DONE)."""
    if error is None:
        return Verdict.DONE
    for kinds, verdict in _BY_CLASS:
        if isinstance(error, kinds):
            return verdict
    if not isinstance(error, errors.BitrixError):
        return Verdict.UNKNOWN
    if isinstance(error, errors.TransportError) and not error.sent:
        return Verdict.RETRY
    if isinstance(error, errors.AnswerTimeout) or getattr(error, "http_status", None) == 504:
        return Verdict.UNKNOWN
    if isinstance(error, errors.ApiError):
        return _api(error)
    return Verdict.RETRY  # a reset, a gateway page, a non-JSON answer


def _api(error: errors.ApiError) -> Verdict:
    if errors.already_done(error):  # a repeated bind (a resend, two set-ups racing)
        return Verdict.DONE
    if isinstance(error, (errors.ServerError, errors.BatchLengthExceeded)):
        return Verdict.RETRY
    return Verdict.RETRY if (error.http_status or 0) >= 500 else Verdict.PERMANENT


# Methods whose repetition leaves the portal as one run would (lower case).
_SAFE_METHODS = frozenset({
    "app.info", "profile", "server.time", "methods", "scope", "method.get",
    "user.current", "user.admin", "user.get", "user.search", "user.fields", "user.access",
    "event.get", "placement.get", "placement.list",
    "telephony.externalcall.register",      # dedups on EXTERNAL_CALL_ID (30 min)
    "telephony.externalcall.show", "telephony.externalcall.hide",
    "telephony.externalcall.attachrecord",  # a second call replaces the record
    "telephony.externalcall.searchcrmentities",
    "event.bind", "placement.bind",         # a repeat gets an "already exists" error
})
_SAFE_SUFFIXES = (".get", ".list", ".fields", ".update")
_UNSAFE_PREFIXES = ("im.", "imbot.", "batch")


def safe_to_repeat(method: str) -> bool:
    """Whether sending ``method`` twice does no harm (unknown methods: no)."""
    name = method.strip().lower()
    if name in _SAFE_METHODS:
        return True
    if name.startswith(_UNSAFE_PREFIXES):
        return False
    return name.endswith(_SAFE_SUFFIXES)


def backoff(attempt: int, *, base: float = 1.0, cap: float = 300.0) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...): exponential with full jitter."""
    ceiling = min(cap, base * 2.0 ** (min(max(attempt, 1), 63) - 1))
    return random.uniform(0.0, ceiling)
