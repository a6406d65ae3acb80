"""The self-diagnosis of a portal (issue 24 point 6): one read-only round, a report of findings.

:func:`check` asks the portal, in one batch through the direct path
(:func:`app.dispatcher.direct.timed_batch`: the portal's chain, its rate bucket, the single-flight
refresh), for what the app needs to see (:data:`PROBES`: ``app.info``, ``scope``,
``user.admin``, ``event.get``, ``placement.get``, ``telephony.externalLine.get``,
``voximplant.line.outgoing.get``), and compares the answers, and the app's own records, with
what the app expects:

=====================  ==========================================================================
check (code)           against
=====================  ==========================================================================
``status``             the portal's status in b24relay (held: nothing is sent)
``token``              the stored chain: present, its refresh token's age, a refresh left hanging,
                       and whether Bitrix24 accepted it in this round
``round_trip``         whether the portal answered, and how fast (``DIAGNOSIS_SLOW_SECONDS``)
``limits``             the plan Bitrix24 reports (app.info LICENSE_FAMILY) against the pace
                       b24relay keeps; ``time.operating`` when the answer carries it
``clock``              the answer's ``time.date_start`` against our clock (``DIAGNOSIS_CLOCK_SKEW``)
``install``            app.info: installation finished, subscription not expired
``scopes``             ``scope`` against :data:`app.installation.plan.NEEDED_SCOPES`
``chain_user``         ``user.admin`` of the chain's user (a non-admin sees only its own bindings)
``events``             ``event.get`` against the setup plan (:func:`plan.missing_bindings`)
``placements``         ``placement.get`` likewise
``lines``              ``telephony.externalLine.get`` against the settings' lines
``outgoing_line``      ``voximplant.line.outgoing.get``: b24relay or one of its lines?
``users_sync``         the last user sync
``extensions_missing`` active users without an extension in the merged map (users + overrides)
``extensions_taken``   extensions claimed by two users, or taken from a user by an override
``overrides``          overrides the map ignores (their user inactive or unknown)
=====================  ==========================================================================

Nothing on the portal changes: only read methods are sent (:data:`READ_METHODS`). A read that
fails (a missing scope, no right, a paused method, an error, no answer) is that check's finding,
and the other checks still report; when the batch fails as a whole (a 5xx, a dropped
connection), each read is asked again in a batch of its own, so that one failing method hides
nothing else (never as a lone call: a refusal at the top of an answer would move the portal's
status, which a read-only round must not). Only
a round that cannot be sent at all (the portal held, its rate budget used up, no answer in time)
leaves the portal's checks unchecked. :func:`check` never raises for the portal's sake.

A finding is a code, a level (ok, warn, error), a message key and its facts; the words are in
app/installation/diagnosis_text.py. :func:`store` keeps the last report per portal
(app/installation/models.py); workers run the round after an install and after a settings save
(:func:`request_check`, ``diagnose_portal`` in workers/install.py), at most once per
``DIAGNOSIS_MIN_INTERVAL`` per portal (:func:`admit`); ``flask portals check`` runs it at once.
"""

from __future__ import annotations

import enum
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import dramatiq
import redis
from flask import current_app
from sqlalchemy import select

from app.bitrix import BatchResult, errors
from app.config import REFRESH_TOKEN_DAYS
from app.dispatcher import direct
from app.extensions import db, redis_ext
from app.installation import plan
from app.installation.models import PortalDiagnosis
from app.queue import enqueue
from app.tenants import tokens
from app.tenants.models import Plan, Portal, PortalStatus, aware, utcnow
from app.tenants.status import PortalUnavailable
from app.tenants.users import PortalUser, extension_map, overrides

log = logging.getLogger(__name__)

ACTOR = "diagnose_portal"  # workers/install.py
# batch key → the read it sends. Read methods only: the round changes nothing on the portal.
PROBES: dict[str, tuple[str, dict[str, Any]]] = {
    "app": ("app.info", {}),
    "scope": ("scope", {}),
    "admin": ("user.admin", {}),
    "events": ("event.get", {}),
    "placements": ("placement.get", {}),
    "lines": ("telephony.externalLine.get", {}),
    "outgoing": ("voximplant.line.outgoing.get", {}),
}
READ_METHODS = frozenset(method.lower() for method, _ in PROBES.values())
AGING_DAYS = 30  # a refresh token with fewer days left than this is a warning
STUCK_REFRESH = timedelta(minutes=2)  # a refresh unfinished this long died mid-flight
STUCK_SYNC = timedelta(hours=1)
SHOWN_USERS = 20  # users listed by name in a finding; the count says how many in all
DATE_SLACK = 1.0  # date_start has whole seconds
_REST_APP = re.compile(r"REST_APP:(\d+)")
_SIP = re.compile(r"(reg|sip)\d+", re.IGNORECASE)
_DIGITS = re.compile(r"\+?\d+")


class Level(enum.StrEnum):
    """How bad a finding is."""

    OK = "ok"
    WARN = "warn"
    ERROR = "error"


_RANK = {Level.OK: 0, Level.WARN: 1, Level.ERROR: 2}


@dataclass(frozen=True)
class Finding:
    """One check's result: its code, level, message key (diagnosis_text.MESSAGES) and facts."""

    code: str
    level: Level
    key: str
    facts: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"code": self.code, "level": self.level.value, "key": self.key,
                "facts": self.facts}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        """From :meth:`as_dict`."""
        return cls(str(data["code"]), Level(data["level"]), str(data["key"]),
                   dict(data.get("facts") or {}))


@dataclass
class Report:
    """The findings of one round, in the order a reader goes through them."""

    member_id: str
    domain: str
    checked_at: datetime
    seconds: float
    findings: list[Finding]

    @property
    def level(self) -> Level:
        """The worst finding's level."""
        return max((f.level for f in self.findings), key=_RANK.__getitem__, default=Level.OK)

    def count(self, level: Level) -> int:
        """How many findings have ``level``."""
        return sum(1 for f in self.findings if f.level is level)

    def finding(self, code: str) -> Finding | None:
        """The finding of check ``code``."""
        return next((f for f in self.findings if f.code == code), None)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (what :func:`store` keeps)."""
        return {"member_id": self.member_id, "domain": self.domain,
                "checked_at": self.checked_at.isoformat(), "seconds": self.seconds,
                "level": self.level.value, "findings": [f.as_dict() for f in self.findings]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """From :meth:`as_dict`."""
        return cls(str(data["member_id"]), str(data.get("domain") or ""),
                   datetime.fromisoformat(str(data["checked_at"])), float(data["seconds"]),
                   [Finding.from_dict(f) for f in data.get("findings") or []])


# ---------------------------------------------------------------- the round


@dataclass
class Round:
    """What the portal answered: results and errors per probe key, or why nothing came."""

    results: dict[str, Any] = field(default_factory=dict)
    refusals: dict[str, errors.BitrixError] = field(default_factory=dict)  # per probe key
    failure: BaseException | None = None  # the round as a whole got nothing
    single: bool = False  # asked one probe at a time (the batch failed: ``batch_error``)
    batch_error: str | None = None
    time: dict[str, Any] = field(default_factory=dict)  # the answer's `time` block
    sent_at: float | None = None  # our clock when the request left
    seconds: float | None = None  # the request's time on the wire


def ask(portal: Portal) -> Round:
    """Send the probes as one batch (one by one if the batch fails as a whole); never raises."""
    try:
        return _ask(portal)
    except Exception as exc:  # noqa: BLE001 - a report, not a crash: the finding names it
        log.exception("portal %s: diagnosis round failed", portal.member_id)
        return Round(failure=exc)


def _ask(portal: Portal) -> Round:
    try:
        timed = direct.timed_batch(portal, PROBES)
    except PortalUnavailable as exc:
        return Round(failure=exc)
    except errors.BitrixError as exc:
        if not _one_by_one_helps(exc):
            return Round(failure=exc)
        return _one_by_one(portal, exc)
    return _from_batch(timed.answer, timed.sent_at, timed.seconds)


def _from_batch(answer: BatchResult, sent_at: float, seconds: float) -> Round:
    found = Round(results={k: answer.results[k] for k in PROBES if k in answer.results},
                  refusals=dict(answer.errors), time=dict(answer.time or {}),
                  sent_at=sent_at, seconds=seconds)
    for key in answer.skipped:
        found.refusals[key] = errors.ApiError("NOT_EXECUTED", "absent from the batch answer")
    return found


def _one_by_one_helps(exc: errors.BitrixError) -> bool:
    """Whether asking each probe alone may get answers the batch did not: the batch failed as a
    whole in a way one of its methods can cause (a 5xx, a dropped connection), not for a reason
    every request shares (the rate budget, the chain, a timeout that would repeat per probe)."""
    if isinstance(exc, (errors.AnswerTimeout, errors.QueryLimitExceeded, errors.OverloadLimit,
                        errors.PortalDeleted)):
        return False
    if isinstance(exc, errors.TransportError):
        return exc.sent and not isinstance(exc, tokens.RefreshPending)
    return isinstance(exc, errors.ApiError) and (exc.http_status or 0) >= 500


def _one_by_one(portal: Portal, batch_failure: errors.BitrixError) -> Round:
    """Each probe in a batch of its own: its method's error stays that command's (a refusal
    answered at the top of a lone call would move the portal's status, app.tenants.status).
    A reason every request shares (held, rate budget, no connection, no answer in time) stops
    the asking: the probes not asked yet share that refusal."""
    found = Round(single=True, batch_error=_error_text(batch_failure))
    for key, command in PROBES.items():
        try:
            timed = direct.timed_batch(portal, {key: command})
        except PortalUnavailable as exc:
            found.failure = exc
            return found
        except errors.BitrixError as exc:
            found.refusals[key] = exc
            if not _one_by_one_helps(exc):
                found.refusals.update({k: exc for k in PROBES if k not in found.results})
                break
            continue
        alone = _from_batch(timed.answer, timed.sent_at, timed.seconds)
        found.results.update({k: v for k, v in alone.results.items() if k == key})
        found.refusals.update({k: v for k, v in alone.refusals.items() if k == key})
        if found.sent_at is None and key in alone.results:
            found.time, found.sent_at, found.seconds = alone.time, alone.sent_at, alone.seconds
    if not found.results:
        found.failure = batch_failure
    return found


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, errors.ApiError):
        return f"{exc.code} {exc.description}".strip()[:300]
    return str(exc)[:300] or type(exc).__name__


# ---------------------------------------------------------------- the checks


class Unanswered(Exception):
    """A check's read did not come back: the finding to report instead."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.key)
        self.finding = finding


@dataclass
class Context:
    """What every check reads: the portal, the round, the settings, the moment."""

    portal: Portal
    round: Round
    now: datetime
    config: Mapping[str, Any]

    def answer(self, code: str, key: str) -> Any:
        """The result of probe ``key``, or :class:`Unanswered` with check ``code``'s finding."""
        if key in self.round.results:
            return self.round.results[key]
        raise Unanswered(_unread(code, key, self.round))


def _unread(code: str, key: str, found: Round) -> Finding:
    method = PROBES[key][0]
    error = found.refusals.get(key)
    if error is None:
        return Finding(code, Level.WARN, "probe.skipped", {"method": method})
    facts: dict[str, Any] = {"method": method, "error": type(error).__name__,
                             "description": str(error)[:300]}
    if isinstance(error, errors.ApiError):
        facts.update(error=error.code, description=error.description[:300])
    return Finding(code, Level.WARN, f"probe.{_probe_kind(error)}", facts)


def _probe_kind(error: errors.BitrixError) -> str:
    if isinstance(error, errors.TransportError):
        return "no_answer"
    if not isinstance(error, errors.ApiError):
        return "error"
    code = error.code.upper()
    if code in ("INSUFFICIENT_SCOPE", "INVALID_SCOPE"):
        return "scope"
    if isinstance(error, errors.AccessDenied):
        return "access"
    if isinstance(error, errors.OperationTimeLimit):
        return "operating"
    if isinstance(error, errors.MethodNotFound):
        return "not_found"
    return "no_answer" if (error.http_status or 0) >= 500 else "error"


def _iso(moment: datetime | None) -> str | None:
    return aware(moment).isoformat(timespec="seconds") if moment else None


def _status(ctx: Context) -> Finding:
    portal = ctx.portal
    facts = {"status": portal.status, "since": _iso(portal.status_changed_at),
             "reason": portal.status_reason}
    if portal.status == PortalStatus.ACTIVE.value:
        return Finding("status", Level.OK, "status.active", facts)
    if portal.status == PortalStatus.INSTALLING.value:
        return Finding("status", Level.WARN, "status.installing", facts)
    return Finding("status", Level.ERROR, "status.held", facts)


_REJECTED = (errors.TokenExpired, errors.InvalidToken, errors.InvalidGrant,
             errors.AuthorizationError)


def _token(ctx: Context) -> Finding:
    portal, failure = ctx.portal, ctx.round.failure
    refreshed = aware(portal.last_refresh_at)
    age = (ctx.now - refreshed).days if refreshed else None
    facts: dict[str, Any] = {
        "expires_at": _iso(portal.expires_at), "last_refresh_at": _iso(refreshed),
        "age_days": age, "days_left": None if age is None else REFRESH_TOKEN_DAYS - age,
        "token_version": portal.token_version, "user_id": portal.auth_user_id,
        "refresh_started_at": _iso(portal.refresh_started_at),
        "call_ok": failure is None and bool(ctx.round.results)}
    if not portal.refresh_token:
        return Finding("token", Level.ERROR, "token.missing", facts)
    cause = failure.__cause__ if isinstance(failure, PortalUnavailable) else failure
    if isinstance(cause, _REJECTED) or portal.status == PortalStatus.AUTH_FAILED.value:
        facts.update(error=cause.code if isinstance(cause, errors.ApiError) else portal.status,
                     description=(cause.description if isinstance(cause, errors.ApiError)
                                  else portal.status_reason or ""))
        return Finding("token", Level.ERROR, "token.rejected", facts)
    started = aware(portal.refresh_started_at)
    if started is not None and ctx.now - started > STUCK_REFRESH:
        return Finding("token", Level.WARN, "token.refresh_stuck", facts)
    if age is not None and REFRESH_TOKEN_DAYS - age < AGING_DAYS:
        return Finding("token", Level.WARN, "token.aging", facts)
    return Finding("token", Level.OK, "token.ok", facts)


def _round_trip(ctx: Context) -> Finding:
    found, failure = ctx.round, ctx.round.failure
    if isinstance(failure, PortalUnavailable):
        return Finding("round_trip", Level.WARN, "round.not_sent", {"status": failure.status})
    if isinstance(failure, errors.QueryLimitExceeded):
        return Finding("round_trip", Level.WARN, "round.rate_limited", {})
    if isinstance(failure, _REJECTED):
        return Finding("round_trip", Level.WARN, "round.no_token", {"error": failure.code})
    if isinstance(failure, errors.TransportError):
        return Finding("round_trip", Level.ERROR, "round.no_answer",
                       {"error": _error_text(failure), "domain": ctx.portal.domain})
    if isinstance(failure, errors.ApiError):
        return Finding("round_trip", Level.ERROR, "round.refused",
                       {"error": failure.code, "description": failure.description[:300]})
    if failure is not None:
        return Finding("round_trip", Level.ERROR, "round.failed", {"error": _error_text(failure)})
    seconds = found.seconds or 0.0
    facts = {"ms": round(seconds * 1000), "mode": "single" if found.single else "batch",
             "portal_ms": _ms(found.time.get("duration")), "batch_error": found.batch_error,
             "limit_ms": round(float(ctx.config["DIAGNOSIS_SLOW_SECONDS"]) * 1000)}
    if found.single:
        return Finding("round_trip", Level.WARN, "round.one_by_one", facts)
    if seconds > float(ctx.config["DIAGNOSIS_SLOW_SECONDS"]):
        return Finding("round_trip", Level.WARN, "round.slow", facts)
    return Finding("round_trip", Level.OK, "round.ok", facts)


def _ms(seconds: Any) -> int | None:
    try:
        return round(float(seconds) * 1000)
    except (TypeError, ValueError):
        return None


def _limits(ctx: Context) -> Finding:
    portal, app = ctx.portal, ctx.round.results.get("app")
    family = str((app or {}).get("LICENSE_FAMILY") or "").lower() if isinstance(app, Mapping) \
        else ""
    theirs = (Plan.ENTERPRISE.value if family == "ent" else Plan.STANDARD.value) if family \
        else None
    reset = ctx.round.time.get("operating_reset_at")
    facts = {"plan": portal.plan, "drain": f"{portal.rate_per_second:g}",
             "burst": portal.rate_burst,
             "portal_plan": theirs,
             "license": (app or {}).get("LICENSE") if isinstance(app, Mapping) else None,
             "operating": ctx.round.time.get("operating"),
             "processing_ms": _ms(ctx.round.time.get("processing")),
             "operating_reset_at": _epoch_iso(reset)}
    if theirs is not None and theirs != portal.plan:
        facts["pace_note"] = "slow" if theirs == Plan.ENTERPRISE.value else "fast"
        return Finding("limits", Level.WARN, "limits.plan_differs", facts)
    return Finding("limits", Level.OK, "limits.ok", facts)


def _epoch_iso(value: Any) -> str | None:
    try:
        return datetime.fromtimestamp(float(value), UTC).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _need_round(ctx: Context, code: str) -> None:
    if ctx.round.failure is not None or ctx.round.sent_at is None:
        raise Unanswered(Finding(code, Level.WARN, "probe.skipped", {}))


def _clock(ctx: Context) -> Finding:
    _need_round(ctx, "clock")
    found = ctx.round
    assert found.sent_at is not None
    theirs = _portal_moment(found.time)
    if theirs is None:
        return Finding("clock", Level.WARN, "clock.unknown", {})
    low, high = found.sent_at - DATE_SLACK, found.sent_at + (found.seconds or 0.0) + DATE_SLACK
    skew = theirs - high if theirs > high else theirs - low if theirs < low else 0.0
    limit = float(ctx.config["DIAGNOSIS_CLOCK_SKEW"])
    facts = {"skew": abs(round(skew)), "skew_seconds": round(skew),
             "direction": "ahead" if skew > 0 else "behind", "limit": round(limit),
             "portal_time": found.time.get("date_start"),
             "our_time": datetime.fromtimestamp(found.sent_at, UTC).isoformat(timespec="seconds")}
    if abs(skew) > limit:
        return Finding("clock", Level.WARN, "clock.skewed", facts)
    return Finding("clock", Level.OK, "clock.ok", facts)


def _portal_moment(block: Mapping[str, Any]) -> float | None:
    """When the portal started the answer, by its clock: ``date_start`` (ISO with the portal's
    offset, protocol §4.2), else the epoch ``start``."""
    try:
        return datetime.fromisoformat(str(block["date_start"])).timestamp()
    except (KeyError, ValueError):
        pass
    try:
        return float(block["start"])
    except (KeyError, TypeError, ValueError):
        return None


def _yes(value: Any) -> bool:
    return value is True or str(value).strip().upper() in {"Y", "1", "TRUE"}


def _install(ctx: Context) -> Finding:
    app = ctx.answer("install", "app")
    app = app if isinstance(app, Mapping) else {}
    facts = {"installed": app.get("INSTALLED"), "license": app.get("LICENSE"),
             "app_status": app.get("STATUS"), "days": app.get("DAYS")}
    if not _yes(app.get("INSTALLED")):
        return Finding("install", Level.ERROR, "install.unfinished", facts)
    if _yes(app.get("PAYMENT_EXPIRED")):
        return Finding("install", Level.ERROR, "install.payment", facts)
    return Finding("install", Level.OK, "install.ok", facts)


def _scopes(ctx: Context) -> Finding:
    try:
        granted = [str(s).strip() for s in plan.as_list(ctx.answer("scopes", "scope"))]
        source = "scope"
    except Unanswered:
        if not ctx.portal.scope:
            raise
        granted, source = [s.strip() for s in ctx.portal.scope.split(",")], "token"
    have = {s for s in granted if s}
    missing = [need for need, any_of in plan.NEEDED_SCOPES.items() if not have & set(any_of)]
    facts = {"granted": sorted(have), "needed": list(plan.NEEDED_SCOPES),
             "missing_scopes": missing, "source": source}
    if missing:
        return Finding("scopes", Level.ERROR, "scopes.missing", facts)
    return Finding("scopes", Level.OK, "scopes.ok", facts)


def _chain_user(ctx: Context) -> Finding:
    facts = {"user_id": ctx.portal.auth_user_id}
    if _yes(ctx.answer("chain_user", "admin")):
        return Finding("chain_user", Level.OK, "chain_user.admin", facts)
    return Finding("chain_user", Level.WARN, "chain_user.not_admin", facts)


def _where(url: Any) -> str:
    """A handler URL without its query (the event URL's carries the portal's handler key)."""
    parts = urlsplit(str(url or ""))
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.netloc else "-"


def _wanted_changes(ctx: Context) -> list[tuple[str, dict[str, Any]]]:
    """The writes the setup plan would make for what the round read (unread parts as empty)."""
    state = {name: ctx.round.results.get(key) or []
             for name, key in (("events", "events"), ("placements", "placements"),
                               ("lines", "lines"))}
    writes, _ = plan.missing_bindings(ctx.portal, state)
    return list(writes.values())


def _events(ctx: Context) -> Finding:
    ctx.answer("events", "events")
    mode = "offline" if plan.offline_mode(ctx.portal) else "online"
    if ctx.round.results.get("admin") is False:
        return Finding("events", Level.WARN, "events.not_admin", {"mode": mode})
    missing, extra = [], []
    for method, params in _wanted_changes(ctx):
        offline = " (offline)" if params.get("event_type") == "offline" else ""
        if method == "event.bind":
            missing.append(f"{params['event']}{offline}")
        elif method == "event.unbind":
            extra.append(f"{params['event']} {_where(params.get('handler'))}".strip()
                         if not offline else f"{params['event']}{offline}")
    facts = {"missing": missing, "extra": extra, "mode": mode, "count": len(plan.EVENTS)}
    return _bindings("events", facts, Level.ERROR)


def _placements(ctx: Context) -> Finding:
    placed = plan.as_list(ctx.answer("placements", "placements"))
    changes = _wanted_changes(ctx)
    missing = [p["PLACEMENT"] for m, p in changes if m == "placement.bind"]
    extra = [f"{p['PLACEMENT']} {_where(p.get('HANDLER'))}" for m, p in changes
             if m == "placement.unbind"]
    bound = sorted({str(b.get("placement", "")).upper() for b in placed if isinstance(b, Mapping)}
                   & set(plan.PLACEMENTS))
    facts = {"missing": missing, "extra": extra, "bound": bound}
    return _bindings("placements", facts, Level.WARN)


def _bindings(code: str, facts: dict[str, Any], missing: Level) -> Finding:
    """A bindings finding: ``missing`` when the plan would bind some, a warning when it would
    unbind stale ones, else ok."""
    if facts["missing"]:
        return Finding(code, missing, f"{code}.missing", facts)
    if facts["extra"]:
        return Finding(code, Level.WARN, f"{code}.stale", facts)
    return Finding(code, Level.OK, f"{code}.ok", facts)


def _lines(ctx: Context) -> Finding:
    existing = ctx.answer("lines", "lines")
    changes = plan.line_commands(ctx.portal, existing)
    configured = plan.configured_lines(ctx.portal)
    have = {plan.line_number(line.get("NUMBER")) for line in plan.as_list(existing)
            if isinstance(line, Mapping)} - {""}
    facts = {"missing": [p["NUMBER"] for m, p in changes if m == plan.LINE_ADD],
             "differ": [p["NUMBER"] for m, p in changes if m == plan.LINE_UPDATE],
             "configured": len(configured), "others": sorted(have - set(configured))}
    if facts["missing"]:
        return Finding("lines", Level.ERROR, "lines.missing", facts)
    if facts["differ"]:
        return Finding("lines", Level.WARN, "lines.differ", facts)
    if not configured and not have:
        return Finding("lines", Level.OK, "lines.none", facts)
    return Finding("lines", Level.OK, "lines.ok", facts)


def _outgoing_line(ctx: Context) -> Finding:
    line_id = str(ctx.answer("outgoing_line", "outgoing") or "").strip()
    lines = ctx.round.results.get("lines")
    ours = None if lines is None else sorted(
        {plan.line_number(line.get("NUMBER")) for line in plan.as_list(lines)
         if isinstance(line, Mapping)} - {""})
    app = ctx.round.results.get("app")
    app_id = str(app.get("ID")) if isinstance(app, Mapping) and app.get("ID") else None
    verdict, kind = _whose_line(line_id, ours, app_id)
    facts = {"line_id": line_id or None, "line_kind": kind, "our_lines": ours or [],
             "click_to_call": bool(ctx.portal.settings and ctx.portal.settings.pbx_originate_url)}
    if verdict is True:
        return Finding("outgoing_line", Level.OK, "outgoing.yes", facts)
    if verdict is False:
        level = Level.ERROR if facts["click_to_call"] else Level.WARN
        return Finding("outgoing_line", level, "outgoing.no", facts)
    return Finding("outgoing_line", Level.WARN, "outgoing.unknown", facts)


def _whose_line(line_id: str, ours: list[str] | None, app_id: str | None
                ) -> tuple[bool | None, str | None]:
    """(True: the app's, False: clearly another's, None: cannot tell; the kind of line).

    Bitrix24 documents digits for a rented number, ``regXXX`` for a cloud PBX, ``sipXXX`` for an
    office PBX; how an app's line appears is not documented. The voximplant module's source
    lists an app as ``REST_APP:<app id>`` and its lines by their numbers, and answers
    ``LINK_BASE_NUMBER`` when no line is chosen; a "yes" needs one of those to name us.
    """
    if ours is not None and line_id in ours:
        return True, "our_line"
    app = _REST_APP.fullmatch(line_id)
    if app:
        if app_id is None:
            return None, "app"
        return (True, "our_app") if app.group(1) == app_id else (False, "app")
    if line_id == "LINK_BASE_NUMBER":
        return False, "base"
    if _SIP.fullmatch(line_id):
        return False, "sip"
    if _DIGITS.fullmatch(line_id) and ours is not None:
        return False, "rented"
    return None, None


def _users_sync(ctx: Context) -> Finding:
    portal = ctx.portal
    users = db.session.scalars(select(PortalUser).where(PortalUser.portal_id == portal.id)).all()
    at = aware(portal.users_sync_at)
    facts = {"at": _iso(at), "users": len(users), "active": sum(1 for u in users if u.active),
             "error": portal.users_sync_error}
    status = portal.users_sync_status
    if status == "failed":
        return Finding("users_sync", Level.WARN, "users_sync.failed", facts)
    if status == "running" and at is not None and ctx.now - at > STUCK_SYNC:
        return Finding("users_sync", Level.WARN, "users_sync.running", facts)
    if status is None:  # the install reads the users itself and leaves no sync status
        if not users:
            return Finding("users_sync", Level.WARN, "users_sync.never", facts)
        return Finding("users_sync", Level.OK, "users_sync.at_install", facts)
    return Finding("users_sync", Level.OK, "users_sync.ok", facts)


def _active_users(portal: Portal) -> list[PortalUser]:
    return list(db.session.scalars(select(PortalUser).where(
        PortalUser.portal_id == portal.id, PortalUser.active.is_(True)).order_by(
        PortalUser.user_id)))


def _who(user: PortalUser | None, user_id: int) -> str:
    return f"{user.name} ({user_id})" if user is not None and user.name else str(user_id)


def _extensions_missing(ctx: Context) -> Finding:
    """Active users with no extension of their own: none in Bitrix24, no override naming them.
    (One whose extension another user or an override took is ``extensions_taken``'s.)"""
    active = _active_users(ctx.portal)
    mapped = set(extension_map(ctx.portal).values())
    without = [u for u in active if not u.extension and u.user_id not in mapped]
    facts = {"active": len(active), "count": len(without),
             "users": [_who(u, u.user_id) for u in without[:SHOWN_USERS]]}
    if without:
        return Finding("extensions_missing", Level.WARN, "extensions.missing", facts)
    return Finding("extensions_missing", Level.OK, "extensions.all_mapped", facts)


def _extensions_taken(ctx: Context) -> Finding:
    active = {u.user_id: u for u in _active_users(ctx.portal)}
    holders: dict[str, list[int]] = {}
    for user in active.values():
        if user.extension:
            holders.setdefault(user.extension, []).append(user.user_id)
    used = {state.override.extension: state.override.user_id
            for state in overrides(ctx.portal) if state.problem is None}
    duplicates = [f"{ext}: {', '.join(_who(active[u], u) for u in ids)}"
                  for ext, ids in sorted(holders.items()) if len(ids) > 1 and ext not in used]
    shadowed = [f"{ext}: {', '.join(_who(active[u], u) for u in holders[ext] if u != owner)} -> "
                f"{_who(active.get(owner), owner)}"
                for ext, owner in sorted(used.items())
                if any(u != owner for u in holders.get(ext, []))]
    facts = {"duplicates": duplicates, "shadowed": shadowed}
    if duplicates:
        return Finding("extensions_taken", Level.ERROR, "extensions.duplicate", facts)
    if shadowed:
        return Finding("extensions_taken", Level.WARN, "extensions.shadowed", facts)
    return Finding("extensions_taken", Level.OK, "extensions.unique", facts)


def _overrides(ctx: Context) -> Finding:
    states = overrides(ctx.portal)
    ignored = [f"{s.override.extension} -> {s.override.user_id}" for s in states if s.problem]
    facts = {"count": len(states), "ignored": ignored}
    if ignored:
        return Finding("overrides", Level.WARN, "overrides.ignored", facts)
    return Finding("overrides", Level.OK, "overrides.ok" if states else "overrides.none", facts)


CHECKS: tuple[tuple[str, Callable[[Context], Finding]], ...] = (
    ("status", _status), ("token", _token), ("round_trip", _round_trip), ("limits", _limits),
    ("clock", _clock), ("install", _install), ("scopes", _scopes), ("chain_user", _chain_user),
    ("events", _events), ("placements", _placements), ("lines", _lines),
    ("outgoing_line", _outgoing_line), ("users_sync", _users_sync),
    ("extensions_missing", _extensions_missing), ("extensions_taken", _extensions_taken),
    ("overrides", _overrides),
)


def _guarded(code: str, run: Callable[[Context], Finding], ctx: Context) -> Finding:
    try:
        return run(ctx)
    except Unanswered as missing:
        return missing.finding
    except Exception as exc:  # noqa: BLE001 - one check's fault must not cost the others
        log.exception("portal %s: diagnosis check %s failed", ctx.portal.member_id, code)
        return Finding(code, Level.ERROR, "check.crashed", {"error": _error_text(exc)})


def check(portal: Portal) -> Report:
    """Run the round against ``portal`` and every check: the report (never raises for a read).

    Call it with no writes pending in the session: the round may take as long as the portal.
    """
    began, now = time.perf_counter(), utcnow()
    ctx = Context(portal, ask(portal), now, current_app.config)
    findings = [_guarded(code, run, ctx) for code, run in CHECKS]
    report = Report(portal.member_id, portal.domain, now,
                    round(time.perf_counter() - began, 3), findings)
    log.info("portal %s diagnosed: %s (%d error(s), %d warning(s))", portal.member_id,
             report.level.value, report.count(Level.ERROR), report.count(Level.WARN))
    return report


# ---------------------------------------------------------------- the last report


def store(portal: Portal, report: Report, trigger: str) -> PortalDiagnosis:
    """Keep ``report`` as the portal's last (flushed; the caller commits)."""
    row = db.session.scalars(select(PortalDiagnosis).where(
        PortalDiagnosis.portal_id == portal.id)).first()
    if row is None:
        row = PortalDiagnosis(portal_id=portal.id)
        db.session.add(row)
    row.checked_at, row.level, row.trigger = report.checked_at, report.level.value, trigger[:16]
    row.report = report.as_dict()
    db.session.flush()
    return row


def last_report(portal: Portal) -> tuple[Report, PortalDiagnosis] | None:
    """The portal's last stored report and its row (when, what started it), if any."""
    row = db.session.scalars(select(PortalDiagnosis).where(
        PortalDiagnosis.portal_id == portal.id)).first()
    return None if row is None else (Report.from_dict(row.report), row)


# ---------------------------------------------------------------- runs in the workers


def request_check(portal: Portal, trigger: str, delay: float | None = None) -> bool:
    """Ask a worker for a round (after an install or a settings save: call it after the
    commit). It waits ``delay`` seconds (default ``DIAGNOSIS_SETTLE_SECONDS``) so that what
    the change set off settles; whether it was enqueued (a broker fault is logged, not raised:
    the change is saved)."""
    wait = float(current_app.config["DIAGNOSIS_SETTLE_SECONDS"]) if delay is None else delay
    try:
        enqueue(ACTOR, portal.id, trigger, delay_ms=max(0, int(wait * 1000)) or None)
    except (redis.RedisError, dramatiq.errors.DramatiqError, OSError) as exc:
        log.warning("portal %s: no diagnosis asked after %s (%s)", portal.member_id, trigger, exc)
        return False
    return True


def _gate_keys(portal_id: int) -> tuple[str, str]:
    return f"b24relay:diagnosis:ran:{portal_id}", f"b24relay:diagnosis:next:{portal_id}"


def admit(portal_id: int, trailing: bool = False) -> float | None:
    """May a worker's round for this portal run now? ``0.0``: yes. Inside the interval
    (``DIAGNOSIS_MIN_INTERVAL`` since the last run): the seconds until it ends, for the caller
    to schedule the one trailing round that covers every request made meanwhile; ``None`` when
    that trailing round is already scheduled. ``trailing``: this is that round."""
    interval = float(current_app.config["DIAGNOSIS_MIN_INTERVAL"])
    ran, following = _gate_keys(portal_id)
    client = redis_ext.client
    try:
        if trailing:
            client.delete(following)
        if interval <= 0 or client.set(ran, "1", nx=True, px=int(interval * 1000)):
            return 0.0
        left_ms = max(int(client.pttl(ran)), 1)
        if client.set(following, "1", nx=True, px=left_ms + 5000):
            return left_ms / 1000
        return None
    except redis.RedisError as exc:  # the gate is bookkeeping: better one round too many
        log.warning("portal %s: diagnosis gate unavailable (%s); running", portal_id, exc)
        return 0.0


def run(portal_id: int, trigger: str) -> Report | None:
    """A worker's round: check the portal and store the report (committed). None when the
    portal is gone or uninstalled (nothing to ask)."""
    portal = db.session.get(Portal, portal_id)
    if portal is None or portal.status == PortalStatus.UNINSTALLED.value:
        return None
    db.session.commit()  # the round may take as long as the portal: hold no transaction open
    report = check(portal)
    store(portal, report, trigger)
    db.session.commit()
    return report


__all__ = ["ACTOR", "CHECKS", "PROBES", "READ_METHODS", "Finding", "Level", "Report", "admit",
           "check", "last_report", "request_check", "run", "store"]
