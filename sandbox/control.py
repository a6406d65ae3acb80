"""The control API under /_sandbox/ on the cloud port (JSON, loopback only, no auth) and bx24.js."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import callhistory, delivery, frame
from .cloud import Cloud, ControlError, check_iframe_form
from .latency import SpecError
from .latency import parse as latency_spec
from .state import Fault

FAULTS = {
    "http_500",
    "html_502",
    "html_503",
    "html_504",
    "reset",
    "hang",
    "executed_504",
    "query_limit",
    "portal_deleted",
    "payment_required",
    "not_installed",
    "access_denied",
    "overload_limit",
    "expired_token",
    "invalid_token",
    "operation_time_limit",
}
Route = Callable[[web.Request], Awaitable[web.StreamResponse]]
SPEC_SETTINGS = ("latency", "event_delay")  # sandbox.latency specs, not plain values


def _spec(value: Any) -> Any:
    """A latency/delay spec, or a 400 control error."""
    try:
        return latency_spec(value)
    except SpecError as err:
        raise ControlError(400, str(err)) from None


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(data, default=_default),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _default(obj: Any) -> Any:
    if isinstance(obj, set):
        return sorted(obj)
    return str(obj)


def _guard(func: Callable[[web.Request], Awaitable[Any]]) -> Route:
    """Loopback only; ControlError -> JSON error; results -> JSON."""

    async def wrapper(request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if not peer or peer[0] not in ("127.0.0.1", "::1"):
            return _json({"error": "loopback only"}, 403)
        try:
            out = await func(request)
        except ControlError as err:
            return _json({"error": err.message}, err.status)
        except (KeyError, ValueError, TypeError) as err:
            return _json({"error": f"bad request: {err!r}"}, 400)
        if isinstance(out, web.StreamResponse):
            return out
        return _json(out)

    return wrapper


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    data = await request.json()
    return data if isinstance(data, dict) else {}


def add_routes(app: web.Application, cloud: Cloud) -> None:
    """Mount the control API and the BX24 stand-in."""
    r = app.router
    base = "/_sandbox"

    async def create(request: web.Request) -> Any:
        return await cloud.create_portal(await _body(request))

    async def list_portals(request: web.Request) -> Any:
        return [cloud.describe(p) for p in cloud.portals.values()]

    async def get_portal(request: web.Request) -> Any:
        return cloud.describe(cloud.portal(request.match_info["mid"]))

    async def delete_portal(request: web.Request) -> Any:
        p = cloud.portal(request.match_info["mid"])
        p.deleted = True
        return cloud.describe(p)

    async def plan(request: web.Request) -> Any:
        p = cloud.portal(request.match_info["mid"])
        p.set_plan((await _body(request))["plan"])
        return cloud.describe(p)

    async def bucket(request: web.Request) -> Any:
        p = cloud.portal(request.match_info["mid"])
        body = await _body(request)
        p.bucket.reconfigure(float(body["drain"]), float(body["burst"]))
        if body.get("level") is not None:
            p.bucket.level = float(body["level"])
        return {"drain": p.bucket.drain, "burst": p.bucket.burst, "level": p.bucket.level}

    async def latency(request: web.Request) -> Any:
        p = cloud.portal(request.match_info["mid"])
        body = await _body(request)
        ms = body.get("ms", 0)
        p.latency = None if ms is None else _spec(ms)
        p.latency_operating = bool(body.get("operating", True))
        return {"latency_ms": p.latency, "operating": p.latency_operating,
                "effective": cloud.settings.latency if p.latency is None else p.latency}

    async def faults(request: web.Request) -> Any:
        p = cloud.portal(request.match_info["mid"])
        if request.method == "DELETE":
            p.faults.clear()
            return {"faults": []}
        if request.method == "POST":
            body = await _body(request)
            kind = body["kind"]
            if kind not in FAULTS:
                raise ControlError(400, f"unknown fault {kind}; known: {sorted(FAULTS)}")
            p.faults = [f for f in p.faults if f.kind != kind]
            rate = float(body.get("rate", 1.0))
            if rate > 0:
                count = body.get("count")
                methods = body.get("methods")
                p.faults.append(Fault(kind, rate, None if count is None else int(count),
                                      [str(m).lower() for m in methods] if methods else None))
        return {"faults": [vars(f) for f in p.faults]}

    async def rename(request: web.Request) -> Any:
        return await cloud.rename(cloud.portal(request.match_info["mid"]))

    async def settings(request: web.Request) -> Any:
        if request.method == "POST":
            body = await _body(request)
            for key, value in body.items():
                if not hasattr(cloud.settings, key):
                    raise ControlError(400, f"unknown setting {key}")
                if key == "iframe_form":
                    check_iframe_form(value)
                if key in SPEC_SETTINGS:
                    value = _spec(value)
                else:
                    value = type(getattr(cloud.settings, key))(value)
                setattr(cloud.settings, key, value)
        return vars(cloud.settings)

    async def operating_limit(request: web.Request) -> Any:
        p = cloud.portal(request.match_info["mid"])
        body = await _body(request)
        seconds = None if body.get("seconds") is None else float(body["seconds"])
        if body.get("method"):
            name = str(body["method"]).lower()
            p.method_limits.pop(name, None)
            if seconds is not None:
                p.method_limits[name] = seconds
            return {"method_limits": p.method_limits}
        p.operating_limit = seconds
        return {"operating_limit": p.operating_limit}

    async def method_cost(request: web.Request) -> Any:
        """Extra processing seconds every command of a method takes (costs operating time)."""
        p = cloud.portal(request.match_info["mid"])
        body = await _body(request)
        name, seconds = str(body["method"]).lower(), float(body.get("seconds") or 0)
        p.method_costs.pop(name, None)
        if seconds > 0:
            p.method_costs[name] = seconds
        return {"method_costs": p.method_costs}

    async def expire(request: web.Request) -> Any:
        p = cloud.portal(request.match_info["mid"])
        return {"expired": cloud.tokens.expire_portal(p.member_id)}

    async def subscription(request: web.Request) -> Any:
        body = await _body(request)
        if not isinstance(body.get("active"), bool):
            raise ControlError(400, "active must be true or false")
        return cloud.set_subscription(cloud.portal(request.match_info["mid"]), body["active"])

    async def age_tokens(request: web.Request) -> Any:
        days = float((await _body(request))["days"])
        if days < 0:
            raise ControlError(400, "days must not be negative")
        return cloud.age_tokens(cloud.portal(request.match_info["mid"]), days)

    async def scope(request: web.Request) -> Any:
        body = await _body(request)
        if not isinstance(body.get("scope"), str):
            raise ControlError(400, "scope must be a comma-separated string")
        return cloud.set_scope(cloud.portal(request.match_info["mid"]), body["scope"])

    async def outgoing_line(request: web.Request) -> Any:
        body = await _body(request)
        line_id = body.get("line_id")
        if line_id is not None and (not isinstance(line_id, str) or not line_id.strip()):
            raise ControlError(400, "line_id must be a non-empty string or null")
        return cloud.set_outgoing_line(cloud.portal(request.match_info["mid"]), line_id)

    async def clock(request: web.Request) -> Any:
        skew = float((await _body(request))["skew"])
        return cloud.set_clock_skew(cloud.portal(request.match_info["mid"]), skew)

    async def tokens(request: web.Request) -> Any:
        p = cloud.portal(request.match_info["mid"])
        body = await _body(request)
        user_id = int(body.get("user_id") or cloud._default_user(p))
        access, refresh = cloud.tokens.issue(p.member_id, user_id)
        p.bump("token_grants")
        return {
            "access_token": access.token,
            "refresh_token": refresh.token,
            "expires": int(access.expires),
            "user_id": user_id,
        }

    async def install(request: web.Request) -> Any:
        return await cloud.install(cloud.portal(request.match_info["mid"]), await _body(request))

    async def install_finish(request: web.Request) -> Any:
        """Finish the install without a browser (a stand-in for the installer page's script)."""
        p = cloud.portal(request.match_info["mid"])
        sent = await cloud.finish_install(p)
        return {**install_state_of(p), "onappinstall": sent}

    def install_state_of(p: Any) -> dict[str, Any]:
        return {
            "installed": p.installed,
            "install_finished": p.install_finished,
            "deleted": p.deleted,
        }

    async def install_state(request: web.Request) -> Any:
        return install_state_of(cloud.portal(request.match_info["mid"]))

    async def placement(request: web.Request) -> Any:
        return await cloud.open_placement(
            cloud.portal(request.match_info["mid"]), await _body(request)
        )

    async def events(request: web.Request) -> Any:
        return await cloud.trigger(cloud.portal(request.match_info["mid"]), await _body(request))

    async def deliveries(request: web.Request) -> Any:
        """The portal's delivery log; ``?wait=<s>`` first waits until nothing is in flight or
        queued but what is held."""
        p = cloud.portal(request.match_info["mid"])
        deadline = time.monotonic() + float(request.query.get("wait", 0) or 0)
        while delivery.unsettled(p) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return {"deliveries": [delivery.public(r) for r in p.deliveries],
                "unsettled": delivery.unsettled(p), "held_events": sorted(p.held_events)}

    async def hold(request: web.Request) -> Any:
        p = cloud.portal(request.match_info["mid"])
        return {"held_events": delivery.hold(p, list((await _body(request))["events"]))}

    async def release(request: web.Request) -> Any:
        return {"released": delivery.release(cloud.portal(request.match_info["mid"]))}

    async def uninstall(request: web.Request) -> Any:
        body = await _body(request)
        return await cloud.uninstall(
            cloud.portal(request.match_info["mid"]), bool(body.get("clean"))
        )

    async def log(request: web.Request) -> Any:
        p = cloud.portal(request.match_info["mid"])
        since = int(request.query.get("since", 0) or 0)
        method = request.query.get("method")
        rows = [
            e for e in p.log if e["seq"] > since and (not method or e["method"] == method.lower())
        ]
        return {"entries": rows, "last_seq": p.log_seq}

    async def counters(request: web.Request) -> Any:
        p = cloud.portal(request.match_info["mid"])
        out = dict(p.counters)
        out["bucket_level"] = round(p.bucket.peek(), 3)
        out["violations"] = dict(p.counters["violations"])
        return out

    async def bindings(request: web.Request) -> Any:
        p = cloud.portal(request.match_info["mid"])
        return {
            "events": [dict(b.as_rest(), id=b.id) for b in p.bindings],
            "placements": [b.as_rest() for b in p.placements],
        }

    async def offline(request: web.Request) -> Any:
        p = cloud.portal(request.match_info["mid"])
        if request.method == "DELETE":
            p.offline.clear()
        return {"events": [{k: v for k, v in r.items() if k not in ("TS",)} for r in p.offline]}

    async def calls(request: web.Request) -> Any:
        p = cloud.portal(request.match_info["mid"])
        return {
            "active": list(p.calls.values()),
            "finished": list(p.finished_calls.values()),
            "lines": list(p.lines.values()),
            "missed": list(p.missed),
        }

    async def call_history(request: web.Request) -> Any:
        """The telephony commands of the log grouped per EXTERNAL_CALL_ID (sandbox.callhistory)."""
        p = cloud.portal(request.match_info["mid"])
        return callhistory.history(list(p.log), request.query.get("external_call_id"),
                                   request.query.get("problems") in ("1", "true"))

    async def crm(request: web.Request) -> Any:
        p = cloud.portal(request.match_info["mid"])
        kind = request.match_info["kind"]
        if kind not in p.crm:
            raise ControlError(404, f"unknown entity {kind}")
        if request.method == "POST":
            body = await _body(request)
            p.crm_seq += 1
            rec = {"ID": str(p.crm_seq), "ASSIGNED_BY_ID": "1", **body}
            p.crm[kind][p.crm_seq] = rec
            return rec
        return list(p.crm[kind].values())

    async def frame_page(request: web.Request) -> web.Response:
        """The page framing the app lives on the portal's origin: send the browser there."""
        return frame.frame_redirect(cloud.portal(request.match_info["mid"]), request.query_string)

    async def reset(request: web.Request) -> Any:
        await cloud.reset()
        return {"ok": True}

    async def bx24_js(request: web.Request) -> web.Response:
        return frame.bx24_js()

    def add(method: str, path: str, func: Callable[[web.Request], Awaitable[Any]]) -> None:
        r.add_route(method, base + path, _guard(func))

    add("POST", "/portals", create)
    add("GET", "/portals", list_portals)
    add("GET", "/portals/{mid}", get_portal)
    add("DELETE", "/portals/{mid}", delete_portal)
    add("POST", "/portals/{mid}/plan", plan)
    add("POST", "/portals/{mid}/bucket", bucket)
    add("POST", "/portals/{mid}/latency", latency)
    add("*", "/portals/{mid}/faults", faults)
    add("POST", "/portals/{mid}/rename", rename)
    add("POST", "/portals/{mid}/operating_limit", operating_limit)
    add("POST", "/portals/{mid}/expire_tokens", expire)
    add("POST", "/portals/{mid}/tokens", tokens)
    add("POST", "/portals/{mid}/subscription", subscription)
    add("POST", "/portals/{mid}/age_tokens", age_tokens)
    add("POST", "/portals/{mid}/scope", scope)
    add("POST", "/portals/{mid}/outgoing_line", outgoing_line)
    add("POST", "/portals/{mid}/clock", clock)
    add("POST", "/portals/{mid}/install", install)
    add("POST", "/portals/{mid}/install_finish", install_finish)
    add("GET", "/portals/{mid}/install_state", install_state)
    add("POST", "/portals/{mid}/placements/open", placement)
    add("GET", "/portals/{mid}/frame", frame_page)
    add("POST", "/portals/{mid}/events", events)
    add("POST", "/portals/{mid}/uninstall", uninstall)
    add("GET", "/portals/{mid}/deliveries", deliveries)
    add("POST", "/portals/{mid}/hold_events", hold)
    add("POST", "/portals/{mid}/release_events", release)
    add("GET", "/portals/{mid}/log", log)
    add("GET", "/portals/{mid}/counters", counters)
    add("GET", "/portals/{mid}/bindings", bindings)
    add("*", "/portals/{mid}/offline_events", offline)
    add("GET", "/portals/{mid}/calls", calls)
    add("GET", "/portals/{mid}/call_history", call_history)
    add("POST", "/portals/{mid}/method_cost", method_cost)
    add("*", "/portals/{mid}/crm/{kind}", crm)
    add("*", "/settings", settings)
    add("POST", "/reset", reset)
    r.add_get("/bx24.js", bx24_js)
