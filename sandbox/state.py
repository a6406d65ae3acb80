"""In-memory state of the fake cloud: settings, portals, users, tokens, counters and the command
log.
"""

from __future__ import annotations

import collections
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .latency import REALISTIC
from .limits import PLANS, LeakyBucket, OperatingClock

DEFAULT_SCOPE = "crm,telephony,placement,user_basic"
LOG_LIMIT = 100_000
DAY = 86_400
DELIVERY_LOG_LIMIT = 10_000
# The iframe POST forms (protocol §2.3): "short" is what the portal's own iframe template and
# install POSTs captured in 2023-2024 carry; "full" adds SERVER_ENDPOINT, APPLICATION_TOKEN and
# APPLICATION_SCOPE, as the REST docs rewritten in 2026 list them.
IFRAME_FORMS = ("full", "short")
# A portal's time zone when created without one: every date it writes carries this offset.
DEFAULT_TIME_ZONE = "Europe/Berlin"
_OFFSET_RE = re.compile(r"^([+-])(\d{2}):(\d{2})$")


def parse_time_zone(name: str) -> tzinfo:
    """An IANA zone ("Europe/Berlin") or a fixed offset ("+03:00"); ValueError otherwise."""
    fixed = _OFFSET_RE.match(name)
    if fixed:
        sign = -1 if fixed.group(1) == "-" else 1
        return timezone(sign * timedelta(hours=int(fixed.group(2)), minutes=int(fixed.group(3))))
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None


def hex32() -> str:
    """A random 32-char hex id (tokens, member ids, app sids)."""
    return secrets.token_hex(16)


@dataclass
class Settings:
    """Cloud-wide knobs changeable through the control API."""

    token_ttl: int = 3600
    refresh_ttl: int = 180 * DAY  # a refresh token dies this long after its issue (§1.5)
    code_ttl: float = 30.0
    operating_limit: float = 480.0
    request_timeout: float = 60.0
    hang_cap: float = 60.0
    event_timeout: float = 5.0
    reuse_revokes_chain: bool = True
    log_limit: int = LOG_LIMIT
    iframe_form: str = "full"  # the default for portals created without their own
    # Per-request latency of every portal without its own (sandbox.latency spec, ms). The
    # pytest plugin starts its server with 0; `python -m sandbox` and benchmarks keep this.
    latency: Any = REALISTIC
    # Event delivery (protocol §3.2, §3.8: a queue server, seconds of delay, no order).
    # The default suits tests: no delay, each portal's events one after another in order.
    event_delay: Any = 0.0  # a sandbox.latency spec in ms, drawn per delivery
    event_reorder: bool = False  # True: every delivery waits only its own delay
    # The zone a CALL_START_DATE without an offset is read in (protocol §8.3: the server's,
    # which one on cloud is UNCONFIRMED). Not the portal's default on purpose, so an app that
    # drops the offset gets visibly wrong times.
    server_time_zone: str = "Europe/Moscow"
    # False plays an older build whose register dedup ignores EXTERNAL_CALL_ID (§8.3, §8.16:
    # two overlapping calls between the same numbers then share one CALL_ID).
    call_dedup_external_id: bool = True


@dataclass
class User:
    id: int
    name: str = ""
    last_name: str = ""
    admin: bool = False
    extension: str = ""
    active: bool = True
    email: str = ""
    phones: list[str] = field(default_factory=list)  # work/mobile numbers of the profile
    # The work-time module's state of his day, as searchCrmEntities reports it (§8.7):
    # OPENED | CLOSED | PAUSED | EXPIRED | UNAVAILABLE | NOT_INSTALLED.
    timeman: str = "NOT_INSTALLED"
    # The language the user reads the portal in (their profile's): the iframe's LANG (§2.3).
    lang: str = "en"

    def as_rest(self) -> dict[str, Any]:
        """The user.get / user.current record."""
        return {
            "ID": str(self.id),
            "XML_ID": "",
            "ACTIVE": self.active,
            "NAME": self.name,
            "LAST_NAME": self.last_name,
            "SECOND_NAME": "",
            "EMAIL": self.email or f"user{self.id}@example.test",
            "IS_ONLINE": "N",
            "TIME_ZONE_OFFSET": "0",
            "USER_TYPE": "employee",
            "UF_DEPARTMENT": [1],
            "UF_PHONE_INNER": self.extension or None,
        }


@dataclass
class AccessToken:
    token: str
    member_id: str
    user_id: int
    expires: float
    refresh: str | None


@dataclass
class RefreshToken:
    token: str
    member_id: str
    user_id: int
    access: str
    spent: bool = False
    child: str | None = None
    issued: float = field(default_factory=time.time)


@dataclass
class AuthCode:
    code: str
    member_id: str
    user_id: int
    client_id: str
    expires: float
    used: bool = False


@dataclass
class Fault:
    kind: str
    rate: float = 1.0
    count: int | None = None
    # Lower-case method names: the fault hits only requests calling one of them (a batch when
    # one of its commands does); None: every request.
    methods: list[str] | None = None


@dataclass
class Binding:
    id: int
    event: str
    handler: str
    auth_type: int = 0
    offline: bool = False
    auth_connector: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def as_rest(self) -> dict[str, Any]:
        """The event.get record."""
        row = {
            "event": self.event,
            "handler": self.handler,
            "auth_type": str(self.auth_type),
            "offline": 1 if self.offline else 0,
        }
        if self.offline:
            row["connector_id"] = self.auth_connector
        return row


@dataclass
class PlacementBinding:
    placement: str
    handler: str
    title: str = ""
    description: str = ""
    user_id: int = 0
    options: Any = field(default_factory=dict)
    lang_all: Any = field(default_factory=dict)

    def as_rest(self) -> dict[str, Any]:
        """The placement.get record."""
        return {
            "placement": self.placement,
            "userId": self.user_id,
            "handler": self.handler,
            "options": self.options or [],
            "title": self.title,
            "description": self.description,
            "langAll": self.lang_all or [],
        }


def new_counters() -> dict[str, Any]:
    """Fresh counter block for a portal."""
    return {
        "rest_requests": 0,
        "commands": 0,
        "batches": 0,
        "refreshes": 0,
        "token_grants": 0,
        "auth_code_grants": 0,
        "status_503": 0,
        "status_429": 0,
        "status_401": 0,
        "query_limit_exceeded": 0,
        "operation_time_limit": 0,
        "faults_injected": 0,
        "faults_by_kind": {},  # the same, per fault kind (http_500, reset, executed_504, ...)
        "executed_504": 0,
        "in_flight": 0,
        "max_in_flight": 0,
        "events_sent": 0,
        "events_failed": 0,
        "events_suppressed": 0,
        "violations": {
            "finish_before_register": 0,
            "attach_before_finish": 0,
            "register_for_click_to_call": 0,
            "refresh_token_reuse": 0,
            "double_finish": 0,
            "show_after_finish": 0,
            "hide_after_finish": 0,
            "start_date_without_offset": 0,
            "empty_crm_entity": 0,
        },
        # Calls created again for an EXTERNAL_CALL_ID that already had one (register dedup
        # only matches active calls): each is a second call and a second CRM activity.
        "duplicate_calls": 0,
        # Telephony side effects a customer sees (protocol §8.3, §8.5): robot triggers fired by
        # registers (dedup hits too), missed calls (304 on TYPE 2/3), chat messages of finishes,
        # cards a finish left open (shown, never hidden, not the finisher), lead creations
        # refused for an employee's number.
        "robot_triggers": 0,
        "missed_calls": 0,
        "chat_messages": 0,
        "cards_left_open": 0,
        "lead_creation_errors": 0,
    }


@dataclass
class Portal:
    """One Bitrix24 portal with our single app installed on it."""

    member_id: str
    plan: str
    users: dict[int, User]
    client_id: str
    client_secret: str
    app_url: str | None
    scope: str = DEFAULT_SCOPE
    status: str = "P"
    scheme: str = "http"  # the cloud's: "https" in the https mode
    application_token: str = field(default_factory=hex32)
    port: int = 0
    old_ports: list[int] = field(default_factory=list)
    deleted: bool = False
    installed: bool = True
    subscription_active: bool = True  # False: the app's paid period lapsed (PAYMENT_REQUIRED)
    install_finished: bool = False
    iframe_form: str | None = None  # None: the cloud's Settings.iframe_form
    install_user: int | None = None  # the admin of an install not yet finished (ONAPPINSTALL)
    redirect_url: str | None = None
    install_url: str | None = None
    app_page_url: str | None = None
    events_url: str | None = None
    bucket: LeakyBucket = field(default_factory=lambda: LeakyBucket(2.0, 50.0))
    operating: OperatingClock = field(default_factory=OperatingClock)
    operating_limit: float | None = None
    method_limits: dict[str, float] = field(default_factory=dict)  # per-method operating limit
    method_costs: dict[str, float] = field(default_factory=dict)  # extra seconds per command
    latency: Any = None  # a sandbox.latency spec; None: the cloud's Settings.latency
    latency_operating: bool = True  # False: the delay is a queue, not the method's processing
    faults: list[Fault] = field(default_factory=list)
    bindings: list[Binding] = field(default_factory=list)
    placements: list[PlacementBinding] = field(default_factory=list)
    counters: dict[str, Any] = field(default_factory=new_counters)
    log: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LOG_LIMIT))
    log_seq: int = 0
    offline: list[dict[str, Any]] = field(default_factory=list)
    offline_seq: int = 0
    offline_signal_at: float = 0.0
    crm: dict[str, dict[int, dict[str, Any]]] = field(
        default_factory=lambda: {
            "contact": {}, "deal": {}, "lead": {}, "company": {}, "activity": {}
        }
    )
    crm_seq: int = 0
    lines: dict[str, dict[str, Any]] = field(default_factory=dict)
    line_seq: int = 0
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    # active CALL_IDs by (USER_ID, PHONE_NUMBER), in registration order: the dedup and
    # click-to-call checks look a party up instead of scanning every active call
    calls_by_party: dict[tuple[int, str], list[str]] = field(default_factory=dict)
    finished_calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    missed: list[dict[str, Any]] = field(default_factory=list)  # missed-call rows (304)
    stat_seq: int = 0
    file_seq: int = 9000
    uploads: dict[str, dict[str, Any]] = field(default_factory=dict)
    handler_seq: int = 0
    dedup: dict[Any, Any] = field(default_factory=dict)  # EXTERNAL_CALL_ID -> calls created
    event_tokens: dict[int, Any] = field(default_factory=dict)
    time_zone: str = DEFAULT_TIME_ZONE
    # Seconds the portal's clock is off (+ ahead, - behind): every REST `time` block carries it.
    clock_skew: float = 0.0
    # The telephony option "default number for outgoing calls" (voximplant.line.outgoing.get):
    # None = the app (its first line, or the app itself when it has none); other_lines are the
    # portal's lines of other kinds (rented numbers, SIP PBXs) an administrator chose meanwhile.
    outgoing_line: str | None = None
    other_lines: set[str] = field(default_factory=set)
    missing_placements: list[str] = field(default_factory=list)  # codes this portal lacks
    # The event delivery queue (sandbox.delivery): its log, the last in-order delivery, and
    # the events held back until released (with the gate their deliveries wait on).
    deliveries: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=DELIVERY_LOG_LIMIT)
    )
    delivery_seq: int = 0
    delivery_tail: Any = None
    held_events: set[str] = field(default_factory=set)
    hold_gate: Any = None

    @property
    def tz(self) -> tzinfo:
        """The portal's time zone: every date it writes carries its offset."""
        return parse_time_zone(self.time_zone)

    @property
    def domain(self) -> str:
        """The portal host (what Bitrix24 calls DOMAIN)."""
        return f"127.0.0.1:{self.port}"

    @property
    def client_endpoint(self) -> str:
        return f"{self.scheme}://{self.domain}/rest/"

    def set_plan(self, plan: str) -> None:
        """Switch plan and its bucket parameters."""
        if plan not in PLANS:
            raise ValueError(f"unknown plan {plan!r}")
        self.plan = plan
        self.bucket.reconfigure(PLANS[plan]["drain"], PLANS[plan]["burst"])

    def admins(self) -> list[User]:
        return [u for u in self.users.values() if u.admin and u.active]

    def record(self, entry: dict[str, Any]) -> None:
        """Append one executed command to the bounded log."""
        self.log_seq += 1
        entry["seq"] = self.log_seq
        self.log.append(entry)

    def bump(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def fault_injected(self, kind: str) -> None:
        """Count a fault drawn for a request (or, OPERATION_TIME_LIMIT, a command)."""
        self.bump("faults_injected")
        kinds = self.counters.setdefault("faults_by_kind", {})
        kinds[kind] = kinds.get(kind, 0) + 1

    def violation(self, name: str) -> None:
        self.counters["violations"][name] = self.counters["violations"].get(name, 0) + 1


class TokenStore:
    """OAuth chains shared by the auth server and every portal."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.access: dict[str, AccessToken] = {}
        self.refresh: dict[str, RefreshToken] = {}
        self.codes: dict[str, AuthCode] = {}
        # Access and refresh tokens an uninstall revoked -> their portal's member_id.
        self.revoked: dict[str, str] = {}

    def issue(self, member_id: str, user_id: int) -> tuple[AccessToken, RefreshToken]:
        """Start or continue a chain: a new access/refresh pair."""
        a, r = hex32(), hex32()
        access = AccessToken(a, member_id, user_id, time.time() + self.settings.token_ttl, r)
        refresh = RefreshToken(r, member_id, user_id, a)
        self.access[a], self.refresh[r] = access, refresh
        return access, refresh

    def rotate(self, old: RefreshToken) -> tuple[AccessToken, RefreshToken]:
        """Spend `old`: it and its paired access token die now; a new pair is returned."""
        old.spent = True
        self.access.pop(old.access, None)
        access, refresh = self.issue(old.member_id, old.user_id)
        old.child = refresh.token
        return access, refresh

    def revoke_descendants(self, spent: RefreshToken) -> int:
        """Kill every pair issued after `spent` in its chain (reuse detection)."""
        n, nxt = 0, spent.child
        while nxt:
            tok = self.refresh.get(nxt)
            if tok is None:
                break
            self.access.pop(tok.access, None)
            tok.spent = True
            n += 1
            nxt = tok.child
        return n

    def expire_portal(self, member_id: str) -> int:
        """Make every live access token of the portal expire now."""
        n = 0
        now = time.time() - 1
        for tok in self.access.values():
            if tok.member_id == member_id and tok.expires > now:
                tok.expires = now
                n += 1
        return n

    def drop_portal(self, member_id: str) -> None:
        """Revoke every token of the portal (uninstall); `revoked` remembers whose they were."""
        for table in (self.access, self.refresh, self.codes):
            for key in [k for k, v in table.items() if v.member_id == member_id]:
                if table is not self.codes:
                    self.revoked[key] = member_id
                del table[key]

    def age_portal(self, member_id: str, seconds: float) -> dict[str, int]:
        """Move the issue times of the portal's codes and tokens `seconds` into the past."""
        moved = {"access": 0, "refresh": 0, "codes": 0}
        for tok in self.access.values():
            if tok.member_id == member_id:
                tok.expires -= seconds
                moved["access"] += 1
        for ref in self.refresh.values():
            if ref.member_id == member_id:
                ref.issued -= seconds
                moved["refresh"] += 1
        for code in self.codes.values():
            if code.member_id == member_id:
                code.expires -= seconds
                moved["codes"] += 1
        return moved

    def refresh_expired(self, tok: RefreshToken) -> bool:
        """Whether `tok` outlived `refresh_ttl` since its issue."""
        return time.time() - tok.issued >= self.settings.refresh_ttl

    def new_code(self, member_id: str, user_id: int, client_id: str) -> AuthCode:
        code = AuthCode(
            hex32(), member_id, user_id, client_id, time.time() + self.settings.code_ttl
        )
        self.codes[code.code] = code
        return code
