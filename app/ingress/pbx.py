"""The PBX's call events: schema check, naming the first wrong field (see PBX_EVENTS.md)."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from app.ingress.formparse import clip

EVENTS = ("start", "ring", "ring_end", "answer", "transfer", "end", "record")
DIRECTIONS = ("in", "out")
END_STATUSES = ("answered", "busy", "no_answer", "cancelled", "failed")
MAX_EVENTS_PER_REQUEST = 500
MAX_TEXT = 256
MAX_SIP_CODE = 16  # finish's STATUS_CODE: 486, 603-S, OTHER...
MAX_DEPTH = 16  # {"events": [{...}]} is 3 deep; extra fields a PBX adds get the rest


def deeper_than(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON data nests lists/objects more than ``limit`` levels (checked without
    recursion: a body just under the size limit can nest tens of thousands of levels, and
    Python's JSON encoder and the database's JSON column would hit the recursion limit)."""
    level: list[Any] = [value]
    for _ in range(limit):  # after i rounds, level holds the containers at depth i + 1
        level = [child for node in level
                 for child in (node.values() if isinstance(node, dict) else
                               node if isinstance(node, list) else ())
                 if isinstance(child, (dict, list))]
        if not level:
            return False
    return True


# "\u0000" not itself escaped ("\\u0000" is a backslash, then "u0000").
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def holds_nul(body: bytes) -> bool:
    """Whether a JSON body writes a NUL character, which PostgreSQL's JSONB cannot hold
    (stored, it would fail the INSERT as if the database were down, and the PBX retries a
    503 for ever)."""
    return b"\\u0000" in body and _NUL_ESCAPE.search(body) is not None


def _path(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


class InvalidEvent(ValueError):
    """A call event does not match the schema; ``field`` is its path, e.g. ``events[2].at``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class _NonFinite:
    """Stands where the JSON said NaN, Infinity, or a number too large for a float."""

    __slots__ = ()


def loads(body: bytes) -> tuple[Any, bool]:
    """The body as JSON, and whether it holds a number that is not finite.

    ``json.loads`` accepts NaN and Infinity (and turns 1e999 into infinity); such a
    number can be neither stored as JSON nor used as a duration. A marker takes its
    place, so that ``non_finite_field`` can name where it was.
    """
    seen: list[str] = []

    def non_finite(text: str) -> _NonFinite:
        seen.append(text)
        return _NonFinite()

    def number(text: str) -> float | _NonFinite:
        value = float(text)
        return value if math.isfinite(value) else non_finite(text)

    return json.loads(body, parse_constant=non_finite, parse_float=number), bool(seen)


def non_finite_field(data: Any, where: str = "") -> str | None:
    """The path of the first non-finite number in ``data`` (checked no deeper than MAX_DEPTH)."""
    if isinstance(data, _NonFinite):
        return where or "body"
    if isinstance(data, dict):
        children: Any = ((_path(where, clip(str(k))), v) for k, v in data.items())
    elif isinstance(data, list):
        children = ((f"{where}[{i}]", v) for i, v in enumerate(data))
    else:
        return None
    for path, value in children:
        found = non_finite_field(value, path)
        if found:
            return found
    return None


def _text(event: dict[str, Any], name: str, where: str, required: bool = True) -> str | None:
    value = event.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidEvent(_path(where, name), "required, a non-empty string")
    value = str(value).strip()
    if not value or len(value) > MAX_TEXT:
        raise InvalidEvent(_path(where, name), f"must be 1..{MAX_TEXT} characters")
    return value


def _choice(event: dict[str, Any], name: str, where: str, allowed: tuple[str, ...]) -> str:
    value = event.get(name)
    if value not in allowed:
        raise InvalidEvent(_path(where, name), f"must be one of {', '.join(allowed)}")
    return value


def _timestamp(event: dict[str, Any], where: str) -> str:
    value = event.get("at")
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if not isinstance(value, str) or parsed is None or parsed.utcoffset() is None:
        raise InvalidEvent(_path(where, "at"), "must be an ISO 8601 time with an offset, "
                                          "e.g. 2026-11-22T16:40:00+03:00")
    return value


def _extensions(event: dict[str, Any], where: str) -> list[str]:
    value = event.get("extensions")
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise InvalidEvent(_path(where, "extensions"), "required, an extension or a non-empty list")
    items = []
    for i, item in enumerate(value):
        text = "" if isinstance(item, bool) or not isinstance(item, (str, int)) else str(item)
        if not text.strip() or len(text) > MAX_TEXT:
            raise InvalidEvent(_path(where, f"extensions[{i}]"), "must be a non-empty extension")
        items.append(text.strip())
    return items


def _duration(event: dict[str, Any], where: str) -> int | float:
    value = event.get("duration")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise InvalidEvent(_path(where, "duration"), "required, seconds talked (a number >= 0)")
    return value  # kept as sent: telephony rounds a fraction up (4.2 s talked is 5, not 4)


def _sip_code(event: dict[str, Any], where: str) -> str:
    value = _text(event, "sip_code", where) or ""
    if len(value) > MAX_SIP_CODE:
        raise InvalidEvent(_path(where, "sip_code"), f"at most {MAX_SIP_CODE} characters")
    return value


def _url(event: dict[str, Any], where: str) -> str:
    value = _text(event, "url", where) or ""
    try:
        parts = urlsplit(value)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:  # e.g. an unclosed IPv6 bracket, or a port that is not a number
        valid = False
    if not valid:
        raise InvalidEvent(_path(where, "url"), "must be an http(s) URL of the recording")
    return value


def _flag(event: dict[str, Any], name: str, where: str) -> bool:
    value = event.get(name)
    if not isinstance(value, bool):
        raise InvalidEvent(_path(where, name), "must be true or false")
    return value


def _optional_text(event: dict[str, Any], out: dict[str, Any], name: str, where: str) -> None:
    if event.get(name) is not None:
        out[name] = _text(event, name, where)


def validate_event(event: Any, where: str = "") -> dict[str, Any]:
    """Check one call event; return it normalised (extensions as a list, strings trimmed)."""
    if not isinstance(event, dict):
        raise InvalidEvent(where or "body", "must be a JSON object")
    out = dict(event)
    out["call_id"] = _text(event, "call_id", where)
    out["event"] = _choice(event, "event", where, EVENTS)
    out["at"] = _timestamp(event, where)
    kind = out["event"]
    if kind == "start":
        out["direction"] = _choice(event, "direction", where, DIRECTIONS)
        out["phone"] = _text(event, "phone", where)
        out["extensions"] = _extensions(event, where)
        for name in ("line", "caller_name", "origin_id"):
            _optional_text(event, out, name, where)
    elif kind in ("answer", "ring", "ring_end"):
        out["extension"] = _text(event, "extension", where)
    elif kind == "transfer":
        out["from_extension"] = _text(event, "from_extension", where)
        out["to_extension"] = _text(event, "to_extension", where)
    elif kind == "end":
        out["status"] = _choice(event, "status", where, END_STATUSES)
        out["duration"] = _duration(event, where)
        if event.get("sip_code") is not None:
            out["sip_code"] = _sip_code(event, where)
    elif kind == "record":
        out["url"] = _url(event, where)
    if kind in ("end", "record") and event.get("voicemail") is not None:
        out["voicemail"] = _flag(event, "voicemail", where)
    return out


def validate_body(body: Any) -> list[dict[str, Any]]:
    """One event object, or ``{"events": [...]}``: the list of checked events."""
    if isinstance(body, dict) and "events" in body:
        events = body["events"]
        if not isinstance(events, list) or not events:
            raise InvalidEvent("events", "must be a non-empty list of call events")
        if len(events) > MAX_EVENTS_PER_REQUEST:
            raise InvalidEvent("events", f"at most {MAX_EVENTS_PER_REQUEST} events per request")
        return [validate_event(e, f"events[{i}]") for i, e in enumerate(events)]
    return [validate_event(body)]
