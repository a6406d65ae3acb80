"""References between commands (pure): ``ref`` placeholders inside a command's params.

``ref(command_id, *path)`` stands for an earlier command's result inside a later command's
params; the packer turns it into ``$result[c<id>][...]`` when both share a batch, or into
the stored value when the earlier command completed before. A command that references
another waits until it is done.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REF_RE = re.compile(r"\$ref\[(\d+)\]((?:\[[^\[\]]*\])*)")


def ref(command_id: int, *path: str | int) -> str:
    """A reference to command ``command_id``'s result (``path`` walks into it)."""
    return f"$ref[{int(command_id)}]" + "".join(f"[{part}]" for part in path)


def references(value: Any) -> set[int]:
    """The command ids that ``ref`` placeholders anywhere in ``value`` point at."""
    if isinstance(value, str):
        return {int(m.group(1)) for m in REF_RE.finditer(value)} if "$ref[" in value else set()
    if isinstance(value, Mapping):
        return set().union(*(references(v) for v in value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(references(v) for v in value)) if value else set()
    return set()
