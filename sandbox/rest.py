"""REST plumbing: errors, the method registry, the time block and batch execution."""

from __future__ import annotations

import asyncio
import inspect
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any

from .phpquery import parse_str, php_shape, scalar_to_str
from .state import Portal, User

MAX_BATCH = 50
PAGE = 50


class ApiError(Exception):
    """A Bitrix24 error answer: {"error": code, "error_description": text} with an HTTP status."""

    def __init__(self, code: str, description: str, status: int = 400, **extra: Any) -> None:
        super().__init__(f"{code}: {description}")
        self.code, self.description, self.status, self.extra = code, description, status, extra

    def body(self) -> dict[str, Any]:
        """The JSON error body."""
        return {"error": self.code, "error_description": self.description, **self.extra}


@dataclass
class Ctx:
    """What a method sees: the portal, the calling user, and the cloud for side effects."""

    portal: Portal
    user: User
    cloud: Any
    in_batch: bool = False
    batch_id: str | None = None
    # What a method adds to its command-log entry (e.g. whether a register created a call).
    note: dict[str, Any] = field(default_factory=dict)
    token: str = ""  # the access token of the request (attachRecord's upload URL embeds it)


@dataclass
class Page:
    """A list-method result with paging info."""

    items: list[Any]
    next: int | None
    total: int | None


Handler = Callable[[Ctx, dict[str, Any]], Any]


@dataclass
class Method:
    name: str
    func: Handler
    scope: str | None
    admin: bool = False


METHODS: dict[str, Method] = {}


def method(
    name: str, scope: str | None = None, admin: bool = False
) -> Callable[[Handler], Handler]:
    """Register a REST method under its lower-case name."""

    def deco(func: Handler) -> Handler:
        METHODS[name.lower()] = Method(name.lower(), func, scope, admin)
        return func

    return deco


def iso(ts: float, tz: tzinfo | None = None) -> str:
    """ISO-8601 with the offset of ``tz`` (the portal's time zone), as Bitrix24 prints dates."""
    return datetime.fromtimestamp(ts, tz or UTC).isoformat(timespec="seconds")


def time_block(
    start: float, finish: float, processing: float, tz: tzinfo | None = None, skew: float = 0.0
) -> dict[str, Any]:
    """The per-call `time` block without the operating fields, read off the portal's clock
    (``skew`` seconds off ours: `start`, `finish` and both dates move, durations do not)."""
    return {
        "start": round(start + skew, 6),
        "finish": round(finish + skew, 6),
        "duration": round(finish - start, 6),
        "processing": round(processing, 6),
        "date_start": iso(start + skew, tz),
        "date_finish": iso(finish + skew, tz),
    }


def page(items: list[Any], params: dict[str, Any]) -> Page:
    """Slice a full list per `start` (page 50; start=-1 skips counting)."""
    raw = params.get("start", params.get("START", 0))
    try:
        start = int(raw or 0)
    except (TypeError, ValueError):
        start = 0
    if start == -1:
        return Page(items[:PAGE], None, None)
    start = max(start, 0)
    chunk = items[start : start + PAGE]
    nxt = start + PAGE if start + PAGE < len(items) else None
    return Page(chunk, nxt, len(items))


def scope_ok(portal: Portal, scope: str | None) -> bool:
    """Whether the app was granted one of the method's scopes ('a|b' = any)."""
    if not scope:
        return True
    granted = set(portal.scope.split(","))
    return any(s in granted for s in scope.split("|"))


def operating_limit(ctx: Ctx, name: str = "") -> float:
    """The method's own limit if set, else the portal's, else the cloud's."""
    if name in ctx.portal.method_limits:
        return ctx.portal.method_limits[name]
    return (
        ctx.portal.operating_limit
        if ctx.portal.operating_limit is not None
        else ctx.cloud.settings.operating_limit
    )


def command_fault(portal: Portal, name: str) -> bool:
    """Whether a method-bound OPERATION_TIME_LIMIT fault hits this command (one draw)."""
    for fault in portal.faults:
        if fault.kind != "operation_time_limit" or not fault.methods or name not in fault.methods:
            continue
        if fault.count is not None and fault.count <= 0:
            continue
        if random.random() < fault.rate:
            if fault.count is not None:
                fault.count -= 1
            portal.fault_injected("operation_time_limit")
            return True
    return False


async def run_method(
    ctx: Ctx, name: str, params: dict[str, Any], latency: float
) -> tuple[Any, dict[str, Any]]:
    """Execute one command with its latency share; log it; return (result or ApiError, timing)."""
    portal = ctx.portal
    start = time.time()
    t0 = time.perf_counter()
    status: Any = 200
    result: Any
    waited = 0.0  # latency that is waiting, not processing
    ctx.note = {}
    try:
        meth = METHODS.get(name.lower())
        if meth is None:
            raise ApiError("ERROR_METHOD_NOT_FOUND", "Method not found!", 404)
        if not scope_ok(portal, meth.scope):
            raise ApiError(
                "insufficient_scope",
                "The request requires higher privileges than provided by the access token",
                403,
            )
        if portal.operating.operating(meth.name) > operating_limit(ctx, meth.name) or (
            command_fault(portal, meth.name)
        ):
            portal.bump("operation_time_limit")
            raise ApiError(
                "OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit.", 429
            )
        if meth.admin and not ctx.user.admin:
            raise ApiError("ACCESS_DENIED", "Access denied! Admin permissions required", 403)
        if latency > 0:
            await asyncio.sleep(latency)
            waited = 0.0 if portal.latency_operating else latency
        if portal.method_costs.get(meth.name):
            await asyncio.sleep(portal.method_costs[meth.name])  # processing: costs operating
        out = meth.func(ctx, params)
        result = await out if inspect.isawaitable(out) else out
    except ApiError as err:
        result, status = err, err.status
    finish = start + time.perf_counter() - t0
    processing = max(0.0, finish - start - waited)
    if name.lower() in METHODS and not (
        isinstance(result, ApiError) and result.code == "OPERATION_TIME_LIMIT"
    ):
        portal.operating.add(name.lower(), processing, finish)
    portal.bump("commands")
    portal.record(
        {
            "method": name.lower(),
            "params": params,
            "start": start,
            "finish": finish,
            "status": status,
            "error": result.code if isinstance(result, ApiError) else None,
            "in_batch": ctx.in_batch,
            "batch_id": ctx.batch_id,
            "user_id": ctx.user.id,
            **ctx.note,
        }
    )
    return result, time_block(start, finish, processing, portal.tz, portal.clock_skew)


def full_time(ctx: Ctx, name: str, timing: dict[str, Any]) -> dict[str, Any]:
    """The top-level time block with operating fields for a single call."""
    now = time.time()
    timing = dict(timing)
    timing["operating_reset_at"] = int(ctx.portal.operating.reset_at(name.lower(), now)
                                       + ctx.portal.clock_skew)
    timing["operating"] = round(ctx.portal.operating.operating(name.lower(), now), 6)
    return timing


def success_body(result: Any, timing: dict[str, Any]) -> dict[str, Any]:
    """{"result", ["next"], ["total"], "time"} for a method result."""
    if isinstance(result, Page):
        body: dict[str, Any] = {"result": result.items}
        if result.next is not None:
            body["next"] = result.next
        if result.total is not None:
            body["total"] = result.total
        body["time"] = timing
        return body
    return {"result": result, "time": timing}


# ---------------------------------------------------------------- batch

_REF_RE = re.compile(r"\$(result|error|time|next|total)((?:\[[^\[\]]*\])+)")
_SECTION = {
    "result": "result",
    "error": "result_error",
    "time": "result_time",
    "next": "result_next",
    "total": "result_total",
}


def _lookup(sections: dict[str, dict[str, Any]], name: str, path: str) -> tuple[bool, Any]:
    node: Any = sections[_SECTION[name]]
    for part in re.findall(r"\[([^\[\]]*)\]", path):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def substitute(value: Any, sections: dict[str, dict[str, Any]]) -> Any:
    """Replace $result[key][field]... references in parameter values (missing refs stay literal)."""
    if isinstance(value, dict):
        return {k: substitute(v, sections) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, sections) for v in value]
    if not isinstance(value, str) or "$" not in value:
        return value
    whole = _REF_RE.fullmatch(value)
    if whole:
        found, target = _lookup(sections, whole.group(1), whole.group(2))
        if found and isinstance(target, (dict, list)):
            return target

    def repl(m: re.Match[str]) -> str:
        found, target = _lookup(sections, m.group(1), m.group(2))
        return (
            scalar_to_str(target) if found and not isinstance(target, (dict, list)) else m.group(0)
        )

    return _REF_RE.sub(repl, value)


def parse_cmds(raw: Any) -> list[tuple[str, str]]:
    """Normalise `cmd` (map or list) into [(key, 'method?query')]."""
    if isinstance(raw, dict):
        return [(str(k), v if isinstance(v, str) else "") for k, v in raw.items()]
    if isinstance(raw, list):
        return [(str(i), v if isinstance(v, str) else "") for i, v in enumerate(raw)]
    raise ApiError("ERROR_ARGUMENT", "Argument 'cmd' is null or empty", 400)


def truthy(value: Any) -> bool:
    """PHP-ish truthiness of a request flag."""
    return str(value).strip().lower() in ("1", "true", "y", "yes", "on")


async def run_batch(ctx: Ctx, params: dict[str, Any], latency: float) -> dict[str, Any]:
    """Execute a batch: ≤50 commands, halt, references; sections shaped like PHP arrays."""
    cmds = parse_cmds(params.get("cmd"))
    if not cmds:
        raise ApiError("ERROR_ARGUMENT", "Argument 'cmd' is null or empty", 400)
    halt = truthy(params.get("halt", 0))
    sections: dict[str, dict[str, Any]] = {s: {} for s in _SECTION.values()}
    share = latency / min(len(cmds), MAX_BATCH)
    for index, (key, line) in enumerate(cmds):
        if index >= MAX_BATCH:
            sections["result_error"][key] = {
                "error": "ERROR_BATCH_LENGTH_EXCEEDED",
                "error_description": "Max batch length exceeded",
            }
            if halt:
                break
            continue
        name, _, query = line.partition("?")
        name = name.strip().lower()
        if name.endswith(".json"):
            name = name[:-5]
        if name == "batch":
            sections["result_error"][key] = {
                "error": "ERROR_BATCH_METHOD_NOT_ALLOWED",
                "error_description": "Method is not allowed for batch usage",
            }
            if halt:
                break
            continue
        sub_params = substitute(parse_str(query), sections)
        result, timing = await run_method(ctx, name, sub_params, share)
        if isinstance(result, ApiError) and result.status == 200:
            # An error a method answers with HTTP 200 is its returned value (placement.bind):
            # inside a batch it lands among the results, not in result_error.
            sections["result"][key] = result.body()
            sections["result_time"][key] = timing
            continue
        if isinstance(result, ApiError):
            sections["result_error"][key] = result.body()
            if halt:
                break
            continue
        if isinstance(result, Page):
            sections["result"][key] = result.items
            if result.next is not None:
                sections["result_next"][key] = result.next
            if result.total is not None:
                sections["result_total"][key] = result.total
        else:
            sections["result"][key] = result
        sections["result_time"][key] = timing
    return {
        s: php_shape(v)
        for s, v in (
            ("result", sections["result"]),
            ("result_error", sections["result_error"]),
            ("result_total", sections["result_total"]),
            ("result_next", sections["result_next"]),
            ("result_time", sections["result_time"]),
        )
    }
