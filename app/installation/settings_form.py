"""A portal's settings, validated and written in one place: the settings page
(placements/settings/views.py) and ``flask portals settings`` (app/installation/cli.py) both
go through :func:`apply`, so a value the page refuses the terminal refuses with the same words.

Values come in as text (a form field, a ``key=value`` argument); only the keys given are
changed, and nothing is written unless every one of them is valid. An empty value clears an
optional setting (``default_user_id``, ``pbx_originate_url``, ``pbx_secret``).

========================  =================================================================
key                       value
========================  =================================================================
``event_mode``            ``online`` or ``offline`` (how Bitrix24 delivers its events)
``lines``                 the company lines, ``NUMBER [name]`` one a line (``;`` also
                          separates lines), at most :data:`MAX_LINES`
``crm_create``            ``1`` or ``0`` (also yes/no, true/false, on/off): new CRM leads
                          for unknown numbers, and each line's ``CRM_AUTO_CREATE``
``default_user_id``       the fallback user: an active user of the portal known to the app
``pbx_originate_url``     where the PBX takes originate requests: ``http(s)://host/...``
``pbx_secret``            the originate signing secret, at least :data:`MIN_SECRET` characters;
                          ``new`` generates one (shown once by the caller)
``crm_source``            register's CRM_SOURCE for the leads calls create (a STATUS_ID)
``add_to_chat``           ``1`` or ``0``: finish posts one chat message per call
``anonymous_calls``       ``skip`` or ``register`` calls without a caller number
``anonymous_number``      the number anonymous calls are registered under
``internal_calls``        ``skip`` or ``register`` calls between extensions
``default_country``       ISO 3166 alpha-2 code of numbers dialled without one (``DE``, ``RU``)
``route_priority``        the CRM kinds routing ranks, in order: some of ``contact``,
                          ``company``, ``lead`` (``contact,lead``); ``none``: never route
``route_skip_absent``     ``1`` or ``0``: routing skips a responsible who is not at work
``max_batches_in_flight`` ``auto`` (the app's rule) or K, batches in flight at once for this
                          portal: 1 to the plan's burst plus its real-time slots (60
                          standard, 300 enterprise)
``sequential``            ``1`` or ``0``: one batch in flight at a time (K=1, whatever
                          ``max_batches_in_flight`` says)
========================  =================================================================

The call options (``crm_source`` to ``route_skip_absent``) are the app's ``TELEPHONY_*``
settings per portal: an empty value (or ``default``) gives the portal the app's default back.
So are the dispatcher limits, of ``DISPATCH_MAX_INFLIGHT`` and ``DISPATCH_MODE``; a save
that changes them is announced to the dispatcher engines, which apply it within a second.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import phonenumbers
from flask import current_app
from flask_babel import gettext as _

from app.dispatcher.credentials import limits_changed
from app.dispatcher.engine import automatic_slots, plan_slots
from app.extensions import db, redis_ext
from app.installation import diagnosis, upkeep
from app.installation.plan import removed_lines
from app.queue import enqueue
from app.tenants.models import Portal, PortalSettings
from app.tenants.users import find_user

EVENT_MODES = ("online", "offline")
MAX_LINES = 40
MIN_SECRET = 16
NEW_SECRET = "new"
MASK = "********"
# The call options: column -> the app's setting that is its default (NULL: that default).
CALL_OPTIONS = {"crm_source": "TELEPHONY_CRM_SOURCE", "add_to_chat": "TELEPHONY_ADD_TO_CHAT",
                "anonymous_calls": "TELEPHONY_ANONYMOUS_CALLS",
                "anonymous_number": "TELEPHONY_ANONYMOUS_NUMBER",
                "internal_calls": "TELEPHONY_INTERNAL_CALLS",
                "default_country": "TELEPHONY_DEFAULT_COUNTRY",
                "route_priority": "TELEPHONY_ROUTE_PRIORITY",
                "route_skip_absent": "TELEPHONY_ROUTE_SKIP_ABSENT"}
# The dispatcher limits (app/dispatcher/engine.py Settings.portal); NULL: the app's rule.
LIMITS = ("max_batches_in_flight", "sequential")
AUTO = ("auto", "automatic", "default", "")
ROUTE_KINDS = ("contact", "company", "lead")
NEVER = "none"
CALL_POLICIES = ("skip", "register")
DEFAULT = "default"
SETTABLE = ("event_mode", "lines", "crm_create", "default_user_id", "pbx_originate_url",
            "pbx_secret", *CALL_OPTIONS, *LIMITS)
SECRETS = frozenset({"pbx_secret"})
LISTED = SETTABLE
_YES, _NO = ("1", "yes", "true", "on", "y"), ("0", "no", "false", "off", "n", "")


class Invalid(ValueError):
    """Values the settings refuse, ``errors`` = ``{key: message}``: the page shows each next
    to its field, the terminal all of them (``str()``, joined by ``; ``)."""

    def __init__(self, errors: dict[str, str] | str) -> None:
        self.errors = dict(errors) if isinstance(errors, dict) else {"": str(errors)}
        super().__init__("; ".join(self.errors.values()))


class _Refused(ValueError):
    """One value refused (its message); :func:`apply` collects them by key."""


@dataclass
class Applied:
    """What a save changed: the keys, a generated secret (to show once), and whether the
    portal's setup must run again (lines, event mode or the CRM setting changed)."""

    changed: list[str] = field(default_factory=list)
    setup_needed: bool = False
    new_secret: str | None = None


def settings_of(portal: Portal) -> PortalSettings:
    """The portal's settings row, created (not committed) when it has none yet."""
    if portal.settings is None:
        portal.settings = PortalSettings()
        db.session.add(portal.settings)
    return portal.settings


def parse_lines(text: str) -> list[dict[str, str]]:
    """``NUMBER [name]`` per line → ``[{"number", "name"}]``; raises Invalid when malformed."""
    try:
        return _parse_lines(text)
    except _Refused as exc:
        raise Invalid({"lines": str(exc)}) from None


def _parse_lines(text: str) -> list[dict[str, str]]:
    lines: list[dict[str, str]] = []
    seen: set[str] = set()
    for raw in text.replace(";", "\n").splitlines():
        raw = raw.strip()
        if not raw:
            continue
        number, _sep, name = raw.partition(" ")
        if len(number) > 32 or not number.replace("+", "", 1).replace("-", "").isalnum():
            raise _Refused(_("line number %(number)s is not valid", number=repr(number[:40])))
        if number not in seen:
            seen.add(number)
            lines.append({"number": number, "name": name.strip()[:100] or number})
    if len(lines) > MAX_LINES:
        raise _Refused(_("at most %(count)s lines", count=MAX_LINES))
    return lines


def lines_text(settings: PortalSettings) -> str:
    """The lines as the page's textarea shows them, one ``NUMBER name`` a line."""
    return "\n".join(f"{line.get('number')} {line.get('name') or ''}".strip()
                     for line in settings.lines or [])


def _yes_no(key: str, text: str) -> bool:
    if text.lower() not in _YES + _NO:
        raise _Refused(_("%(key)s must be 1 or 0", key=key))
    return text.lower() in _YES


def _fallback_user(portal: Portal, text: str) -> int | None:
    if not text:
        return None
    if not text.isdigit():
        raise _Refused(_("the fallback user must be a Bitrix24 user id (a number)"))
    user = find_user(portal, int(text))
    if user is None:
        raise _Refused(_("user %(id)s is not a user of this portal known to b24relay "
                         "(the user list syncs on install and hourly)", id=text))
    if not user.active:
        raise _Refused(_("user %(id)s is inactive: Bitrix24 refuses calls for inactive users",
                         id=text))
    return int(text)


def _originate_url(text: str) -> str | None:
    if not text:
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Refused(_("the PBX originate URL must be http(s)://host/..."))
    if len(text) > 1024:
        raise _Refused(_("the PBX originate URL is longer than 1024 characters"))
    return text


def _secret(text: str) -> str | None:
    if not text:
        return None
    if text == NEW_SECRET:
        return secrets.token_urlsafe(32)
    if len(text) < MIN_SECRET or len(text) > 256:
        raise _Refused(_("the PBX secret must be %(min)s to 256 characters (or %(new)s for a "
                         "generated one)", min=MIN_SECRET, new=repr(NEW_SECRET)))
    return text


def _call_option(key: str, text: str) -> object:
    """A call option's text → its value; None (the app's default) for "" or ``default``."""
    if not text or text.lower() == DEFAULT:
        return None
    if key in ("add_to_chat", "route_skip_absent"):
        return _yes_no(key, text)
    if key == "route_priority":
        return _route_priority(text)
    if key in ("anonymous_calls", "internal_calls"):
        if text.lower() not in CALL_POLICIES:
            raise _Refused(_("%(key)s must be skip or register", key=key))
        return text.lower()
    if key == "anonymous_number":
        if len(text) > 32 or not text.lstrip("+").isdigit():
            raise _Refused(_("the anonymous number must be digits (a leading + is fine), "
                             "at most 32"))
        return text
    if key == "default_country":
        code = text.upper()
        if len(code) != 2 or code not in phonenumbers.SUPPORTED_REGIONS:
            raise _Refused(_("%(code)s is not a known two-letter country code (DE, RU, US...)",
                             code=repr(text[:8])))
        return code
    if len(text) > 50 or not text.replace("_", "").replace("-", "").isalnum():  # crm_source
        raise _Refused(_("the CRM source must be a source ID of the portal's CRM (letters, "
                         "digits, _ and -), at most 50 characters"))
    return text


def _route_priority(text: str) -> str:
    """``"Contact, lead"`` -> ``"contact,lead"``; ``none`` -> ``""`` (never route)."""
    if text.lower() == NEVER:
        return ""
    kinds = [kind.strip().lower() for kind in text.replace(",", " ").split()]
    unknown = [kind for kind in kinds if kind not in ROUTE_KINDS]
    if unknown:
        raise _Refused(_("%(kind)s is not a CRM kind routing knows: list some of contact, "
                         "company, lead in the order they win (or none)",
                         kind=repr(unknown[0][:20])))
    twice = [kind for n, kind in enumerate(kinds) if kind in kinds[:n]]
    if twice:
        raise _Refused(_("%(kind)s is listed twice: list each kind once, in the order they "
                         "win", kind=repr(twice[0])))
    return ",".join(kinds)


def _limit(portal: Portal, key: str, text: str) -> object:
    """A dispatcher limit's text → its value; None (the app's rule) for auto or empty."""
    if text.lower() in AUTO:
        return None
    if key == "sequential":
        return _yes_no(key, text)
    top = plan_slots(portal.plan or "standard")
    if not text.isdigit() or not 1 <= int(text) <= top:
        raise _Refused(_("batches in flight must be auto or a number from 1 to %(top)s (the "
                         "%(plan)s plan's burst and its real-time slots)", top=top,
                         plan=portal.plan or "standard"))
    return int(text)


def _parse(portal: Portal, key: str, text: str) -> object:
    """One setting's text → its value, or _Refused with the message both callers show."""
    text = text.strip()
    if key == "event_mode":
        if text not in EVENT_MODES:
            raise _Refused(_("event mode must be online or offline"))
        return text
    if key == "lines":
        return _parse_lines(text)
    if key == "crm_create":
        return _yes_no(key, text)
    if key == "default_user_id":
        return _fallback_user(portal, text)
    if key == "pbx_originate_url":
        return _originate_url(text)
    if key == "pbx_secret":
        return _secret(text)
    if key in CALL_OPTIONS:
        return _call_option(key, text)
    if key in LIMITS:
        return _limit(portal, key, text)
    raise _Refused(_("unknown setting %(key)s; the settings are: %(keys)s", key=repr(key),
                     keys=", ".join(SETTABLE)))


def effective(settings: PortalSettings | None, key: str) -> object:
    """A call option as the portal's calls use it: its own value, else the app's default."""
    value = getattr(settings, key, None) if settings is not None else None
    return current_app.config[CALL_OPTIONS[key]] if value is None else value


def automatic(portal: Portal) -> dict[str, object]:
    """The dispatcher limits a portal gets without its own (the app's rule on its plan):
    ``{"max_batches_in_flight": K, "sequential": bool, "top": the most it may set}``."""
    cfg, plan = current_app.config, portal.plan or "standard"
    return {"max_batches_in_flight": automatic_slots(cfg, plan),
            "sequential": cfg["DISPATCH_MODE"] == "sequential", "top": plan_slots(plan)}


def _together(settings: PortalSettings, parsed: dict[str, object]) -> dict[str, str]:
    """Refusals of values that are each fine but not together."""
    def after(key: str) -> object:
        value = parsed[key] if key in parsed else getattr(settings, key, None)
        return current_app.config[CALL_OPTIONS[key]] if value is None else value

    touched = {"anonymous_calls", "anonymous_number"} & set(parsed)
    if touched and after("anonymous_calls") == "register" and not after("anonymous_number"):
        return {"anonymous_number": _("registering anonymous calls needs the number they are "
                                      "registered under (Bitrix24 refuses a call without one)")}
    return {}


def apply(portal: Portal, values: dict[str, str]) -> Applied:
    """Validate every value, then write them all (caller commits, then calls
    :func:`after_commit`). Lines removed by the save are deleted from Bitrix24 in the same
    transaction (outbox commands). Raises Invalid with every bad value's message (by key),
    writing nothing, when any value is refused."""
    parsed: dict[str, object] = {}
    errors: dict[str, str] = {}
    for key, text in values.items():
        try:
            parsed[key] = _parse(portal, key, text)
        except _Refused as exc:
            errors[key] = str(exc)
    settings = settings_of(portal)
    if not errors:
        errors = _together(settings, parsed)
    if errors:
        raise Invalid(errors)
    before = list(settings.lines or [])
    result = Applied()
    for key, value in parsed.items():
        current = getattr(settings, key)
        if key == "crm_create":
            current = bool(current)
        if key == "lines":
            current = current or []
        if value != current:
            result.changed.append(key)
            setattr(settings, key, value)
    if "pbx_secret" in result.changed and values["pbx_secret"].strip() == NEW_SECRET:
        result.new_secret = settings.pbx_secret
    result.setup_needed = bool({"lines", "event_mode", "crm_create"} & set(result.changed))
    removed = removed_lines(before, settings.lines or [])
    if removed:  # deleted from Bitrix24 with the save: committed together (§8.2)
        upkeep.submit_line_deletes(portal, removed)
    return result


def after_commit(portal: Portal, result: Applied) -> None:
    """Once the save is committed: lines to add or rename, or events to rebind for a new
    event mode, are the setup's job; a change is followed by a self-diagnosis (a worker's, once
    the setup had time to run: ``DIAGNOSIS_SETTLE_SECONDS``)."""
    if result.setup_needed:
        enqueue("setup_portal", portal.id)
    if set(LIMITS) & set(result.changed):  # the portal's driver reads them at once
        limits_changed(redis_ext.client, portal.id)
    if result.changed:
        diagnosis.request_check(portal, "settings")


def listing(portal: Portal) -> list[tuple[str, str]]:
    """Every setting with its value as text, secrets masked (set or not, never the value)."""
    settings = portal.settings or PortalSettings()
    rows: list[tuple[str, str]] = []
    for key in LISTED:
        value = getattr(settings, key, None)
        if value is None and key in CALL_OPTIONS:
            rows.append((key, f"(app default: {_text(key, effective(None, key))})"))
            continue
        if value is None and key in LIMITS:
            rows.append((key, f"(auto: {_text(key, automatic(portal)[key])})"))
            continue
        if value is None:  # no row yet: the column's default is what the app uses
            arg = getattr(PortalSettings.__table__.c[key].default, "arg", None)
            value = None if callable(arg) else arg
        rows.append((key, _text(key, value, settings)))
    return rows


def _text(key: str, value: object, settings: PortalSettings | None = None) -> str:
    if key in SECRETS:
        return MASK if value else "(not set)"
    if key == "lines":
        return "; ".join(line.replace("\n", "") for line in
                         lines_text(settings or PortalSettings()).splitlines()) or "(none)"
    if isinstance(value, bool):
        return "1" if value else "0"
    if key == "route_priority" and value == "":
        return NEVER
    if value is None or value == "":
        return "(not set)"
    return str(value)
