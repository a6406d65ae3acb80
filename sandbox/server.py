"""aiohttp front: the cloud port (auth server + control API + bx24.js) and one port per portal."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from . import control, frame
from .cloud import Cloud, loopback_socket
from .latency import draw as draw_latency
from .latency import parse as parse_latency
from .methods_records import store_upload, upload_error
from .phpquery import parse_pairs
from .rest import (
    ApiError,
    Ctx,
    full_time,
    parse_cmds,
    run_batch,
    run_method,
    success_body,
    time_block,
)
from .tls import make_certificates, server_context

JSON_TYPE = "application/json"
GATEWAY_HTML = {
    502: "502 Bad Gateway",
    503: "503 Service Temporarily Unavailable",
    504: "504 Gateway Time-out",
}
JSON_FAULTS = {
    "http_500": (500, "INTERNAL_SERVER_ERROR", "Internal server error"),
    "query_limit": (503, "QUERY_LIMIT_EXCEEDED", "Too many requests"),
    "overload_limit": (503, "OVERLOAD_LIMIT", "REST API is blocked due to overload."),
    "portal_deleted": (500, "PORTAL_DELETED", "Portal was deleted"),
    "payment_required": (401, "PAYMENT_REQUIRED", "Subscription has been ended"),
    "not_installed": (401, "NOT_INSTALLED", "Application not installed"),
    "access_denied": (403, "ACCESS_DENIED", "Access denied!"),
    "expired_token": (401, "expired_token", "The access token provided has expired."),
    "invalid_token": (401, "invalid_token", "Unable to get application by token"),
    "operation_time_limit": (
        429,
        "OPERATION_TIME_LIMIT",
        "Method is blocked due to operation time limit.",
    ),
}
# ``executed_504``: the request runs (side effects happen), then the gateway answers an HTML
# 504 instead of the result, as when Bitrix24's front end gives up on a request that went on.
FAULT_KINDS = set(JSON_FAULTS) | {"html_502", "html_503", "html_504", "reset", "hang",
                                  "executed_504"}


def dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=dumps(data), status=status, content_type=JSON_TYPE, charset="utf-8")


def error_response(err: ApiError) -> web.Response:
    return json_response(err.body(), err.status)


def html_error(status: int) -> web.Response:
    title = GATEWAY_HTML[status]
    body = (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n"
        "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    )
    return web.Response(text=body, status=status, content_type="text/html")


def reset_connection(request: web.Request) -> None:
    """Send a TCP RST (SO_LINGER 0 then abort)."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


async def request_params(request: web.Request) -> dict[str, Any]:
    """Merge query string and body (form with PHP bracket keys, or JSON); body wins."""
    params = parse_pairs(list(request.query.items()))
    if request.method != "POST" or not request.body_exists:
        return params
    ctype = request.content_type
    if ctype == JSON_TYPE or ctype.endswith("+json"):
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise ApiError("INVALID_REQUEST", "Invalid JSON body", 400) from None
        if isinstance(body, dict):
            params.update(body)
        return params
    if ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.post()
        params.update(parse_pairs([(k, v) for k, v in form.items() if isinstance(v, str)]))
        return params
    text = await request.text()
    if text:
        from .phpquery import parse_str

        params.update(parse_str(text))
    return params


def connections(*runners: web.AppRunner) -> list[asyncio.BaseTransport]:
    """The transports of every connection the runners' servers hold now."""
    handlers = [h for r in runners if r.server is not None for h in r.server.connections]
    return [h.transport for h in handlers if h.transport is not None]


class Front:
    """HTTP handlers bound to one Cloud."""

    def __init__(self, cloud: Cloud) -> None:
        self.cloud = cloud

    # ------------------------------------------------------------ portal port
    async def portal_entry(self, request: web.Request) -> web.StreamResponse:
        """Every request on a portal port."""
        port = request.transport.get_extra_info("sockname")[1] if request.transport else 0
        p = self.cloud.ports.get(port)
        if p is None:
            return web.Response(status=404, text="no portal here")
        if port != p.port:
            location = f"{self.cloud.scheme}://{p.domain}{request.path_qs}"
            return web.Response(status=302, headers={"Location": location}, text="")
        path = request.path
        if path.rstrip("/") == "/oauth/authorize":
            status, payload = self.cloud.authorize(p, dict(request.query))
            if status == 302:
                return web.Response(status=302, headers={"Location": payload})
            return web.Response(status=status, text=payload, content_type="text/html")
        if path.startswith("/_sandbox/"):  # the portal's page framing the app (sandbox/frame.py)
            return await frame.portal_page(self.cloud, p, request)
        if not path.startswith("/rest/"):
            return web.Response(status=404, text="Not found")
        name = path[len("/rest/") :].strip("/").lower()
        for suffix in (".json", ".xml"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        if name == "upload":
            return await self.upload(request, p)
        p.bump("in_flight")
        p.counters["max_in_flight"] = max(p.counters["max_in_flight"], p.counters["in_flight"])
        try:
            return await self.rest(request, p, name)
        finally:
            p.bump("in_flight", -1)

    async def rest(self, request: web.Request, p: Any, name: str) -> web.StreamResponse:
        """One REST request: faults, deletion, bucket, auth, then the method or batch."""
        p.bump("rest_requests")
        fault = self.pick_fault(p, await self.called_methods(request, p, name))
        if fault:
            p.fault_injected(fault)
        if fault and fault != "executed_504":
            return await self.apply_fault(request, p, fault)
        resp = await self.run_request(request, p, name)
        if fault and resp.status == 200:
            p.bump("executed_504")
            return self.count(p, html_error(504))
        return resp

    async def run_request(self, request: web.Request, p: Any, name: str) -> web.StreamResponse:
        """Deletion, bucket, auth, then the method or batch (the request kill after
        ``request_timeout``)."""
        if p.deleted:
            return self.count(
                p, error_response(ApiError(*JSON_FAULTS["portal_deleted"][1:], status=500))
            )
        if not p.bucket.admit():
            p.bump("query_limit_exceeded")
            return self.count(
                p, error_response(ApiError("QUERY_LIMIT_EXCEEDED", "Too many requests", 503))
            )
        try:
            params = await request_params(request)
            ctx = self.authenticate(p, params)
        except ApiError as err:
            return self.count(p, error_response(err))
        params.pop("auth", None)
        latency = draw_latency(self.cloud.settings.latency if p.latency is None else p.latency)
        task = asyncio.ensure_future(self.execute(ctx, name, params, latency))
        done, _ = await asyncio.wait({task}, timeout=self.cloud.settings.request_timeout)
        if not done:
            self.cloud._tasks.add(task)
            task.add_done_callback(self.cloud._tasks.discard)
            return self.count(p, html_error(504))
        return self.count(p, task.result())

    def count(self, p: Any, resp: web.Response) -> web.Response:
        if resp.status == 503:
            p.bump("status_503")
        elif resp.status == 429:
            p.bump("status_429")
        elif resp.status == 401:
            p.bump("status_401")
        return resp

    def authenticate(self, p: Any, params: dict[str, Any]) -> Ctx:
        """Resolve the `auth` access token to a user of this portal."""
        raw = params.get("auth")
        if not raw or not isinstance(raw, str):
            raise ApiError("NO_AUTH_FOUND", "Wrong authorization data", 401)
        tok = self.cloud.tokens.access.get(raw)
        if tok is None and self.cloud.revoked_by_uninstall(raw, p.member_id):
            raise ApiError("NOT_INSTALLED", "Application not installed", 401)
        if tok is None or tok.member_id != p.member_id:
            raise ApiError("invalid_token", "Unable to get application by token", 401)
        if tok.expires <= time.time():
            raise ApiError("expired_token", "The access token provided has expired.", 401)
        if not p.installed:
            raise ApiError("NOT_INSTALLED", "Application not installed", 401)
        if not p.subscription_active:
            raise ApiError("PAYMENT_REQUIRED", "Subscription has been ended", 401)
        user = p.users.get(tok.user_id)
        if user is None or not user.active:
            raise ApiError("authorization_error", "Unable to authorize user", 401)
        return Ctx(p, user, self.cloud, token=raw)

    async def execute(
        self, ctx: Ctx, name: str, params: dict[str, Any], latency: float
    ) -> web.Response:
        """Run a method or a batch and shape the answer."""
        if name == "batch":
            ctx.in_batch, ctx.batch_id = True, f"b{ctx.portal.counters['batches'] + 1}"
            ctx.portal.bump("batches")
            start, t0 = time.time(), time.perf_counter()
            try:
                result = await run_batch(ctx, params, latency)
            except ApiError as err:
                return error_response(err)
            processing = time.perf_counter() - t0
            return json_response(
                {
                    "result": result,
                    "time": time_block(start, start + processing, processing, ctx.portal.tz,
                                       ctx.portal.clock_skew),
                }
            )
        result, timing = await run_method(ctx, name, params, latency)
        if isinstance(result, ApiError):
            return error_response(result)
        return json_response(success_body(result, full_time(ctx, name, timing)))

    async def called_methods(self, request: web.Request, p: Any, name: str) -> set[str]:
        """The methods a request calls (a batch's commands), read only when a fault needs it."""
        if name != "batch" or not any(f.methods for f in p.faults):
            return {name}
        try:
            cmds = parse_cmds((await request_params(request)).get("cmd"))
        except (ApiError, ValueError, UnicodeDecodeError):
            return {name}
        return {line.partition("?")[0].strip().lower().removesuffix(".json") for _, line in cmds}

    def pick_fault(self, p: Any, called: set[str]) -> str | None:
        for fault in p.faults:
            if fault.count is not None and fault.count <= 0:
                continue
            if fault.methods and (fault.kind == "operation_time_limit"
                                  or not called.intersection(fault.methods)):
                continue  # a method-bound OPERATION_TIME_LIMIT is per command (rest.py)
            if random.random() < fault.rate:
                if fault.count is not None:
                    fault.count -= 1
                return fault.kind
        return None

    async def apply_fault(self, request: web.Request, p: Any, kind: str) -> web.StreamResponse:
        if kind in JSON_FAULTS:
            status, code, text = JSON_FAULTS[kind]
            return self.count(p, error_response(ApiError(code, text, status)))
        if kind.startswith("html_"):
            return self.count(p, html_error(int(kind[5:])))
        if kind == "hang":
            await asyncio.sleep(self.cloud.settings.hang_cap)
            return html_error(504)
        reset_connection(request)
        return web.Response(status=500)  # never reaches the client: the connection is gone

    async def upload(self, request: web.Request, p: Any) -> web.Response:
        """Multipart upload target handed out by attachRecord(FILENAME only)."""
        token = request.query.get("token", "")
        if token not in p.uploads:
            return error_response(
                ApiError("invalid_token", "Unable to get application by token", 401)
            )
        form = await request.post()
        field = form.get("file")
        if field is None or isinstance(field, str):
            return error_response(ApiError("ERROR_ARGUMENT", "file is required", 400))
        refused = upload_error(p, self.cloud, token, field.filename or "")
        if refused is not None:
            return error_response(refused)
        data = field.file.read()
        result = store_upload(p, token, field.filename or "", data)
        now = time.time()
        return json_response({"result": result,
                              "time": time_block(now, now, 0.0, p.tz, p.clock_skew)})

    # ------------------------------------------------------------ cloud port
    async def oauth_token(self, request: web.Request) -> web.Response:
        """Auth server /oauth/token/ (GET query, or POST form)."""
        q = dict(request.query)
        if request.method == "POST" and request.body_exists:
            form = await request.post()
            q.update({k: v for k, v in form.items() if isinstance(v, str)})
        status, body = self.cloud.token_grant(q)
        return json_response(body, status)

    async def server_app_info(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        if request.method == "POST" and request.body_exists:
            if request.content_type == JSON_TYPE:
                body = await request.json()
                q.update({k: v for k, v in body.items() if isinstance(v, str)})
            else:
                form = await request.post()
                q.update({k: v for k, v in form.items() if isinstance(v, str)})
        status, body = self.cloud.server_app_info(q.get("auth", ""))
        if status == 200:
            now = time.time()
            body["time"] = time_block(now, now, 0.0)
        return json_response(body, status)


def build_apps(cloud: Cloud) -> tuple[web.Application, web.Application]:
    """The cloud application and the (shared) portal application."""
    front = Front(cloud)
    cloud_app = web.Application(client_max_size=64 * 1024 * 1024)
    cloud_app.router.add_route("*", "/oauth/token/", front.oauth_token)
    cloud_app.router.add_route("*", "/oauth/token", front.oauth_token)
    for path in ("/rest/app.info", "/rest/app.info.json"):
        cloud_app.router.add_route("*", path, front.server_app_info)
    control.add_routes(cloud_app, cloud)
    portal_app = web.Application(client_max_size=64 * 1024 * 1024)
    portal_app.router.add_route("*", "/{tail:.*}", front.portal_entry)
    return cloud_app, portal_app


class SandboxServer:
    """The sandbox in a background thread: `.start()`, `.stop()`, `.url`; also a context manager.

    ``tls=True`` is the https mode: every port (cloud and portals) speaks TLS with a
    certificate from a CA made at start; ``ca_file`` is that CA's PEM while the server runs.
    Other keyword arguments are default settings (``latency=0``, ``event_delay=[100, 900]``,
    ...): they apply from the start and a control ``reset`` restores them.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls: bool = False,
                 **settings: Any) -> None:
        if host not in ("127.0.0.1", "localhost"):
            raise ValueError("the sandbox listens on loopback only")
        self.host, self.port = "127.0.0.1", port
        for key in ("latency", "event_delay"):
            if key in settings:
                settings[key] = parse_latency(settings[key])
        self.cloud = Cloud(settings)
        self.cloud.scheme = "https" if tls else "http"
        self.ca_file: str | None = None
        self._ssl: ssl.SSLContext | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._sites: dict[int, web.BaseSite] = {}

    @property
    def url(self) -> str:
        """Cloud base URL, e.g. http://127.0.0.1:41234 (https:// in the https mode)."""
        return f"{self.cloud.scheme}://127.0.0.1:{self.cloud.cloud_port}"

    def start(self) -> SandboxServer:
        """Run the event loop in a daemon thread; return once listening."""
        self._thread = threading.Thread(target=self._run, name="b24-sandbox", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error:
            raise RuntimeError("sandbox failed to start") from self._error
        return self

    def stop(self) -> None:
        """Stop listening and join the thread."""
        if self.loop and self._stop and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(30)

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self.serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()

    async def serve(self, ready: Any = None) -> None:
        """Serve until stopped (used by the thread and by `python -m sandbox`)."""
        tls_dir = self._make_tls() if self.cloud.scheme == "https" else None
        try:
            await self._serve(ready)
        finally:
            if tls_dir:
                shutil.rmtree(tls_dir, ignore_errors=True)

    def _make_tls(self) -> str:
        """A fresh CA and server certificate for this run, in a private temporary directory."""
        tls_dir = tempfile.mkdtemp(prefix="b24-sandbox-tls-")
        files = make_certificates(Path(tls_dir))
        self.ca_file, self._ssl = files.ca_file, server_context(files)
        return tls_dir

    async def _serve(self, ready: Any) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        cloud_app, portal_app = build_apps(self.cloud)
        cloud_runner = web.AppRunner(
            cloud_app, access_log=None, handler_cancellation=True, shutdown_timeout=2
        )
        portal_runner = web.AppRunner(
            portal_app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await cloud_runner.setup()
        await portal_runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.cloud.cloud_port = sock.getsockname()[1]
        cloud_site = web.SockSite(cloud_runner, sock, backlog=1024, ssl_context=self._ssl)
        await cloud_site.start()

        async def open_port() -> int:
            psock = loopback_socket()
            site = web.SockSite(portal_runner, psock, backlog=1024, ssl_context=self._ssl)
            await site.start()
            port = psock.getsockname()[1]
            self._sites[port] = site
            return port

        async def close_port(port: int) -> None:
            site = self._sites.pop(port, None)
            if site is not None:
                await site.stop()

        self.cloud.open_port, self.cloud.close_port = open_port, close_port
        self._ready.set()
        if ready:
            ready(self)
        try:
            await self._stop.wait()
        finally:
            for task in list(self.cloud._tasks):
                task.cancel()
            if self.cloud.http and not self.cloud.http.closed:
                await self.cloud.http.close()
            open_now = connections(portal_runner, cloud_runner)
            await portal_runner.cleanup()
            await cloud_runner.cleanup()
            for transport in open_now:
                transport.abort()  # a TLS close waits for the peer; idle pooled ones never reply

    def request_stop(self) -> None:
        """Ask a loop-owned server to stop (signal handlers)."""
        if self._stop:
            self._stop.set()
