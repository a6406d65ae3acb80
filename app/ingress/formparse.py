"""Bitrix24's form bodies: PHP-style bracket keys into nested dicts and lists.

``data[FIELDS][ID]=759`` becomes ``{"data": {"FIELDS": {"ID": "759"}}}``; ``a[]=x&a[]=y``
appends; a dict whose keys are exactly ``"0".."n-1"`` becomes a list, except the body's
top level, which stays a dict of field names like PHP's ``$_POST`` (``0=a`` is
``{"0": "a"}``). Every scalar stays a string, as Bitrix24 sends it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any
from urllib.parse import unquote

MAX_DEPTH = 16
# Counted before anything is verified, so it bounds what a forged body costs. The
# largest events the app binds carry a few dozen fields (ONAPPINSTALL about 20,
# ONEXTERNALCALLSTART about 20, ONUSERADD a user record of under a hundred); a
# thousand leaves ten times that margin.
MAX_FIELDS = 1000
SHOWN_NAME_LENGTH = 40


class MalformedBody(ValueError):
    """The body is not a well-formed PHP-style form."""


def clip(text: str, limit: int = SHOWN_NAME_LENGTH) -> str:
    """A sender-chosen name as it may appear in a message or log: at most ``limit`` chars."""
    return text if len(text) <= limit else text[:limit] + "..."


CACHED_KEY_LENGTH = 64


def split_key(key: str) -> tuple[str, ...]:
    """``a[b][]`` -> ``("a", "b", "")``; unbalanced brackets are malformed.

    Every event repeats the same few dozen field names, so short ones are cached; the
    sender picks the names before anything is verified, so long ones are not (4096
    cached names of up to a whole body each would be a gigabyte per process).
    """
    return _split_cached(key) if len(key) <= CACHED_KEY_LENGTH else _split(key)


@lru_cache(maxsize=4096)
def _split_cached(key: str) -> tuple[str, ...]:
    return _split(key)


def _split(key: str) -> tuple[str, ...]:
    if key.count("[") >= MAX_DEPTH:  # before the loop: each step copies the rest of the key
        raise MalformedBody(f"nesting deeper than {MAX_DEPTH} in {clip(key)!r}")
    head, sep, rest = key.partition("[")
    if not head or "]" in head:
        raise MalformedBody(f"bad field name {clip(key)!r}")
    parts = [head]
    while sep:
        inner, close, rest = rest.partition("]")
        if not close or "[" in inner:
            raise MalformedBody(f"unbalanced brackets in {clip(key)!r}")
        parts.append(inner)
        if not rest:
            break
        if not rest.startswith("["):
            raise MalformedBody(f"text after brackets in {clip(key)!r}")
        rest = rest[1:]
    return tuple(parts)


class _Node(dict):  # type: ignore[type-arg]
    """A dict being filled, with its count of digit keys: the next ``a[]`` index in O(1)."""

    __slots__ = ("digits",)

    def __init__(self) -> None:
        super().__init__()
        self.digits = 0


def _assign(root: _Node, parts: tuple[str, ...], value: str, key: str) -> None:
    node = root
    last = len(parts) - 1
    for depth, part in enumerate(parts):
        if part == "":  # PHP's a[] = next index
            part = str(node.digits)
        child = node.get(part)
        if depth == last:
            if child is not None:
                raise MalformedBody(f"field {clip(key)!r} given twice or clashes with another")
            node[part] = value
            node.digits += part.isdigit()
            return
        if child is None:
            child = node[part] = _Node()
            node.digits += part.isdigit()
        elif not isinstance(child, _Node):
            raise MalformedBody(f"field {clip(key)!r} clashes with a scalar field")
        node = child


def _listify(node: Any) -> Any:
    if not isinstance(node, _Node):
        return node
    items = {k: _listify(v) for k, v in node.items()}
    if not items or node.digits != len(items):
        return items
    indexes = [str(i) for i in range(len(items))]
    if set(items) == set(indexes):
        return [items[i] for i in indexes]
    return items


def parse_pairs(pairs: list[tuple[str, str]], max_fields: int = MAX_FIELDS) -> dict[str, Any]:
    """Nest already-decoded ``(key, value)`` pairs, in time linear in their total length."""
    if len(pairs) > max_fields:
        raise MalformedBody(f"more than {max_fields} fields")
    root = _Node()
    for key, value in pairs:
        _assign(root, split_key(key), value, key)
    # Not the root itself: callers read fields by name, and a sender who names them 0..n-1
    # must get "missing field", not a list where a form was promised.
    return {name: _listify(value) for name, value in root.items()}


def _decode(part: str) -> str:
    if "+" in part:
        part = part.replace("+", " ")
    return unquote(part, errors="strict") if "%" in part else part


# Every event repeats the same encoded names (``auth%5Bmember_id%5D``) and most of its
# encoded values (endpoints, scope): short ones are decoded once per process. The
# bound keeps the sender, who picks them before anything is verified, from growing it.
_decode_short = lru_cache(maxsize=8192)(_decode)
CACHED_PART_LENGTH = 192


def _decode_part(part: str) -> str:
    if "%" not in part and "+" not in part:
        return part
    return _decode_short(part) if len(part) <= CACHED_PART_LENGTH else _decode(part)


def decode_pairs(text: str, max_fields: int = MAX_FIELDS) -> list[tuple[str, str]]:
    """``a=1&b=%20`` -> ``[("a", "1"), ("b", " ")]``, strictly.

    What ``urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=True,
    errors="strict")`` returns (a property test holds them equal), at a third of its
    cost: most fields of an event need no unquoting at all.
    """
    if not text:
        return []
    if text.count("&") >= max_fields:  # before splitting: the cap bounds the work
        raise MalformedBody(f"more than {max_fields} fields")
    pairs = []
    for field in text.split("&"):
        name, eq, value = field.partition("=")
        if not eq:
            raise MalformedBody(f"not a form body: bad field {clip(field)!r}")
        pairs.append((_decode_part(name), _decode_part(value)))
    return pairs


def parse_form(body: bytes, max_fields: int = MAX_FIELDS) -> dict[str, Any]:
    """Decode an ``application/x-www-form-urlencoded`` body into nested data.

    At most ``max_fields`` fields (counted before any other work); the cost is linear in
    the body's length whatever its shape (repeated ``a[]``, many names, deep keys). No
    field, name or value, may hold a NUL character.
    """
    # PostgreSQL's text and JSONB cannot hold NUL: stored, it would fail the INSERT as if
    # the database were down (503, counted as an outage). No Bitrix24 field carries one;
    # "%00" is the only way to write it encoded ("%2500" is a literal "%00").
    if b"%00" in body or b"\x00" in body:
        raise MalformedBody("a NUL character in a field")
    try:
        pairs = decode_pairs(body.decode("utf-8"), max_fields)
    except UnicodeDecodeError as exc:
        raise MalformedBody(f"not a form body: {exc}") from exc
    return parse_pairs(pairs, max_fields)


def encode_form(data: dict[str, Any]) -> str:
    """The inverse, as PHP's ``http_build_query`` writes it (used for tests and offline replay)."""
    from urllib.parse import urlencode

    pairs: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}[{k}]" if prefix else str(k), v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)
        else:
            pairs.append((prefix, "" if value is None else str(value)))

    walk("", data)
    return urlencode(pairs)
