"""The setup plan: what a portal must have bound, and the commands that bind what is missing.

One plan, two executors. Each reads the portal with :data:`READ_COMMANDS`, hands the answers
to :func:`decide` (the portal's plan from ``app.info``, then :func:`missing_bindings`), and
sends the writes it returns:

* directly, while the admin waits on ``/install`` (:mod:`app.installation.setup`);
* through the dispatcher's outbox, for ONAPPUPDATE and the settings page
  (app.installation.upkeep), where nobody waits.

Nothing here calls Bitrix24 or commits. ONAPPINSTALL is among the events: each install or
update drops its binding (§2.4), so every setup binds it again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flask import current_app

from app.tenants import handler_key
from app.tenants.models import Plan, Portal

Commands = dict[str, tuple[str, dict[str, Any]]]  # batch key → (method, params)
Kinds = dict[str, tuple[str, str]]  # batch key → (kind of binding, its name)

EVENT_PATH = "/b24/events"
# Bitrix24's REST event list has ONUSERADD but no user-update event: changed
# extensions are picked up by the periodic user sync (workers/install.py).
EVENTS = ("ONAPPINSTALL", "ONAPPUNINSTALL", "ONAPPUPDATE", "ONEXTERNALCALLSTART",
          "ONEXTERNALCALLBACKSTART", "ONUSERADD")
# Lifecycle events stay online in the offline mode: ONAPPINSTALL brings the application
# token (and is only sent online), ONAPPUNINSTALL must reach us while the tokens still
# exist, and ONAPPUPDATE re-runs this setup. So do the telephony events a person waits on:
# a click-to-call or a web-form callback read by the offline poll would ring half a minute
# late (issue 23 point 3).
ALWAYS_ONLINE = frozenset({"ONAPPINSTALL", "ONAPPUNINSTALL", "ONAPPUPDATE",
                           "ONEXTERNALCALLSTART", "ONEXTERNALCALLBACKSTART"})
PLACEMENTS = {
    "TELEPHONY_ANALYTICS_MENU": ("/placements/dashboard", "b24relay: calls"),
    "CALL_CARD": ("/placements/call-card", "b24relay"),
}
USER_PAGE = 50
# The scopes the app's card asks for (README, "The URLs to give Bitrix24"): each one with the
# granted scopes that satisfy it (user.get reads UF_PHONE_INNER with any of the user scopes,
# protocol §8.1). The self-diagnosis checks the portal's grant against this; what each is
# for, in words, is in app/installation/diagnosis_text.py.
NEEDED_SCOPES: dict[str, tuple[str, ...]] = {
    "crm": ("crm",),
    "telephony": ("telephony",),
    "placement": ("placement",),
    "user_basic": ("user_basic", "user", "user_brief"),
}
READ_COMMANDS: Commands = {
    "app": ("app.info", {}),
    "events": ("event.get", {}),
    "placements": ("placement.get", {}),
    "lines": ("telephony.externalLine.get", {}),
    "users": ("user.get", {}),
}


@dataclass
class SetupReport:
    """What a setup (either executor) found and changed."""

    plan: str = Plan.STANDARD.value
    events_bound: list[str] = field(default_factory=list)
    events_unbound: list[str] = field(default_factory=list)
    placements_bound: list[str] = field(default_factory=list)
    placements_unbound: list[str] = field(default_factory=list)
    lines_added: list[str] = field(default_factory=list)
    lines_updated: list[str] = field(default_factory=list)
    users: int = 0

    @property
    def changed(self) -> bool:
        """Whether anything was bound or added."""
        return bool(self.events_bound or self.events_unbound or self.placements_bound
                    or self.placements_unbound or self.lines_added or self.lines_updated)


def public_url(path: str) -> str:
    """An absolute URL of this app as Bitrix24 reaches it."""
    return str(current_app.config["APP_PUBLIC_URL"]).rstrip("/") + path


def int_or_none(value: Any) -> int | None:
    """``int(value)``, or None for a missing or malformed value."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def as_list(value: Any) -> list[Any]:
    """A list answer as a list (Bitrix24 sends some lists as ``{"0": ..., "1": ...}``)."""
    if isinstance(value, dict):
        return list(value.values())
    return list(value or [])


def decide(portal: Portal, state: Mapping[str, Any], report: SetupReport
           ) -> tuple[Commands, Kinds]:
    """What the reads call for: take the portal's plan, then the commands still missing."""
    apply_plan(portal, state["app"], report)
    return missing_bindings(portal, state)


def apply_plan(portal: Portal, app: Mapping[str, Any], report: SetupReport) -> None:
    """Take the portal's plan from its ``app.info`` (LICENSE_FAMILY ``ent``: enterprise)."""
    family = str((app or {}).get("LICENSE_FAMILY") or "").lower()
    portal.set_plan(Plan.ENTERPRISE if family == "ent" else Plan.STANDARD)
    report.plan = portal.plan


def event_handler_url(member_id: str) -> str:
    """The portal's ``/b24/events`` URL with its handler key (app.tenants.handler_key).

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
    for i, (method, params) in enumerate(line_commands(portal, state["lines"])):
        writes[f"ln{i}"] = (method, params)
        kinds[f"ln{i}"] = ("line" if method == LINE_ADD else "line_update", params["NUMBER"])
    return writes, kinds


def _stale_placements(placed: set[tuple[str, Any]]) -> set[tuple[str, Any]]:
    """Our widgets still bound to a handler we no longer use (APP_PUBLIC_URL moved).

    Each is unbound by its handler; the answer's ``count`` is not read (the portal counts
    2 per handler removed, b24restdocs placement-unbind), ``placement.get`` is the truth.
    """
    wanted = wanted_placements()
    return {(code, handler) for code, handler in placed
            if code in wanted and handler != wanted[code][0]}


LINE_ADD, LINE_UPDATE, LINE_DELETE = ("telephony.externalLine.add",
                                      "telephony.externalLine.update",
                                      "telephony.externalLine.delete")
LINE_NUMBER_MAX = 50  # Bitrix24 trims NUMBER and keeps 50 characters (§8.2)


def line_number(value: Any) -> str:
    """A line's number as Bitrix24 stores it (add's ``NUMBER``, register's ``LINE_NUMBER``)."""
    return str(value if value is not None else "").strip()[:LINE_NUMBER_MAX]


def crm_auto_create(portal: Portal) -> str:
    """A line's ``CRM_AUTO_CREATE``: the literal "Y" or "N" (Bitrix24 reads only "Y" as yes:
    1 or true would be no, §8.2), from the portal's crm_create setting."""
    settings = portal.settings
    return "Y" if settings is None or settings.crm_create else "N"


def configured_lines(portal: Portal) -> dict[str, str]:
    """``{number: name}`` of the company numbers in the portal's settings."""
    out: dict[str, str] = {}
    for line in (portal.settings.lines if portal.settings else None) or []:
        number = line_number(line.get("number"))
        if number and number not in out:
            out[number] = str(line.get("name") or "").strip() or number
    return out


def line_commands(portal: Portal, existing: Any) -> list[tuple[str, dict[str, Any]]]:
    """Add the configured lines Bitrix24 lacks; update those whose ``NAME`` or
    ``CRM_AUTO_CREATE`` differ.

    ``existing`` is ``telephony.externalLine.get``: this app's lines only, the ones a
    register auto-created for an unknown ``LINE_NUMBER`` among them (nameless, and made
    with CRM_AUTO_CREATE Y). Those are kept, named after their number and given the
    portal's CRM_AUTO_CREATE. Nothing is deleted here: a line leaves Bitrix24 when an
    administrator removes it from the settings (:func:`removed_lines`), not because the
    PBX used a number the settings never listed.
    """
    have = {line_number(line.get("NUMBER")): line for line in as_list(existing)
            if isinstance(line, Mapping) and line_number(line.get("NUMBER"))}
    crm = crm_auto_create(portal)
    wanted = configured_lines(portal)
    out: list[tuple[str, dict[str, Any]]] = []
    for number, name in wanted.items():
        if number not in have:
            out.append((LINE_ADD, {"NUMBER": number, "NAME": name, "CRM_AUTO_CREATE": crm}))
    for number, line in have.items():
        name = wanted.get(number) or str(line.get("NAME") or "").strip() or number
        if str(line.get("NAME") or "") != name or str(line.get("CRM_AUTO_CREATE") or "") != crm:
            out.append((LINE_UPDATE, {"NUMBER": number, "NAME": name, "CRM_AUTO_CREATE": crm}))
    return out


def removed_lines(before: Any, after: Any) -> list[str]:
    """The numbers of the settings' lines ``before`` that ``after`` no longer has."""
    kept = {line_number(line.get("number")) for line in after or [] if isinstance(line, Mapping)}
    return sorted({n for line in before or [] if isinstance(line, Mapping)
                   if (n := line_number(line.get("number"))) and n not in kept})


def line_already_exists(error: Mapping[str, Any] | None) -> bool:
    """Whether add's error is "Line already exists" (then the line is updated instead)."""
    return "line already exists" in str((error or {}).get("error_description") or "").lower()


def line_not_found(error: Mapping[str, Any] | None) -> bool:
    """Whether the error is "Could not find line with number X" (a delete: already done)."""
    return "could not find line" in str((error or {}).get("error_description") or "").lower()
