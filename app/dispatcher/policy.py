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
``AnswerTimeout``; HTTP 504 (gateway page or JSON)          UNKNOWN      resends only when
                                                                         ``resend_refusal``
                                                                         allows
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
outcome. Whether such a command is sent again is decided per command by
``resend_refusal(method, params, now, limits)`` (None: send it again; else why not):

- a method with a rule in ``RESEND_RULES``: when its rule finds nothing against the command.
  ``telephony.externalcall.register``: only when ``SHOW`` is PHP-false (``0``, ``"0"``,
  ``""``; absent or null means *shown*, protocol §8.3) and its ``CALL_START_DATE`` (with an
  offset; absent: Bitrix24 dates the call when it ran, so the command's first send) is
  younger than ``TELEPHONY_REGISTER_RESEND_WINDOW``. Bitrix24 dedups a repeat
  onto the call it made only while that call is active and started less than 30 minutes
  ago (§8.13); a repeat with ``SHOW`` pops the card again, and one past the window makes a
  second call and fires the portal's robots again;
- any other method: ``safe_to_repeat(method)``, the static table below (unknown methods are
  unsafe). ``finish`` is not safe: its use case resends it itself and reads a "Call is not
  found" after an unknown outcome as done (app/telephony/handlers.py).

The rule is judged when the unknown outcome comes in (the engine's answer, or the sweep's
recovery of a stopped worker's lease), for the moment the resend is due: it leaves after a
backoff of seconds, well inside the window's margin on Bitrix24's 30 minutes. A resend held
back longer still (its portal held for a while) is not judged again.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

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
    "telephony.externalcall.show", "telephony.externalcall.hide",
    "telephony.externalcall.attachrecord",  # a second call replaces the record
    "telephony.externalcall.searchcrmentities",
    "event.bind", "placement.bind",         # a repeat gets an "already exists" error
})
_SAFE_SUFFIXES = (".get", ".list", ".fields", ".update")
_UNSAFE_PREFIXES = ("im.", "imbot.", "batch")


def safe_to_repeat(method: str) -> bool:
    """Whether sending ``method`` twice does no harm whatever its params (unknown methods:
    no). A method with a rule in ``RESEND_RULES`` is not: its params decide."""
    name = method.strip().lower()
    if name in _SAFE_METHODS:
        return True
    if name.startswith(_UNSAFE_PREFIXES) or name in RESEND_RULES:
        return False
    return name.endswith(_SAFE_SUFFIXES)


@dataclass(frozen=True)
class ResendLimits:
    """The settings the resend rules read (app/config.py)."""

    register_window: timedelta  # TELEPHONY_REGISTER_RESEND_WINDOW

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ResendLimits:
        """Read them from the app's config."""
        return cls(register_window=timedelta(
            seconds=float(cfg["TELEPHONY_REGISTER_RESEND_WINDOW"])))


# A rule: (params, now, limits, first sent at) -> None when the command may be sent again,
# else why not.
ResendRule = Callable[[Mapping[str, Any], datetime, ResendLimits, "datetime | None"],
                      "str | None"]


def resend_refusal(method: str, params: Mapping[str, Any], now: datetime,
                   limits: ResendLimits, sent_at: datetime | None = None) -> str | None:
    """Why a command whose outcome is unknown must not be sent again (None: it may be).

    ``now``: when the resend would leave; ``sent_at``: when the command first left (both
    timezone-aware)."""
    rule = RESEND_RULES.get(method.strip().lower())
    if rule is not None:
        return rule(params, now, limits, sent_at)
    return None if safe_to_repeat(method) else "the method is not safe to repeat"


def _php_false(value: Any) -> bool:
    """PHP's (bool) cast is false: ``0``, ``"0"``, ``""``, ``0.0``, false, ``[]`` (null is
    handled by the caller: an absent flag takes the method's default)."""
    if isinstance(value, str):
        return value in ("", "0")
    return not value


def _register_resend(params: Mapping[str, Any], now: datetime, limits: ResendLimits,
                     sent_at: datetime | None) -> str | None:
    """register dedups a repeat onto its call only with SHOW off and a young start (§8.13).
    Without CALL_START_DATE Bitrix24 dates the call when it ran, which is no earlier than
    the command's first send."""
    show = params.get("SHOW")
    if show is None or not _php_false(show):
        return "register without SHOW=0: a repeat that dedups shows the card again"
    raw = params.get("CALL_START_DATE")
    if raw is None:
        if sent_at is None:
            return "register without CALL_START_DATE, never sent: its call's age is unknown"
        start = sent_at
    else:
        try:
            start = datetime.fromisoformat(str(raw).strip())
        except ValueError:
            return f"register's CALL_START_DATE {raw!r} does not parse"
        if start.tzinfo is None:
            return f"register's CALL_START_DATE {raw!r} has no offset: its age is unknown"
    age = now - start
    if age >= limits.register_window:
        return (f"register's CALL_START_DATE is {int(age.total_seconds())} s old, not under "
                f"{int(limits.register_window.total_seconds())} s "
                "(TELEPHONY_REGISTER_RESEND_WINDOW): a repeat would make a second call")
    return None


# Methods whose resend after an unknown outcome depends on the command (lower case).
RESEND_RULES: dict[str, ResendRule] = {
    "telephony.externalcall.register": _register_resend,
}


def backoff(attempt: int, *, base: float = 1.0, cap: float = 300.0) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...): exponential with full jitter."""
    ceiling = min(cap, base * 2.0 ** (min(max(attempt, 1), 63) - 1))
    return random.uniform(0.0, ceiling)
