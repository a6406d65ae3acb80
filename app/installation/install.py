"""Installing the app into a portal, and keeping that installation set up.

The flow (protocol §2.2–2.4); steps 1–2 live in :mod:`app.tenants.verify`
(re-exported here):

1. :func:`parse_iframe` reads the portal's iframe POST (installer or placement),
   short form or full (§2.3).
2. :func:`verify_iframe_token` asks the *auth server* (``app.info``) whose token
   it is: our ``client_id`` and the posted ``member_id``, or nothing is created.
   The auth server must be one we trust (``B24_AUTH_SERVERS``) when the POST
   names it; a POST that names none is checked at the portal's stored auth server,
   then at each trusted one, until one knows the token.
3. :func:`install` creates or updates the Portal keyed by member_id and stores
   the installer's chain encrypted (``store_new_chain``), and the application
   token when the installer form carries one.
4. :func:`setup_portal` reads what is bound (``event.get``, ``placement.get``,
   ``telephony.externalLine.get``, ``user.get``) and binds only what is missing,
   in one batch, so a re-install changes nothing. ONAPPINSTALL is among the
   events: each install or update drops its binding (§2.4), so the installer
   binds it again before the page calls ``installFinish``, which then sends it
   with the application token (the short form's only source of it).

Transactions: these functions add and flush; the caller that owns the unit of
work commits once (the ``/install`` view, the placement decorator; inbox processing
for the event handlers).

:func:`setup_portal` calls Bitrix24 directly: the ``/install`` request runs it while the
admin waits. Setup nobody waits on (ONAPPUPDATE, the settings page) goes through the
dispatcher instead (app.tenants.upkeep), reusing :data:`READ_COMMANDS`,
:func:`apply_plan` and :func:`missing_bindings`. The one side transaction is
:func:`_end_transaction`, before each slow Bitrix24 call. ``store_new_chain``
(app/tenants/tokens.py) still commits on its own.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import current_app
from sqlalchemy import delete, select

from app.bitrix import TokenSet
from app.bitrix.errors import ApiError, BitrixError, already_done
from app.extensions import db
from app.ingress import handler_key
from app.tenants import service
from app.tenants.models import Plan, Portal, PortalSettings, PortalStatus
from app.tenants.status import CLEARED_BY_NEW_CHAIN, is_held, reason_for
from app.tenants.users import sync_users, upsert_user

# Verification lives in app.tenants.verify; the names callers reach through here stay importable.
from app.tenants.verify import (  # noqa: F401
    IframeAuth,
    InstallError,
    TokenRejected,
    _check_app_info,
    application_token_matches,
    oauth_client,
    parse_iframe,
    portal_endpoint,
    setting,
    user_is_admin,
    valid_host,
    verify_iframe_token,
    verify_token,
)

log = logging.getLogger(__name__)

EVENT_PATH = "/b24/events"
# Bitrix24's REST event list has ONUSERADD but no user-update event: changed
# extensions are picked up by the periodic user sync (workers/install.py).
EVENTS = ("ONAPPINSTALL", "ONAPPUNINSTALL", "ONAPPUPDATE", "ONEXTERNALCALLSTART",
          "ONEXTERNALCALLBACKSTART", "ONUSERADD")
# Lifecycle events stay online in the offline mode: ONAPPINSTALL brings the application
# token (and is only sent online), ONAPPUNINSTALL must reach us while the tokens still
# exist, and ONAPPUPDATE re-runs this setup.
ALWAYS_ONLINE = frozenset({"ONAPPINSTALL", "ONAPPUNINSTALL", "ONAPPUPDATE"})
PLACEMENTS = {
    "TELEPHONY_ANALYTICS_MENU": ("/placements/dashboard", "b24relay: calls"),
    "CALL_CARD": ("/placements/call-card", "b24relay"),
}
USER_PAGE = 50
BATCH_MAX = 50
IN_WORKERS_HANDS = "processing"  # an inbox row claimed by a worker (app.ingress.processing)

class SetupFailed(InstallError):
    """The portal answered, but binding what the app needs failed (502)."""

    status = 502


# ---------------------------------------------------------------- settings


def public_url(path: str) -> str:
    """An absolute URL of this app as Bitrix24 reaches it."""
    return str(current_app.config["APP_PUBLIC_URL"]).rstrip("/") + path


# ---------------------------------------------------------------- install


def install(auth: IframeAuth) -> tuple[Portal, SetupReport]:
    """Verify the installer POST, create or update its portal, and set it up.

    The caller commits, also when :class:`SetupFailed` is raised: the portal then
    keeps the reason (``status_reason``) the settings page shows.
    """
    auth, info = verify_iframe_token(auth)
    client_endpoint = portal_endpoint(info)  # verify_iframe_token checked its host is DOMAIN
    if not user_is_admin(client_endpoint, auth.access_token):
        raise TokenRejected("only a portal administrator can install b24relay", 403)
    portal = _upsert_portal(auth, info, client_endpoint)
    service.store_new_chain(
        portal, access_token=auth.access_token, refresh_token=auth.refresh_token,
        expires_in=auth.expires_in, client_endpoint=client_endpoint,
        server_endpoint=auth.server_endpoint, scope=auth.scope or info.get("scope") or None,
        user_id=int_or_none(info.get("user_id")))
    try:
        report = setup_portal(portal, installer_id=int_or_none(info.get("user_id")))
    except SetupFailed as exc:
        db.session.rollback()
        portal.status_reason = f"Setup did not finish: {exc.message}"[:2000]
        db.session.flush()
        raise
    mark_installed(portal)
    return portal, report


def int_or_none(value: Any) -> int | None:
    """``int(value)``, or None for a missing or malformed value."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _upsert_portal(auth: IframeAuth, info: Mapping[str, Any], client_endpoint: str) -> Portal:
    """The portal row for this member_id, created once (flushed)."""
    portal = Portal.by_member_id(auth.member_id)
    if portal is None:
        portal = Portal(member_id=auth.member_id, status=PortalStatus.INSTALLING.value)
        db.session.add(portal)
    portal.domain = auth.domain
    portal.client_endpoint = client_endpoint
    portal.server_endpoint = auth.server_endpoint
    if auth.application_token:
        # The installer was verified as an admin (app.info + user.admin): it may set the
        # token. The short form carries none; ONAPPINSTALL brings it (app.tenants.events).
        portal.application_token = auth.application_token
    elif portal.status == PortalStatus.UNINSTALLED.value:
        # A new installation has a new token (§3.7): the old one died with the uninstall,
        # and without it this install's ONAPPINSTALL is a first contact, checked by app.info.
        portal.application_token = None
    portal.app_status = (str((info.get("install") or {}).get("status") or "") or None)
    portal.language = auth.lang or portal.language
    if portal.settings is None:
        portal.settings = PortalSettings()
    if portal.status != PortalStatus.DISABLED.value and is_held(portal.status):
        # A verified install supersedes uninstalled/auth_failed/...: set it up again.
        portal.status, portal.status_reason = PortalStatus.INSTALLING.value, None
    db.session.flush()
    return portal


def mark_installed(portal: Portal) -> None:
    """Setup is done: the portal is active (flushed)."""
    if portal.installed_at is None or portal.status != PortalStatus.ACTIVE.value:
        portal.installed_at = datetime.now(UTC)
    _set_status(portal, PortalStatus.ACTIVE)


def _set_status(portal: Portal, status: PortalStatus) -> None:
    """Move the portal to ``status`` in the caller's unit of work (status.set_status commits)."""
    portal.status, portal.status_reason = status.value, reason_for(status)
    portal.status_changed_at = datetime.now(UTC)
    db.session.flush()


def record_application_token(portal: Portal, token: str) -> bool:
    """Store a (verified) application_token (flushed); True when it changed."""
    if not token or application_token_matches(portal, token):
        return False
    portal.application_token = token
    db.session.flush()
    return True


# ---------------------------------------------------------------- setup


@dataclass
class SetupReport:
    """What :func:`setup_portal` found and changed."""

    plan: str = Plan.STANDARD.value
    events_bound: list[str] = field(default_factory=list)
    events_unbound: list[str] = field(default_factory=list)
    placements_bound: list[str] = field(default_factory=list)
    placements_unbound: list[str] = field(default_factory=list)
    lines_added: list[str] = field(default_factory=list)
    users: int = 0

    @property
    def changed(self) -> bool:
        """Whether anything was bound or added."""
        return bool(self.events_bound or self.events_unbound or self.placements_bound
                    or self.placements_unbound or self.lines_added)


READ_COMMANDS: dict[str, tuple[str, dict[str, Any]]] = {
    "app": ("app.info", {}),
    "events": ("event.get", {}),
    "placements": ("placement.get", {}),
    "lines": ("telephony.externalLine.get", {}),
    "users": ("user.get", {}),
}


def setup_portal(portal: Portal, installer_id: int | None = None) -> SetupReport:
    """Bind what is missing (events, placements, lines) and refresh the extension map."""
    state = _run_batch(portal, READ_COMMANDS)
    report = SetupReport()
    apply_plan(portal, state["app"], report)
    writes, kinds = missing_bindings(portal, state)
    for chunk in _chunks(list(writes.items()), BATCH_MAX):
        _apply_writes(portal, dict(chunk), kinds, report)  # commits the plan first (_batch)
    _sync_all_users(portal, state["users"], installer_id, report)
    db.session.flush()
    log.info("portal %s set up: %s", portal.member_id, report)
    return report


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)] or []


def _run_batch(portal: Portal, commands: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One batch; any failed command aborts setup naming it."""
    outcome = _batch(portal, commands)
    failed = {k: v for k, v in outcome.items() if isinstance(v, ApiError)}
    if failed:
        raise SetupFailed("; ".join(f"{commands[k][0]}: {e.code} {e.description}"
                                    for k, e in failed.items()))
    return outcome


def _batch(portal: Portal, commands: dict[str, tuple[str, dict[str, Any]]]
           ) -> dict[str, Any]:
    """``{key: result | ApiError}`` for a batch sent with the portal's chain."""
    _end_transaction()
    try:
        result = service.call_batch(portal, commands)
    except ApiError as exc:
        raise SetupFailed(f"batch: {exc.code} {exc.description}") from exc
    except (BitrixError, service.PortalUnavailable) as exc:
        raise SetupFailed(f"the portal did not answer: {exc}") from exc
    return {key: _outcome(result, key) for key in commands}


def _end_transaction() -> None:
    """Commit before a (slow) Bitrix24 call: no row or database lock waits on the portal.

    A side transaction on purpose, the one exception to "the caller commits": what the
    unit of work wrote so far is committed, so that neither this session's row locks nor
    SQLite's write lock are held while the portal takes seconds (or a minute) to answer.
    """
    if db.session().in_transaction():
        db.session.commit()


def _outcome(result: Any, key: str) -> Any:
    if key in result.errors:
        return result.errors[key]
    if key in result.results:
        return result.results[key]
    return ApiError("NOT_EXECUTED", "command absent from the batch answer")


def apply_plan(portal: Portal, app: Mapping[str, Any], report: SetupReport) -> None:
    """Take the portal's plan from its ``app.info`` (LICENSE_FAMILY ``ent``: enterprise)."""
    family = str((app or {}).get("LICENSE_FAMILY") or "").lower()
    portal.set_plan(Plan.ENTERPRISE if family == "ent" else Plan.STANDARD)
    report.plan = portal.plan


def as_list(value: Any) -> list[Any]:
    """A list answer as a list (Bitrix24 sends some lists as ``{"0": ..., "1": ...}``)."""
    if isinstance(value, dict):
        return list(value.values())
    return list(value or [])


def event_handler_url(member_id: str) -> str:
    """The portal's ``/b24/events`` URL with its handler key (app.ingress.handler_key).

    Bitrix24 calls a handler URL as bound, query string included, so each event it
    delivers through our bindings names the key; a forger does not know it.
    """
    return f"{public_url(EVENT_PATH)}?{handler_key.PARAM}={handler_key.for_member(member_id)}"


def wanted_events(member_id: str) -> dict[str, str]:
    """Event name → handler URL the app binds for this portal (online mode)."""
    handler = event_handler_url(member_id)
    return {name: handler for name in EVENTS}


def offline_mode(portal: Portal) -> bool:
    """Whether the portal's settings chose the offline events mode (§3.9)."""
    return portal.settings is not None and portal.settings.event_mode == "offline"


def _is_offline(binding: Mapping[str, Any]) -> bool:
    return str(binding.get("offline") or "0").strip().upper() in {"1", "Y", "TRUE"}


def _event_commands(portal: Portal, bindings: list[Any]
                    ) -> tuple[dict[str, tuple[str, dict[str, Any]]], dict[str, tuple[str, str]]]:
    """Bind what the event mode wants, unbind what the other mode left behind.

    Online: ``event.bind {event, handler}``. Offline: ``event.bind {event,
    event_type: offline}`` (no handler; the queue is read by app.ingress.offline)
    for every event except :data:`ALWAYS_ONLINE`.
    """
    writes: dict[str, tuple[str, dict[str, Any]]] = {}
    kinds: dict[str, tuple[str, str]] = {}
    rows = [b for b in bindings if isinstance(b, Mapping)]
    online = {(str(b.get("event", "")).upper(), b.get("handler"))
              for b in rows if not _is_offline(b)}
    offline = {str(b.get("event", "")).upper() for b in rows if _is_offline(b)}
    queue = offline_mode(portal)
    wanted = wanted_events(portal.member_id)
    for i, (name, handler) in enumerate(sorted(_stale_handlers(rows, wanted))):
        writes[f"us{i}"] = ("event.unbind", {"event": name, "handler": handler})
        kinds[f"us{i}"] = ("unbind", name)
    for i, (name, handler) in enumerate(wanted.items()):
        if queue and name not in ALWAYS_ONLINE:
            if name not in offline:
                writes[f"ev{i}"] = ("event.bind", {"event": name, "event_type": "offline"})
                kinds[f"ev{i}"] = ("event", name)
            if (name, handler) in online:
                writes[f"un{i}"] = ("event.unbind", {"event": name, "handler": handler})
                kinds[f"un{i}"] = ("unbind", name)
            continue
        if (name, handler) not in online:
            writes[f"ev{i}"] = ("event.bind", {"event": name, "handler": handler})
            kinds[f"ev{i}"] = ("event", name)
        if name in offline:
            writes[f"un{i}"] = ("event.unbind", {"event": name, "event_type": "offline"})
            kinds[f"un{i}"] = ("unbind", name)
    return writes, kinds


def _stale_handlers(rows: list[Mapping[str, Any]], wanted: Mapping[str, str]
                    ) -> set[tuple[str, str]]:
    """Our online handlers bound to a URL we no longer use (no handler key, APP_PUBLIC_URL moved).

    Each binding delivers (§3.8): left bound, an old one sends every event twice, the
    copy without the key. Only the app's own bindings (``auth_type`` 0, made with the
    admin's token) are unbound; a handler a user bound with their own id is theirs.
    """
    return {(name, str(b.get("handler"))) for b in rows
            if not _is_offline(b) and str(b.get("auth_type") or "0") == "0"
            and (name := str(b.get("event", "")).upper()) in wanted
            and b.get("handler") and b.get("handler") != wanted[name]}


def wanted_placements() -> dict[str, tuple[str, str]]:
    """Placement code → (handler URL, title)."""
    return {code: (public_url(path), title) for code, (path, title) in PLACEMENTS.items()}


def missing_bindings(portal: Portal, state: Mapping[str, Any]
                      ) -> tuple[dict[str, tuple[str, dict[str, Any]]], dict[str, tuple[str, str]]]:
    """Commands for whatever is not bound yet, and what each one is (kind, name)."""
    writes, kinds = _event_commands(portal, as_list(state["events"]))
    placed = {(str(b.get("placement", "")).upper(), b.get("handler"))
              for b in as_list(state["placements"]) if isinstance(b, Mapping)}
    for i, (code, handler) in enumerate(sorted(_stale_placements(placed))):
        writes[f"pu{i}"] = ("placement.unbind", {"PLACEMENT": code, "HANDLER": handler})
        kinds[f"pu{i}"] = ("unplace", code)
    for code, (handler, title) in wanted_placements().items():
        if (code, handler) not in placed:
            writes[f"pl_{code}"] = ("placement.bind", {"PLACEMENT": code, "HANDLER": handler,
                                                       "TITLE": title})
            kinds[f"pl_{code}"] = ("placement", code)
    for i, params in enumerate(_missing_lines(portal, state["lines"])):
        writes[f"ln{i}"] = ("telephony.externalLine.add", params)
        kinds[f"ln{i}"] = ("line", params["NUMBER"])
    return writes, kinds


def _stale_placements(placed: set[tuple[str, Any]]) -> set[tuple[str, Any]]:
    """Our widgets still bound to a handler we no longer use (APP_PUBLIC_URL moved).

    Each is unbound by its handler; the answer's ``count`` is not read (the portal counts
    2 per handler removed, b24restdocs placement-unbind), ``placement.get`` is the truth.
    """
    wanted = wanted_placements()
    return {(code, handler) for code, handler in placed
            if code in wanted and handler != wanted[code][0]}


def _missing_lines(portal: Portal, existing: Any) -> list[dict[str, Any]]:
    have = {str(line.get("NUMBER")) for line in as_list(existing) if isinstance(line, dict)}
    settings = portal.settings
    crm = "Y" if settings is None or settings.crm_create else "N"
    out = []
    for line in (settings.lines if settings else None) or []:
        number = str(line.get("number") or "").strip()
        if number and number not in have:
            out.append({"NUMBER": number, "NAME": str(line.get("name") or number),
                        "CRM_AUTO_CREATE": crm})
    return out


def _apply_writes(portal: Portal, writes: dict[str, tuple[str, dict[str, Any]]],
                  kinds: Mapping[str, tuple[str, str]], report: SetupReport) -> None:
    outcome = _batch(portal, writes)
    failures = []
    for key, value in outcome.items():
        kind, name = kinds[key]
        if kind == "placement" and value is False:  # "the handler was not registered"
            value = ApiError("NOT_BOUND", "placement.bind answered false")
        if isinstance(value, ApiError) and not already_done(value):
            failures.append(f"{writes[key][0]} {name}: {value.code} {value.description}")
            continue
        {"event": report.events_bound, "unbind": report.events_unbound,
         "placement": report.placements_bound, "unplace": report.placements_unbound,
         "line": report.lines_added}[kind].append(name)
    if failures:
        raise SetupFailed("; ".join(failures))


# ---------------------------------------------------------------- users


def _sync_all_users(portal: Portal, first_page: Any, installer_id: int | None,
                    report: SetupReport) -> None:
    records = as_list(first_page)
    page = records
    while len(page) >= USER_PAGE:
        _end_transaction()
        page = as_list(service.call_method(portal, "user.get", {"start": len(records)}))
        records.extend(page)
    report.users = sync_users(portal, records)
    db.session.flush()
    if installer_id is not None:
        upsert_user(portal, next((r for r in records if str(r.get("ID")) == str(installer_id)),
                                 {"ID": installer_id}), is_admin=True)


def portals_with_live_tokens(margin_seconds: int = 120) -> list[int]:
    """Active portals whose access token is still valid: a user sync will not refresh them."""
    horizon = datetime.now(UTC) + timedelta(seconds=margin_seconds)
    return list(db.session.scalars(select(Portal.id).where(
        Portal.status == PortalStatus.ACTIVE.value, Portal.expires_at > horizon)))


# ---------------------------------------------------------------- uninstall


def uninstall(portal: Portal, clean: bool) -> None:
    """Mark the portal uninstalled and drop its tokens; ``clean`` deletes its data too."""
    portal.access_token = None
    portal.refresh_token = None
    portal.expires_at = None
    _set_status(portal, PortalStatus.UNINSTALLED)
    if clean:
        delete_portal_data(portal)


def delete_portal_data(portal: Portal) -> int:
    """Delete every row keyed by this portal's id, in every table; the portal row stays.

    Rows a worker holds (status ``processing``: the inbox row of the ONAPPUNINSTALL being
    handled among them) are left to that worker, which finishes them in its own unit of
    work (scrubbed of secrets, later pruned): deleting the row under it would make inbox
    processing discard the whole unit of work, this deletion included, as a lost claim.
    """
    deleted = 0
    for table in reversed(db.metadata.sorted_tables):
        if "portal_id" in table.c:
            stmt = delete(table).where(table.c.portal_id == portal.id)
            if "status" in table.c:
                stmt = stmt.where(table.c.status != IN_WORKERS_HANDS)
            deleted += db.session.execute(stmt).rowcount or 0
    db.session.flush()
    db.session.expire(portal)
    return deleted


# ---------------------------------------------------------------- fresh chains


def adopt_chain(portal: Portal, token: TokenSet) -> None:
    """Keep a verified fresh chain (``store_new_chain`` also lifts ``auth_failed``)."""
    service.store_new_chain(portal, access_token=token.access_token,
                            refresh_token=token.refresh_token, expires_in=token.expires_in,
                            client_endpoint=token.client_endpoint,
                            server_endpoint=token.server_endpoint or portal.server_endpoint,
                            scope=token.scope, user_id=token.user_id)


def connect_with_code(portal: Portal, code: str) -> None:
    """OAuth code flow: exchange ``code`` at the portal's token URL and keep the chain."""
    try:
        token = oauth_client().exchange_code(portal.server_endpoint or "", code)
    except ApiError as exc:
        raise TokenRejected(f"Bitrix24 refused the code ({exc.code}: {exc.description})") from exc
    except BitrixError as exc:
        raise InstallError(f"the Bitrix24 authorization server did not answer ({exc})",
                           502) from exc
    if not token.member_id or not hmac.compare_digest(str(token.member_id), portal.member_id):
        raise TokenRejected("the code was issued for another portal (member_id missing or "
                            "different)", 403)
    # Any portal user can finish this flow: only an administrator's chain may replace the app's.
    if not user_is_admin(token.client_endpoint or portal.client_endpoint, token.access_token):
        raise TokenRejected("only a portal administrator can reconnect b24relay; "
                            "nothing was changed", 403)
    adopt_chain(portal, token)


# ---------------------------------------------------------------- placement iframes


@dataclass
class IframeSession:
    """A verified iframe POST: whose portal, which user, admin or not."""

    portal: Portal
    auth: IframeAuth
    user_id: int | None
    is_admin: bool
    recovered: bool = False


def open_iframe(query: Mapping[str, str], form: Mapping[str, str]) -> IframeSession:
    """Verify a placement POST (§7.4): auth server, member_id, APPLICATION_TOKEN, admin.

    The proof is ``app.info`` for the posted AUTH_ID. APPLICATION_TOKEN is compared only
    when both the form and the portal have one, and a token from a placement form is
    never stored: any employee can post any value there with their own real AUTH_ID.
    """
    auth = parse_iframe(query, form)
    auth, info = verify_iframe_token(auth)
    portal = Portal.by_member_id(auth.member_id)
    if portal is None:
        raise TokenRejected("b24relay is not installed on this portal; install it first", 403)
    if (auth.application_token and portal.application_token
            and not application_token_matches(portal, auth.application_token)):
        raise TokenRejected("APPLICATION_TOKEN does not match this portal's installation", 403)
    session = IframeSession(portal, auth, int_or_none(info.get("user_id")),
                            user_is_admin(portal.client_endpoint, auth.access_token, portal))
    if session.is_admin and PortalStatus(portal.status) in CLEARED_BY_NEW_CHAIN:
        adopt_chain(portal, TokenSet.from_response({
            "access_token": auth.access_token, "refresh_token": auth.refresh_token,
            "expires_in": auth.expires_in, "server_endpoint": auth.server_endpoint,
            "scope": auth.scope or info.get("scope") or None, "user_id": session.user_id}))
        session.recovered = True
    return session
