"""PHP query-string encoding for batch commands (``a[]=1``, ``fields[TITLE]=x``).

Bitrix24 parses each batch command with PHP's ``parse_str``, so nested params
become bracket keys and every value is percent-encoded: an unencoded ``&``,
``=``, ``#``, ``+``, ``%`` or ``?`` would corrupt the command (protocol §5.1).

A ``None`` value is left out, key and all: PHP reads ``KEY=`` as the empty string, and
Bitrix24 treats an empty string as a value that is set (``CRM_ENTITY_TYPE=""`` binds an
empty entity and skips its own phone match, protocol §8.1/§8.3). Send ``""`` to mean "".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote


def _scalar(value: Any) -> str:
    if value is True:
        return "1"
    if value is False:
        return "0"
    return str(value)


def _pairs(prefix: str, value: Any) -> list[tuple[str, str]]:
    if value is None:
        return []  # omitted: "" would count as set
    if isinstance(value, Mapping):
        out: list[tuple[str, str]] = []
        for key, item in value.items():
            out += _pairs(f"{prefix}[{quote(str(key), safe='')}]", item)
        return out
    if isinstance(value, (list, tuple)):
        if all(not isinstance(item, (Mapping, list, tuple)) for item in value):
            return [(f"{prefix}[]", _scalar(item)) for item in value if item is not None]
        out = []
        for index, item in enumerate(value):
            out += _pairs(f"{prefix}[{index}]", item)
        return out
    return [(prefix, _scalar(value))]


def php_query(params: Mapping[str, Any] | None) -> str:
    """Encode nested params the way PHP's parse_str reads them back."""
    pairs: list[tuple[str, str]] = []
    for key, value in (params or {}).items():
        pairs += _pairs(quote(str(key), safe=""), value)
    return "&".join(f"{key}={quote(value, safe='')}" for key, value in pairs)


def command(method: str, params: Mapping[str, Any] | None = None) -> str:
    """One batch command string: ``method?query``."""
    query = php_query(params)
    return f"{method}?{query}" if query else method
