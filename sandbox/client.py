"""SandboxControl: a small synchronous client of the control API (httpx)."""

from __future__ import annotations

from typing import Any

import httpx

from .tls import client_context


class SandboxError(RuntimeError):
    """The control API refused a call."""


class SandboxControl:
    """Drive the sandbox from tests and benchmarks."""

    def __init__(self, base_url: str, timeout: float = 90.0, ca_file: str | None = None) -> None:
        """``ca_file``: the https mode's CA (``SandboxServer.ca_file``), trusted alone."""
        self.base_url = base_url.rstrip("/")
        verify = client_context(ca_file) if ca_file else True
        self.http = httpx.Client(base_url=self.base_url + "/_sandbox", timeout=timeout,
                                 verify=verify)

    def close(self) -> None:
        """Close the HTTP client."""
        self.http.close()

    def __enter__(self) -> SandboxControl:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(
        self, method: str, path: str, json: Any = None, params: dict[str, Any] | None = None
    ) -> Any:
        resp = self.http.request(method, path, json=json, params=params)
        if resp.status_code >= 400:
            raise SandboxError(f"{method} {path}: {resp.status_code} {resp.text}")
        return resp.json()

    # ------------------------------------------------------------ portals
    def create_portal(
        self,
        plan: str = "standard",
        users: list[dict[str, Any]] | None = None,
        member_id: str | None = None,
        client_id: str = "app.sandbox",
        client_secret: str = "sandbox-secret",
        app_url: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Create a portal; returns member_id, domain, endpoints, ports and the admin's first token
        pair. ``iframe_form="short"|"full"`` (in ``extra``) picks the form its iframe POSTs use.
        """
        spec = {
            "plan": plan,
            "users": users,
            "member_id": member_id,
            "client_id": client_id,
            "client_secret": client_secret,
            "app_url": app_url,
            **extra,
        }
        return self._call("POST", "/portals", {k: v for k, v in spec.items() if v is not None})

    def portal(self, member_id: str) -> dict[str, Any]:
        return self._call("GET", f"/portals/{member_id}")

    def portals(self) -> list[dict[str, Any]]:
        return self._call("GET", "/portals")

    def set_plan(self, member_id: str, plan: str) -> dict[str, Any]:
        return self._call("POST", f"/portals/{member_id}/plan", {"plan": plan})

    def set_bucket(
        self, member_id: str, drain: float, burst: float, level: float | None = None
    ) -> dict[str, Any]:
        """Custom leaky bucket (requests/s drained, size)."""
        return self._call(
            "POST", f"/portals/{member_id}/bucket", {"drain": drain, "burst": burst, "level": level}
        )

    def set_latency(
        self, member_id: str, ms: float | tuple[float, float] | list[float] | str | None,
        operating: bool = True,
    ) -> dict[str, Any]:
        """This portal's per-request latency: fixed ms, (min, max) uniform, "realistic"
        (log-normal, 50-600 ms), or None for the cloud's ``settings(latency=...)``;
        ``operating=False``: the delay is waiting, not processing (no operating time, not in
        ``processing``).
        """
        return self._call(
            "POST",
            f"/portals/{member_id}/latency",
            {"ms": list(ms) if isinstance(ms, (tuple, list)) else ms, "operating": operating},
        )

    def set_fault(
        self,
        member_id: str,
        kind: str,
        rate: float = 1.0,
        count: int | None = None,
        methods: list[str] | None = None,
    ) -> dict[str, Any]:
        """Inject a fault on REST (rate 0 removes it); ``methods`` limits it to requests calling
        one of them (a batch containing one), and makes ``operation_time_limit`` per command."""
        return self._call(
            "POST",
            f"/portals/{member_id}/faults",
            {"kind": kind, "rate": rate, "count": count, "methods": methods},
        )

    def clear_faults(self, member_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/portals/{member_id}/faults")

    def rename_portal(self, member_id: str) -> dict[str, Any]:
        """Move the portal to a new host; the old one answers 302."""
        return self._call("POST", f"/portals/{member_id}/rename")

    def delete_portal(self, member_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/portals/{member_id}")

    def set_operating_limit(
        self, seconds: float | None, member_id: str | None = None, method: str | None = None
    ) -> dict[str, Any]:
        """Per-method operating budget per 10 min: for one portal, or cloud-wide when member_id is
        None; with ``method``, that method's own budget on the portal (None drops it).
        """
        if member_id is None:
            return self.settings(operating_limit=seconds)
        body: dict[str, Any] = {"seconds": seconds}
        if method:
            body["method"] = method
        return self._call("POST", f"/portals/{member_id}/operating_limit", body)

    def set_method_cost(self, member_id: str, method: str, seconds: float) -> dict[str, Any]:
        """Make every command of ``method`` take ``seconds`` more processing (operating time)."""
        return self._call(
            "POST", f"/portals/{member_id}/method_cost", {"method": method, "seconds": seconds}
        )

    def settings(self, **values: Any) -> dict[str, Any]:
        """Read or change cloud settings (token_ttl, code_ttl, operating_limit, request_timeout,
        hang_cap, latency, event_delay, event_reorder, ...).

        ``latency`` and ``event_delay`` take ms: a number, [lo, hi] or "realistic".
        """
        return self._call("POST" if values else "GET", "/settings", values or None)

    def expire_tokens(self, member_id: str) -> dict[str, Any]:
        """Make the portal's current access tokens expire now."""
        return self._call("POST", f"/portals/{member_id}/expire_tokens")

    def issue_tokens(self, member_id: str, user_id: int | None = None) -> dict[str, Any]:
        """A fresh independent chain for a user (as an iframe open would give)."""
        return self._call("POST", f"/portals/{member_id}/tokens", {"user_id": user_id})

    def set_subscription(self, member_id: str, active: bool) -> dict[str, Any]:
        """Lapse (``active=False``) or renew the app's subscription on the portal.

        Lapsed: the token endpoint and REST answer ``PAYMENT_REQUIRED`` and events are not sent.
        """
        return self._call("POST", f"/portals/{member_id}/subscription", {"active": active})

    def set_scope(self, member_id: str, scope: str) -> dict[str, Any]:
        """The scopes the app holds on the portal from now on ("crm,telephony,..."): methods of
        a scope left out answer ``insufficient_scope``; the ``scope`` method lists them."""
        return self._call("POST", f"/portals/{member_id}/scope", {"scope": scope})

    def set_outgoing_line(self, member_id: str, line_id: str | None) -> dict[str, Any]:
        """Choose the portal's default number for outgoing calls (``voximplant.line.outgoing.get``
        answers it): ``"sip12"``, ``"reg3"``, a rented ``"4930123456"``, ``"REST_APP:9"``, one
        of the app's line numbers, or None for the app again."""
        return self._call("POST", f"/portals/{member_id}/outgoing_line", {"line_id": line_id})

    def set_clock_skew(self, member_id: str, seconds: float) -> dict[str, Any]:
        """Put the portal's clock ``seconds`` ahead of the real one (negative: behind): every
        REST answer's ``time`` block (start, finish, dates, operating_reset_at) shows it."""
        return self._call("POST", f"/portals/{member_id}/clock", {"skew": seconds})

    def age_tokens(self, member_id: str, days: float) -> dict[str, Any]:
        """Move the issue times of the portal's codes, access and refresh tokens ``days`` back
        (a refresh token dies ``refresh_ttl``, 180 days, after its issue).
        """
        return self._call("POST", f"/portals/{member_id}/age_tokens", {"days": days})

    # ------------------------------------------------------------ acting as the portal
    def install_app(
        self,
        member_id: str,
        app_url: str | None = None,
        send_onappinstall: bool = False,
        user_id: int | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """POST the installer iframe form to <app_url>/install (``form``: the body sent).

        The install stays pending (``install_pending``): no script runs here, and only the
        page's BX24.installFinish() in a browser (through :meth:`frame_url`) or
        :meth:`finish_install` finishes it. ``send_onappinstall`` sends ONAPPINSTALL
        anyway (to the bound handler, else ``<app_url>/b24/events``; ``onappinstall``:
        each delivery, with the ``tokens`` it carried), finished or not.
        """
        spec = {
            "app_url": app_url,
            "send_onappinstall": send_onappinstall,
            "user_id": user_id,
            **extra,
        }
        return self._call("POST", f"/portals/{member_id}/install", spec)

    def finish_install(self, member_id: str) -> dict[str, Any]:
        """Finish the install and send ONAPPINSTALL, as the installer page's script would.

        A stand-in for the browser, for tests and ``make run``: on a real portal (and in
        the sandbox's frame page) only the page's BX24.installFinish() does this. Returns
        the install state and ``onappinstall`` (each delivery, with its ``tokens``).
        """
        return self._call("POST", f"/portals/{member_id}/install_finish")

    def install_state(self, member_id: str) -> dict[str, Any]:
        return self._call("GET", f"/portals/{member_id}/install_state")

    def open_placement(
        self,
        member_id: str,
        placement: str = "DEFAULT",
        user_id: int | None = None,
        options: Any = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """POST a placement iframe form to its bound handler; returns status, content_type, body,
        url, form.
        """
        spec = {"placement": placement, "user_id": user_id, "options": options, **extra}
        return self._call("POST", f"/portals/{member_id}/placements/open", spec)

    def frame_url(
        self, member_id: str, placement: str = "DEFAULT", user_id: int | None = None
    ) -> str:
        """URL of the portal page that frames the placement for a real browser.

        It redirects to the portal's own origin, which POSTs the iframe form into its
        iframe and answers the frame's BX24 messages (an installer's installFinish).
        """
        q = f"?placement={placement}" + (f"&user_id={user_id}" if user_id else "")
        return f"{self.base_url}/_sandbox/portals/{member_id}/frame{q}"

    def trigger_event(
        self,
        member_id: str,
        event: str,
        data: Any = None,
        user_id: int | None = None,
        no_auth: bool = False,
        overrides: dict[str, Any] | None = None,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Deliver an event to every bound handler; returns `statuses` (what the app answered) and
        details. ``wait=False`` returns once it is queued (see ``wait_deliveries``).
        """
        spec = {
            "event": event,
            "data": data or {},
            "user_id": user_id,
            "no_auth": no_auth,
            "overrides": overrides,
            "wait": wait,
        }
        return self._call("POST", f"/portals/{member_id}/events", spec)

    def uninstall_app(self, member_id: str, clean: bool = False) -> dict[str, Any]:
        """ONAPPUNINSTALL (no tokens), then drop bindings, placements and tokens."""
        return self._call("POST", f"/portals/{member_id}/uninstall", {"clean": clean})

    def hold_events(self, member_id: str, *events: str) -> dict[str, Any]:
        """Hold back deliveries of these events until ``release_events`` (others overtake)."""
        return self._call("POST", f"/portals/{member_id}/hold_events", {"events": list(events)})

    def release_events(self, member_id: str) -> dict[str, Any]:
        """Let the held deliveries go."""
        return self._call("POST", f"/portals/{member_id}/release_events")

    # ------------------------------------------------------------ observing
    def deliveries(self, member_id: str) -> list[dict[str, Any]]:
        """Every event delivery of the portal in queue order: seq, event, url, state, status,
        queued_at, sent_at, answered_at.
        """
        return self._call("GET", f"/portals/{member_id}/deliveries")["deliveries"]

    def wait_deliveries(self, member_id: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until every delivery of the portal was answered (held ones excepted); return
        the log, or raise SandboxError if some were still on their way after ``timeout``.
        """
        out = self._call(
            "GET", f"/portals/{member_id}/deliveries", params={"wait": timeout}
        )
        if out["unsettled"]:
            raise SandboxError(f"{out['unsettled']} deliveries still unanswered after {timeout}s")
        return out["deliveries"]

    def log(
        self, member_id: str, since: int | None = None, method: str | None = None
    ) -> list[dict[str, Any]]:
        """Executed commands (seq > since) with method, params, start, finish, status, in_batch,
        batch_id.
        """
        params = {k: v for k, v in (("since", since), ("method", method)) if v is not None}
        return self._call("GET", f"/portals/{member_id}/log", params=params)["entries"]

    def counters(self, member_id: str) -> dict[str, Any]:
        return self._call("GET", f"/portals/{member_id}/counters")

    def bindings(self, member_id: str) -> dict[str, Any]:
        return self._call("GET", f"/portals/{member_id}/bindings")

    def offline_events(self, member_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/portals/{member_id}/offline_events")["events"]

    def clear_offline_events(self, member_id: str) -> list[dict[str, Any]]:
        return self._call("DELETE", f"/portals/{member_id}/offline_events")["events"]

    def calls(self, member_id: str) -> dict[str, Any]:
        """Telephony state: active calls, finished calls (statistics), lines, missed calls."""
        return self._call("GET", f"/portals/{member_id}/calls")

    def call_history(
        self, member_id: str, external_call_id: str | None = None, problems: bool = False
    ) -> dict[str, Any]:
        """The log's telephony commands per EXTERNAL_CALL_ID: registers, finishes, who was shown
        and hidden when, cards open at the finish, show/hide after it (sandbox.callhistory);
        ``problems`` lists only the calls breaking those rules (a day's answer stays small)."""
        params: dict[str, Any] = {} if external_call_id is None else {
            "external_call_id": external_call_id}
        if problems:
            params["problems"] = "1"
        return self._call("GET", f"/portals/{member_id}/call_history", params=params)

    def add_crm(self, member_id: str, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Seed a CRM record (contact, deal, lead, company) without going through REST."""
        return self._call("POST", f"/portals/{member_id}/crm/{kind}", fields)

    def reset(self) -> dict[str, Any]:
        """Forget every portal and restore default settings."""
        return self._call("POST", "/reset")
