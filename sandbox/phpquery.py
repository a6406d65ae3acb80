"""PHP-compatible query strings: parse_str-style nested keys, http_build_query, json shapes."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_plus

_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
_KEY_RE = re.compile(r"\[([^\]]*)\]")


def php_urlencode(value: str) -> str:
    """Encode like PHP urlencode(): only alnum and -_. stay, space becomes '+'."""
    out = []
    for byte in value.encode("utf-8"):
        if byte in _SAFE:
            out.append(chr(byte))
        elif byte == 0x20:
            out.append("+")
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def scalar_to_str(value: Any) -> str:
    """Convert a scalar the way PHP casts it to string."""
    if value is True:
        return "1"
    if value is False or value is None:
        return ""
    return str(value)


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Flatten nested dicts/lists into PHP bracket key pairs (all values strings)."""
    pairs: list[tuple[str, str]] = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    else:
        return [(prefix, scalar_to_str(value))]
    for key, item in items:
        name = f"{prefix}[{key}]" if prefix else str(key)
        pairs.extend(flatten(item, name))
    return pairs


def build_query(data: dict[str, Any]) -> str:
    """Return a PHP http_build_query() style string for nested data."""
    return "&".join(f"{php_urlencode(k)}={php_urlencode(v)}" for k, v in flatten(data))


def split_key(raw: str) -> list[str]:
    """Split 'a[b][]' into ['a', 'b', ''] following PHP rules (no brackets -> one part)."""
    first = raw.find("[")
    if first <= 0:
        return [raw]
    head, rest = raw[:first], raw[first:]
    parts = [head]
    pos = 0
    while pos < len(rest):
        match = _KEY_RE.match(rest, pos)
        if not match:
            break  # PHP ignores trailing garbage after the last complete bracket
        parts.append(match.group(1))
        pos = match.end()
    return parts


def insert(target: dict[str, Any], parts: list[str], value: Any) -> None:
    """Insert value into nested dicts along the key parts ('' appends)."""
    node = target
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "":
            part = str(_next_index(node))
        if last:
            node[part] = value
            return
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child


def _next_index(node: dict[str, Any]) -> int:
    ints = [int(k) for k in node if k.lstrip("-").isdigit()]
    return max(ints) + 1 if ints else 0


def listify(value: Any) -> Any:
    """Turn dicts keyed exactly 0..n-1 into lists, recursively (PHP list arrays)."""
    if isinstance(value, dict):
        conv = {k: listify(v) for k, v in value.items()}
        if conv and list(conv.keys()) == [str(i) for i in range(len(conv))]:
            return list(conv.values())
        return conv
    if isinstance(value, list):
        return [listify(v) for v in value]
    return value


def parse_pairs(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Build nested params from flat (key, value) pairs with PHP bracket keys."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if not key:
            continue
        insert(result, split_key(key), value)
    return listify(result)


def parse_str(query: str) -> dict[str, Any]:
    """PHP parse_str(): decode a query string with '+' as space into nested params."""
    pairs = []
    for chunk in query.split("&"):
        if not chunk:
            continue
        key, _, value = chunk.partition("=")
        pairs.append((unquote_plus(key), unquote_plus(value)))
    return parse_pairs(pairs)


def php_shape(mapping: dict[str, Any]) -> Any:
    """Shape a PHP array for json_encode: empty -> [], keys 0..n-1 in order -> list."""
    if not mapping:
        return []
    keys = [str(k) for k in mapping]
    if keys == [str(i) for i in range(len(keys))]:
        return list(mapping.values())
    return {str(k): v for k, v in mapping.items()}
