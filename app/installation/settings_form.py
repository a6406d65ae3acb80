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
========================  =================================================================

``max_batches_in_flight`` is a column nobody reads: it is listed, but not settable.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from app.extensions import db
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
SETTABLE = ("event_mode", "lines", "crm_create", "default_user_id", "pbx_originate_url",
            "pbx_secret")
SECRETS = frozenset({"pbx_secret"})
LISTED = SETTABLE + ("max_batches_in_flight",)
_YES, _NO = ("1", "yes", "true", "on", "y"), ("0", "no", "false", "off", "n", "")


class Invalid(ValueError):
    """A value the settings refuse; its text is shown as is (page and terminal)."""


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
    lines: list[dict[str, str]] = []
    seen: set[str] = set()
    for raw in text.replace(";", "\n").splitlines():
        raw = raw.strip()
        if not raw:
            continue
        number, _, name = raw.partition(" ")
        if len(number) > 32 or not number.replace("+", "", 1).replace("-", "").isalnum():
            raise Invalid(f"line number {number[:40]!r} is not valid")
        if number not in seen:
            seen.add(number)
            lines.append({"number": number, "name": name.strip()[:100] or number})
    if len(lines) > MAX_LINES:
        raise Invalid(f"at most {MAX_LINES} lines")
    return lines


def lines_text(settings: PortalSettings) -> str:
    """The lines as the page's textarea shows them, one ``NUMBER name`` a line."""
    return "\n".join(f"{line.get('number')} {line.get('name') or ''}".strip()
                     for line in settings.lines or [])


def _parse(portal: Portal, key: str, text: str) -> object:
    """One setting's text → its value, or Invalid with the message both callers show."""
    text = text.strip()
    if key == "event_mode":
        if text not in EVENT_MODES:
            raise Invalid("event mode must be online or offline")
        return text
    if key == "lines":
        return parse_lines(text)
    if key == "crm_create":
        if text.lower() not in _YES + _NO:
            raise Invalid("crm_create must be 1 or 0")
        return text.lower() in _YES
    if key == "default_user_id":
        if not text:
            return None
        if not text.isdigit():
            raise Invalid("the fallback user must be a Bitrix24 user id (a number)")
        user = find_user(portal, int(text))
        if user is None:
            raise Invalid(f"user {text} is not a user of this portal known to b24relay "
                          "(the user list syncs on install and hourly)")
        if not user.active:
            raise Invalid(f"user {text} is inactive: Bitrix24 refuses calls for inactive users")
        return int(text)
    if key == "pbx_originate_url":
        if not text:
            return None
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Invalid("the PBX originate URL must be http(s)://host/...")
        if len(text) > 1024:
            raise Invalid("the PBX originate URL is longer than 1024 characters")
        return text
    if key == "pbx_secret":
        if not text:
            return None
        if text == NEW_SECRET:
            return secrets.token_urlsafe(32)
        if len(text) < MIN_SECRET or len(text) > 256:
            raise Invalid(f"the PBX secret must be {MIN_SECRET} to 256 characters "
                          f"(or {NEW_SECRET!r} for a generated one)")
        return text
    if key in LISTED:
        raise Invalid(f"{key} is not used by b24relay and cannot be set")
    raise Invalid(f"unknown setting {key!r}; the settings are: {', '.join(SETTABLE)}")


def apply(portal: Portal, values: dict[str, str]) -> Applied:
    """Validate every value, then write them all (caller commits, then calls
    :func:`after_commit`). Lines removed by the save are deleted from Bitrix24 in the same
    transaction (outbox commands). Raises Invalid, writing nothing, on the first bad value."""
    parsed = {key: _parse(portal, key, text) for key, text in values.items()}
    settings = settings_of(portal)
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
    if result.changed:
        diagnosis.request_check(portal, "settings")


def listing(portal: Portal) -> list[tuple[str, str]]:
    """Every setting with its value as text, secrets masked (set or not, never the value)."""
    settings = portal.settings or PortalSettings()
    rows: list[tuple[str, str]] = []
    for key in LISTED:
        value = getattr(settings, key, None)
        if value is None:  # no row yet: the column's default is what the app uses
            arg = getattr(PortalSettings.__table__.c[key].default, "arg", None)
            value = None if callable(arg) else arg
        if key in SECRETS:
            text = MASK if value else "(not set)"
        elif key == "lines":
            text = "; ".join(line.replace("\n", "") for line in lines_text(settings).splitlines()) \
                or "(none)"
        elif key == "crm_create":
            text = "1" if value else "0"
        elif value is None or value == "":
            text = "(not set)"
        else:
            text = str(value)
        if key == "max_batches_in_flight":
            text += " (not used)"
        rows.append((key, text))
    return rows
