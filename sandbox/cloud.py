"""The fake cloud: portals, the auth server logic and the portal acting towards the app."""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp

from . import (  # noqa: F401  (registers the methods)
    delivery,
    methods_core,
    methods_crm,
    methods_records,
    methods_telephony,
)
from .limits import PLANS
from .phpquery import build_query
from .rest import Ctx
from .state import IFRAME_FORMS, Portal, Settings, TokenStore, User, hex32, parse_time_zone

TOKEN_EVENTS = {"ONAPPINSTALL", "ONAPPUPDATE", "ONOFFLINEEVENT", "ONSUBSCRIPTIONRENEW"}
USER_AGENT = "Bitrix24 Webhook Engine"
INSTALL_DATA = {"VERSION": "1", "ACTIVE": "Y", "INSTALLED": "Y", "LANGUAGE_ID": "en"}
# The three fields only the full iframe form carries (§2.3); the short form omits them.
FULL_FORM_ONLY = ("SERVER_ENDPOINT", "APPLICATION_TOKEN", "APPLICATION_SCOPE")


def check_iframe_form(value: Any) -> str:
    """A valid iframe form name ("full" or "short"), or a 400 control error."""
    if value not in IFRAME_FORMS:
        raise ControlError(400, f"iframe_form must be one of {list(IFRAME_FORMS)}, got {value!r}")
    return str(value)


def check_lang(value: Any) -> str:
    """A user's language as Bitrix24 names it in LANG: two lowercase letters (en, ru, de, ua)."""
    lang = str(value).strip().lower()
    if len(lang) != 2 or not lang.isalpha():
        raise ControlError(400, f"lang {value!r} is not a two-letter language code (en, ru, de)")
    return lang


def check_time_zone(value: Any) -> str:
    """A valid portal time zone (IANA name or "+03:00"), or a 400 control error."""
    try:
        parse_time_zone(str(value))
    except ValueError as exc:
        raise ControlError(400, str(exc)) from None
    return str(value)


# The token endpoint's answer to a chain of an uninstalled app (issue #11 point 4 reading).
NOT_INSTALLED = {"error": "NOT_INSTALLED", "error_description": "Application not installed"}
# The token endpoint's and REST's answer while the app's subscription has lapsed (§1.7, §4.3).
PAYMENT_REQUIRED = {"error": "PAYMENT_REQUIRED", "error_description": "Subscription has been ended"}
# A client_id that is not the app's: HTTP 200 with an error body (§1.7, b24pysdk).
WRONG_CLIENT = {"error": "wrong_client", "error_description": "Wrong client"}


class ControlError(Exception):
    """A control API error: (HTTP status, message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Cloud:
    """All state and behaviour; the aiohttp layer only translates HTTP to these calls."""

    def __init__(self, defaults: dict[str, Any] | None = None) -> None:
        # What `reset` restores: Settings' defaults with the server's own on top.
        self.defaults = dict(defaults or {})
        self.settings = Settings(**self.defaults)
        self.tokens = TokenStore(self.settings)
        self.portals: dict[str, Portal] = {}
        self.ports: dict[int, Portal] = {}
        self.sessions: dict[str, dict[str, Any]] = {}
        self.cloud_port = 0
        self.scheme = "http"  # "https" in the https mode (SandboxServer(tls=True))
        self.open_port: Callable[[], Awaitable[int]] | None = None
        self.close_port: Callable[[int], Awaitable[None]] | None = None
        self.http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------ addressing
    @property
    def server_host(self) -> str:
        return f"127.0.0.1:{self.cloud_port}"

    @property
    def server_endpoint(self) -> str:
        return f"{self.scheme}://{self.server_host}/rest/"

    @property
    def protocol(self) -> int:
        """What iframe POSTs say in ``PROTOCOL`` (§2.3): 1 for https, 0 for http."""
        return 1 if self.scheme == "https" else 0

    def portal(self, member_id: str) -> Portal:
        """The portal or a 404 control error."""
        p = self.portals.get(member_id)
        if p is None:
            raise ControlError(404, f"unknown portal {member_id}")
        return p

    # ------------------------------------------------------------ portals
    async def create_portal(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Create a portal on a fresh loopback port, with users and the app installed (not
        finished).
        """
        users_spec = spec.get("users") or [
            {"id": 1, "name": "Admin", "admin": True, "extension": "101"}
        ]
        users = {
            int(u["id"]): User(
                int(u["id"]),
                u.get("name", ""),
                u.get("last_name", ""),
                bool(u.get("admin")),
                str(u.get("extension") or ""),
                bool(u.get("active", True)),
                u.get("email", ""),
                [str(n) for n in u.get("phones") or []],
                str(u.get("timeman") or "NOT_INSTALLED"),
                check_lang(u.get("lang") or "en"),
            )
            for u in users_spec
        }
        member_id = spec.get("member_id") or hex32()
        if member_id in self.portals:
            raise ControlError(409, f"portal {member_id} exists")
        plan = spec.get("plan", "standard")
        if plan not in PLANS:
            raise ControlError(400, f"unknown plan {plan}")
        p = Portal(
            member_id=member_id,
            plan=plan,
            users=users,
            client_id=spec.get("client_id", "app.sandbox"),
            client_secret=spec.get("client_secret", "sandbox-secret"),
            app_url=spec.get("app_url"),
            scope=spec.get("scope") or "crm,telephony,placement,user_basic",
            status=spec.get("status", "P"),
            scheme=self.scheme,
        )
        if spec.get("application_token"):
            p.application_token = spec["application_token"]
        if spec.get("iframe_form") is not None:
            p.iframe_form = check_iframe_form(spec["iframe_form"])
        if spec.get("time_zone"):
            p.time_zone = check_time_zone(spec["time_zone"])
        p.missing_placements = [str(c).upper() for c in spec.get("missing_placements") or []]
        for key in ("redirect_url", "install_url", "app_page_url", "events_url"):
            setattr(p, key, spec.get(key))
        p.set_plan(plan)
        p.bucket.level = 0.0
        if spec.get("bucket"):
            p.bucket.reconfigure(float(spec["bucket"]["drain"]), float(spec["bucket"]["burst"]))
        p.log = type(p.log)(maxlen=self.settings.log_limit)
        assert self.open_port is not None
        p.port = await self.open_port()
        self.ports[p.port] = p
        self.portals[member_id] = p
        admin = next(iter(p.admins()), None) or next(iter(users.values()))
        access, refresh = self.tokens.issue(member_id, admin.id)
        info = self.describe(p)
        info.update(
            {
                "access_token": access.token,
                "refresh_token": refresh.token,
                "user_id": admin.id,
                "expires": int(access.expires),
            }
        )
        return info

    def describe(self, p: Portal) -> dict[str, Any]:
        """Public facts about a portal."""
        return {
            "member_id": p.member_id,
            "domain": p.domain,
            "protocol": self.protocol,
            "port": p.port,
            "ports": [p.port, *p.old_ports],
            "client_endpoint": p.client_endpoint,
            "server_endpoint": self.server_endpoint,
            "oauth_token_url": f"{self.scheme}://{self.server_host}/oauth/token/",
            "plan": p.plan,
            "client_id": p.client_id,
            "client_secret": p.client_secret,
            "application_token": p.application_token,
            "scope": p.scope,
            "status": p.status,
            "iframe_form": self.iframe_form(p),
            "time_zone": p.time_zone,
            "clock_skew": p.clock_skew,
            "outgoing_line": methods_telephony.outgoing_line(p),
            "app_url": p.app_url,
            "deleted": p.deleted,
            "installed": p.installed,
            "install_finished": p.install_finished,
            "subscription_active": p.subscription_active,
            "users": [
                {
                    "id": u.id,
                    "name": u.name,
                    "admin": u.admin,
                    "extension": u.extension,
                    "active": u.active,
                    "timeman": u.timeman,
                    "lang": u.lang,
                }
                for u in p.users.values()
            ],
        }

    async def rename(self, p: Portal) -> dict[str, Any]:
        """Move the portal to a new host; the old one answers 302."""
        assert self.open_port is not None
        new = await self.open_port()
        p.old_ports.append(p.port)
        p.port = new
        self.ports[new] = p
        return self.describe(p)

    def set_subscription(self, p: Portal, active: bool) -> dict[str, Any]:
        """Lapse (False) or renew (True) the app's subscription on the portal.

        While lapsed the token endpoint and REST answer PAYMENT_REQUIRED and no event is
        sent (protocol §1.7, §3.3); renewing restores all of it. Tokens are not touched:
        a refused refresh spends nothing.
        """
        p.subscription_active = bool(active)
        return self.describe(p)

    def set_scope(self, p: Portal, scope: str) -> dict[str, Any]:
        """The scopes the app holds on the portal from now on (an administrator granted or
        withdrew some): REST methods of a missing scope answer ``insufficient_scope``."""
        p.scope = ",".join(s.strip() for s in scope.split(",") if s.strip())
        return self.describe(p)

    def set_outgoing_line(self, p: Portal, line_id: str | None) -> dict[str, Any]:
        """An administrator picks the default number for outgoing calls: ``None`` gives it back
        to the app; an id that is not the app's (``sip12``, ``reg3``, a rented number, another
        app's ``REST_APP:9``) is a line of the portal's own, which the portal then knows."""
        p.outgoing_line = None if line_id is None else str(line_id).strip()
        if p.outgoing_line is not None and p.outgoing_line not in \
                methods_telephony.app_line_ids(p):
            p.other_lines.add(p.outgoing_line)
        return self.describe(p)

    def set_clock_skew(self, p: Portal, seconds: float) -> dict[str, Any]:
        """Put the portal's clock ``seconds`` ahead of ours (negative: behind)."""
        p.clock_skew = float(seconds)
        return self.describe(p)

    def age_tokens(self, p: Portal, days: float) -> dict[str, Any]:
        """Pretend `days` went by for the portal's tokens and codes: their issue times move back."""
        moved = self.tokens.age_portal(p.member_id, float(days) * 86_400)
        return {"member_id": p.member_id, "days": float(days), "moved": moved}

    async def reset(self) -> None:
        """Forget every portal and restore default settings."""
        for p in self.portals.values():
            p.deleted = True  # what is still queued for it is dropped, held or not
            delivery.release(p)
        for port in list(self.ports):
            if self.close_port:
                await self.close_port(port)
        self.ports.clear()
        self.portals.clear()
        self.sessions.clear()
        fresh = Settings(**self.defaults)
        for key, value in vars(fresh).items():
            setattr(self.settings, key, value)
        self.tokens.access.clear()
        self.tokens.refresh.clear()
        self.tokens.codes.clear()
        self.tokens.revoked.clear()

    # ------------------------------------------------------------ auth server
    def token_grant(self, q: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """The /oauth/token/ endpoint: refresh_token and authorization_code grants."""
        grant = q.get("grant_type", "")
        if grant == "refresh_token":
            return self._refresh_grant(q)
        if grant == "authorization_code":
            return self._code_grant(q)
        return 400, {
            "error": "invalid_request",
            "error_description": "Invalid grant_type parameter",
        }

    def _client_error(self, p: Portal | None, q: dict[str, str]) -> tuple[int, dict] | None:
        """The answer to a grant whose client is wrong, or None when the client is right.

        A client_id that is not the app's (or, before the token is known, no app's) gets HTTP
        200 with ``wrong_client`` (protocol §1.7, b24pysdk); the right client_id with a wrong
        secret gets ``400 invalid_client``.
        """
        client_id = q.get("client_id") or ""
        if p is None:
            known = any(x.client_id == client_id for x in self.portals.values())
            return None if known else (200, dict(WRONG_CLIENT))
        if client_id != p.client_id:
            return 200, dict(WRONG_CLIENT)
        if q.get("client_secret") != p.client_secret:
            return 400, {
                "error": "invalid_client",
                "error_description": "Invalid client credentials",
            }
        return None

    def _app_refusal(self, p: Portal) -> tuple[int, dict[str, Any]] | None:
        """Why the portal's app may get no tokens now: uninstalled or its subscription lapsed."""
        if not p.installed:
            return 401, dict(NOT_INSTALLED)
        if not p.subscription_active:
            return 401, dict(PAYMENT_REQUIRED)
        return None

    def _refresh_grant(self, q: dict[str, str]) -> tuple[int, dict[str, Any]]:
        raw = q.get("refresh_token")
        if not raw:
            return 400, {
                "error": "invalid_request",
                "error_description": 'No "refresh_token" parameter found',
            }
        tok = self.tokens.refresh.get(raw)
        p = self.portals.get(tok.member_id) if tok else None
        owner = self.portals.get(self.tokens.revoked.get(raw, ""))
        refused = self._client_error(p or owner, q)
        if refused:
            return refused
        if tok is None and self.revoked_by_uninstall(raw):
            return 401, dict(NOT_INSTALLED)
        if tok is None or p is None:
            return 400, {"error": "invalid_grant", "error_description": "Invalid refresh token"}
        if tok.spent:
            p.violation("refresh_token_reuse")
            if self.settings.reuse_revokes_chain:
                self.tokens.revoke_descendants(tok)
            return 400, {
                "error": "invalid_grant",
                "error_description": "Refresh token has already been used",
            }
        if self.tokens.refresh_expired(tok):
            return 400, {"error": "invalid_grant", "error_description": "Refresh token expired"}
        if p.deleted:
            return 400, {"error": "invalid_grant", "error_description": "Application not installed"}
        refused = self._app_refusal(p)
        if refused:
            return refused
        access, refresh = self.tokens.rotate(tok)
        p.bump("refreshes")
        p.bump("token_grants")
        return 200, self.token_body(p, access, refresh, first=False)

    def _code_grant(self, q: dict[str, str]) -> tuple[int, dict[str, Any]]:
        raw = q.get("code")
        if not raw:
            return 400, {
                "error": "invalid_request",
                "error_description": 'No "code" parameter found',
            }
        code = self.tokens.codes.get(raw)
        p = self.portals.get(code.member_id) if code else None
        refused = self._client_error(p, q)
        if refused:
            return refused
        if code is None or p is None:
            return 400, {
                "error": "invalid_grant",
                "error_description": "Invalid authorization code",
            }
        if code.used or code.expires < time.time():
            code.used = True
            return 400, {
                "error": "invalid_grant",
                "error_description": "Authorization code expired or used",
            }
        refused = self._app_refusal(p)
        if refused:
            return refused
        code.used = True
        access, refresh = self.tokens.issue(p.member_id, code.user_id)
        p.bump("auth_code_grants")
        p.bump("token_grants")
        return 200, self.token_body(p, access, refresh, first=True)

    def revoked_by_uninstall(self, token: str, member_id: str | None = None) -> bool:
        """Whether `token` (of `member_id`, if given) died with an uninstall that still stands."""
        owner = self.tokens.revoked.get(token or "")
        p = self.portals.get(owner) if owner else None
        return p is not None and not p.installed and member_id in (None, owner)

    def token_body(self, p: Portal, access: Any, refresh: Any, first: bool) -> dict[str, Any]:
        """Token response in the §1.4 field order (first exchange omits expires and user_id, as the
        docs show).
        """
        body: dict[str, Any] = {"access_token": access.token}
        if not first:
            body["expires"] = int(access.expires)
        body.update(
            {
                "expires_in": self.settings.token_ttl,
                "scope": p.scope,
                "domain": self.server_host,
                "server_endpoint": self.server_endpoint,
                "status": p.status,
                "client_endpoint": p.client_endpoint,
                "member_id": p.member_id,
            }
        )
        if not first:
            body["user_id"] = access.user_id
        body["refresh_token"] = refresh.token
        return body

    def server_app_info(self, token: str) -> tuple[int, dict[str, Any]]:
        """Auth-server app.info: token introspection."""
        tok = self.tokens.access.get(token or "")
        if tok is None or tok.member_id not in self.portals:
            return 401, {
                "error": "invalid_token",
                "error_description": "Unable to get application by token",
            }
        if tok.expires <= time.time():
            return 401, {
                "error": "expired_token",
                "error_description": "The access token provided has expired.",
            }
        p = self.portals[tok.member_id]
        exp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(tok.expires))
        return 200, {
            "result": {
                "client_id": p.client_id,
                "scope": p.scope,
                "expires": exp,
                "user_id": tok.user_id,
                "install": {
                    "installed": p.install_finished,
                    "version": "1",
                    "status": p.status,
                    "scope": p.scope,
                    "domain": p.domain,
                    "uri": f"{self.scheme}://{p.domain}",
                    "client_endpoint": p.client_endpoint,
                    "member_id": p.member_id,
                    "member_type": "company",
                },
            }
        }

    def authorize(self, p: Portal, q: dict[str, str]) -> tuple[int, str]:
        """Portal /oauth/authorize/: (302, location) or (400, html)."""
        if q.get("client_id") != p.client_id or not p.installed:
            return 400, "<html><body>Application not found or not installed</body></html>"
        try:
            user_id = int(q.get("user_id") or next(iter(p.admins())).id)
        except (StopIteration, ValueError):
            return 400, "<html><body>No user</body></html>"
        code = self.tokens.new_code(p.member_id, user_id, p.client_id)
        target = p.redirect_url or (
            p.app_url.rstrip("/") + "/oauth/callback" if p.app_url else None
        )
        if not target:
            return 200, f"<html><body>Authorization code: <code>{code.code}</code></body></html>"
        query = urlencode(
            {
                "code": code.code,
                "state": q.get("state", ""),
                "domain": p.domain,
                "member_id": p.member_id,
                "scope": p.scope,
                "server_domain": self.server_host,
            }
        )
        return 302, target + ("&" if "?" in target else "?") + query

    # ------------------------------------------------------------ outgoing HTTP
    async def session(self) -> aiohttp.ClientSession:
        if self.http is None or self.http.closed:
            self.http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=200, force_close=True)
            )
        return self.http

    async def post_form(
        self, url: str, body: str, timeout: float, follow: bool = False
    ) -> dict[str, Any]:
        """POST a urlencoded body; report status, content type and text (or the transport error)."""
        http = await self.session()
        headers = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": USER_AGENT}
        try:
            async with http.post(
                url,
                data=body.encode(),
                headers=headers,
                allow_redirects=follow,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                text = await resp.text(errors="replace")
                return {
                    "url": url,
                    "status": resp.status,
                    "content_type": resp.content_type,
                    "body": text,
                }
        except TimeoutError:
            return {"url": url, "status": None, "error": "timeout"}
        except aiohttp.ClientError as exc:
            return {"url": url, "status": None, "error": f"{type(exc).__name__}: {exc}"}

    async def download(self, url: str) -> tuple[int, bytes, dict[str, str]]:
        """Fetch a record file: status (0 = unreachable), body, lower-case headers (loopback
        only: the sandbox has no real network)."""
        host = urlsplit(url).hostname or ""
        if host not in ("127.0.0.1", "localhost", "::1"):
            return 0, b"", {}
        http = await self.session()
        try:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                headers = {k.lower(): v for k, v in resp.headers.items()}
                return resp.status, await resp.read(), headers
        except (TimeoutError, aiohttp.ClientError):
            return 0, b"", {}

    # ------------------------------------------------------------ events
    def event_auth(self, p: Portal, user_id: int | None, with_refresh: bool) -> dict[str, str]:
        """The auth[...] block: tokens of `user_id`, or the five token-less keys when None."""
        if user_id is None:
            return {
                "domain": p.domain,
                "server_endpoint": self.server_endpoint,
                "client_endpoint": p.client_endpoint,
                "member_id": p.member_id,
                "application_token": p.application_token,
            }
        access = p.event_tokens.get(user_id)
        if (
            with_refresh
            or access is None
            or access.expires < time.time() + 300
            or access.token not in self.tokens.access
        ):
            access, _ = self.tokens.issue(p.member_id, user_id)
            if not with_refresh:
                p.event_tokens[user_id] = access
        auth = {
            "access_token": access.token,
            "expires": str(int(access.expires)),
            "expires_in": str(self.settings.token_ttl),
            "scope": p.scope,
            "domain": p.domain,
            "server_endpoint": self.server_endpoint,
            "status": p.status,
            "client_endpoint": p.client_endpoint,
            "member_id": p.member_id,
            "user_id": str(user_id),
        }
        if with_refresh:
            auth["refresh_token"] = access.refresh or ""
        auth["application_token"] = p.application_token
        return auth

    def event_body(
        self,
        p: Portal,
        event: str,
        handler_id: Any,
        data: Any,
        user_id: int | None,
        overrides: dict[str, Any] | None = None,
    ) -> str:
        """The exact form body Bitrix24 POSTs for an event."""
        overrides = overrides or {}
        auth = self.event_auth(p, user_id, event in TOKEN_EVENTS)
        auth.update(overrides.get("auth") or {})
        payload: dict[str, Any] = {
            "event": event,
            "event_handler_id": str(overrides.get("event_handler_id", handler_id)),
        }
        if data:
            payload["data"] = data
        payload["ts"] = str(overrides.get("ts", int(time.time())))
        payload["auth"] = auth
        return build_query(payload)

    async def deliver(
        self,
        p: Portal,
        event: str,
        data: Any,
        user_id: int | None,
        *,
        force: bool = False,
        overrides: dict[str, Any] | None = None,
        fallback_url: str | None = None,
        wait: bool = True,
    ) -> list[dict[str, Any]]:
        """Queue the event for every online handler bound for it (sandbox.delivery); with
        ``wait``, return once each was answered (held ones are reported as they stand).
        """
        queued = self.queue_event(p, event, data, user_id, force, overrides, fallback_url)
        if wait:
            await asyncio.gather(*(done for record, done in queued if record["state"] != "held"))
        return [delivery.public(record) for record, _ in queued]

    def queue_event(
        self,
        p: Portal,
        event: str,
        data: Any,
        user_id: int | None,
        force: bool = False,
        overrides: dict[str, Any] | None = None,
        fallback_url: str | None = None,
    ) -> list[tuple[dict[str, Any], asyncio.Future]]:
        """Put one delivery per bound online handler into the portal's queue, now."""
        event = event.upper()
        lapsed = not p.subscription_active  # nothing is sent while unpaid (§3.3)
        if p.deleted or lapsed or not (p.install_finished or force):
            p.bump("events_suppressed")
            return []
        targets = [
            (b.id, b.handler, b.auth_type) for b in p.bindings if b.event == event and not b.offline
        ]
        if not targets and fallback_url:
            p.handler_seq += 1
            targets = [(p.handler_seq, fallback_url, 0)]
        queued = []
        for handler_id, url, auth_type in targets:
            who = user_id if not auth_type or user_id is None else auth_type
            build = functools.partial(self.event_body, p, event, handler_id, data, who, overrides)
            queued.append(delivery.enqueue(self, p, event, url, build, force))
        return queued

    def emit(self, p: Portal, event: str, data: Any, user_id: int | None) -> None:
        """Side-effect events from REST writes: offline queue now, online delivery in the
        background.
        """
        if not p.install_finished:
            return
        if methods_core.queue_offline(p, event, data, user_id):
            self._signal_offline(p)
        if any(b.event == event and not b.offline for b in p.bindings):
            self.queue_event(p, event, data, user_id)

    def _signal_offline(self, p: Portal) -> None:
        binding = next(
            (b for b in p.bindings if b.event == "ONOFFLINEEVENT" and not b.offline), None
        )
        if binding is None:
            return
        gap = float((binding.options or {}).get("minTimeout", 1) or 0)
        now = time.time()
        if now - p.offline_signal_at >= gap:
            p.offline_signal_at = now
            admin = next(iter(p.admins()), None)
            self.queue_event(p, "ONOFFLINEEVENT", {}, admin.id if admin else None)

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def trigger(self, p: Portal, spec: dict[str, Any]) -> dict[str, Any]:
        """Control: raise an event as the portal would (online handlers + offline queue)."""
        event = str(spec["event"]).upper()
        data = spec.get("data") or {}
        user_id = None if spec.get("no_auth") else int(spec.get("user_id") or self._default_user(p))
        if event == "ONAPPUPDATE":
            self.drop_install_bindings(p)  # the update happened: it drops them (§2.4)
        if event == "ONEXTERNALCALLSTART":
            data = self._click_to_call(p, data, user_id)
        elif event == "ONEXTERNALCALLBACKSTART":
            data = methods_telephony.callback_start(p, dict(data))
        queued = (
            methods_core.queue_offline(p, event, data, user_id) if p.install_finished else False
        )
        results = await self.deliver(
            p, event, data, user_id, overrides=spec.get("overrides"), wait=spec.get("wait", True)
        )
        return {
            "event": event,
            "data": data,
            "deliveries": results,
            "statuses": [r.get("status") for r in results],
            "offline_queued": queued,
            "install_finished": p.install_finished,
        }

    def _click_to_call(self, p: Portal, data: dict[str, Any], user_id: int | None) -> Any:
        """The clicking user's call, registered as the portal does before it sends the event."""
        uid = int(data.get("USER_ID") or user_id or self._default_user(p))
        if uid not in p.users:
            raise ControlError(400, f"unknown user {uid}")
        return methods_telephony.click_to_call(Ctx(p, p.users[uid], self), dict(data))

    def _default_user(self, p: Portal) -> int:
        admin = next(iter(p.admins()), None)
        return admin.id if admin else next(iter(p.users))

    # ------------------------------------------------------------ iframe POSTs
    def frame(
        self, p: Portal, user_id: int, placement: str, options: Any, url: str
    ) -> tuple[str, str]:
        """Build (url with query, form body) of an iframe POST and remember its APP_SID session."""
        access, refresh = self.tokens.issue(p.member_id, user_id)
        sid = hex32()
        fields: dict[str, Any] = {
            "AUTH_ID": access.token,
            "AUTH_EXPIRES": str(self.settings.token_ttl),
            "REFRESH_ID": refresh.token,
            "SERVER_ENDPOINT": self.server_endpoint,
            "APPLICATION_TOKEN": p.application_token,
            "APPLICATION_SCOPE": p.scope,
            "member_id": p.member_id,
            "status": p.status,
            "PLACEMENT": placement,
        }
        if self.iframe_form(p) == "short":
            for key in FULL_FORM_ONLY:
                del fields[key]
        if placement != "DEFAULT" or options:
            import json

            fields["PLACEMENT_OPTIONS"] = (
                options
                if isinstance(options, str)
                else json.dumps(options or {}, separators=(",", ":"))
            )
        user = p.users[user_id]
        self.sessions[sid] = {
            "member_id": p.member_id,
            "user_id": user_id,
            "placement": placement,
            "options": options or {},
            "access_token": access.token,
            "refresh_token": refresh.token,
            "expires_in": self.settings.token_ttl,
            "domain": p.domain,
            "is_admin": user.admin,
            "lang": user.lang,
            "fields": fields,
        }
        query = urlencode({"DOMAIN": p.domain, "PROTOCOL": str(self.protocol), "LANG": user.lang,
                           "APP_SID": sid})
        return url + ("&" if "?" in url else "?") + query, build_query(fields)

    def iframe_form(self, p: Portal) -> str:
        """The form this portal's iframe POSTs use: its own, else the cloud's default."""
        return p.iframe_form or self.settings.iframe_form

    def drop_install_bindings(self, p: Portal) -> None:
        """Each install or update drops the app's ONAPPINSTALL bindings (§2.3, §2.4)."""
        p.bindings = [b for b in p.bindings if b.event != "ONAPPINSTALL"]

    def begin_install(self, p: Portal, user_id: int) -> None:
        """The portal installs the app for admin ``user_id``; the installer page comes next.

        Installing again after an uninstall is a new installation with a new application
        token (protocol §3.7: the token is derived per installation).
        """
        if not p.installed:
            p.application_token = hex32()
        p.installed, p.deleted = True, False
        self.drop_install_bindings(p)
        p.install_user = user_id

    def show_installer(self, p: Portal, user_id: int) -> bool:
        """An iframe open of an unfinished app shows the installer: an admin's is an install."""
        if p.users[user_id].admin:
            self.begin_install(p, user_id)
            return True
        return False

    async def finish_install(self, p: Portal) -> list[dict[str, Any]]:
        """installFinish: the install is finished, and ONAPPINSTALL goes to its bound handlers.

        Reached only from the portal page on the installer frame's ``setInstallFinish``
        message (sandbox/frame.py), or from the explicit control call that stands in
        for that browser. The event carries the installing admin's tokens (a new chain)
        and the application token (§2.4); it is sent once per install, to what is bound
        for it at this moment.
        """
        user_id, p.install_user = p.install_user, None
        if user_id is None and not p.install_finished:
            user_id = self._default_user(p)  # finished without an installer page: its admin
        p.installed = p.install_finished = True
        if user_id is None or user_id not in p.users:
            return []  # a repeated installFinish: nothing is sent again
        return await self.deliver(p, "ONAPPINSTALL", INSTALL_DATA, user_id, force=True)

    def _app_url(self, p: Portal, path: str) -> str:
        if not p.app_url:
            raise ControlError(400, "portal has no app_url; pass app_url")
        return p.app_url.rstrip("/") + path

    async def install(self, p: Portal, spec: dict[str, Any]) -> dict[str, Any]:
        """Act as the portal installing the app: POST the installer form, nothing more.

        Whatever the page answers, the install stays pending: on a real portal only the
        page's script finishes it (BX24.installFinish() in a browser, through the portal
        page: sandbox/frame.py), and a headless POST runs no script.
        """
        if spec.get("app_url"):
            p.app_url = spec["app_url"]
        url = spec.get("install_url") or p.install_url or self._app_url(p, "/install")
        user_id = int(spec.get("user_id") or self._default_user(p))
        self.begin_install(p, user_id)
        target, body = self.frame(p, user_id, "DEFAULT", None, url)
        sid = target.rsplit("APP_SID=", 1)[1]
        self.sessions[sid]["install"] = True
        resp = await self.post_form(target, body, float(spec.get("timeout", 30)), follow=True)
        p.bump("token_grants")
        out = {
            "status": resp.get("status"),
            "content_type": resp.get("content_type"),
            "error": resp.get("error"),
            "body": resp.get("body"),
            "app_sid": sid,
            "install_finished": p.install_finished,
            "install_pending": not p.install_finished,
            "access_token": self.sessions[sid]["access_token"],
            "refresh_token": self.sessions[sid]["refresh_token"],
            "application_token": p.application_token,
            "form": body,
            "onappinstall": [],
        }
        if spec.get("send_onappinstall"):
            # Forced, whatever is bound or finished: to the bound handler, else the events URL.
            p.install_user = None
            fallback = p.events_url or self._app_url(p, "/b24/events")
            out["onappinstall"] = await self.deliver(
                p, "ONAPPINSTALL", INSTALL_DATA, user_id, force=True, fallback_url=fallback
            )
        return out

    async def open_placement(self, p: Portal, spec: dict[str, Any]) -> dict[str, Any]:
        """Act as the portal rendering a placement iframe for a user."""
        placement = str(spec.get("placement") or "DEFAULT").upper()
        user_id = int(spec.get("user_id") or self._default_user(p))
        if user_id not in p.users:
            raise ControlError(400, f"unknown user {user_id}")
        if placement == "DEFAULT":
            if p.install_finished:
                url = (
                    spec.get("handler")
                    or p.app_page_url
                    or self._app_url(p, "/placements/settings")
                )
            else:
                url = p.install_url or self._app_url(p, "/install")
                self.show_installer(p, user_id)
        else:
            if not p.install_finished:
                raise ControlError(409, "widgets are hidden until installation is finished")
            bound = [
                b for b in p.placements if b.placement == placement and b.user_id in (0, user_id)
            ]
            if not bound:
                raise ControlError(404, f"no handler bound for {placement}")
            url = spec.get("handler") or bound[0].handler
        target, body = self.frame(p, user_id, placement, spec.get("options"), url)
        resp = await self.post_form(target, body, float(spec.get("timeout", 30)), follow=True)
        resp["url"] = target
        resp["form"] = body
        return resp

    async def uninstall(self, p: Portal, clean: bool) -> dict[str, Any]:
        """Revoke API access, then send ONAPPUNINSTALL (no tokens), then drop bindings and
        placements. Bitrix24 revokes first (protocol §2.6: "API access is already revoked"), so
        the app can confirm the event with its stored chain, which now answers NOT_INSTALLED.
        """
        was_finished = p.install_finished
        p.installed = p.install_finished = False
        p.event_tokens.clear()
        self.tokens.drop_portal(p.member_id)
        results = await self.deliver(
            p,
            "ONAPPUNINSTALL",
            {"LANGUAGE_ID": "en", "CLEAN": "1" if clean else "0"},
            None,
            force=was_finished,
        )
        p.bindings.clear()
        p.placements.clear()
        return {"deliveries": results, "statuses": [r.get("status") for r in results]}


def loopback_socket() -> socket.socket:
    """A listening-ready TCP socket on 127.0.0.1 with a free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock
