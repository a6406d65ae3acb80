"""Latency and delay distributions: how long a request or an event waits, in milliseconds.

A spec is one of

* ``0`` or any number: a fixed wait of that many ms;
* ``[lo, hi]``: uniform between lo and hi ms;
* ``"realistic"``: log-normal with a median of 250 ms, clipped to [50, 600] ms.

The realistic shape comes from the ``time`` blocks in the Bitrix24 REST docs' examples
(b24restdocs and its RU twin, 2024-2026): their ``duration`` runs from 0.04 s to 0.72 s with
the middle of them between 0.2 s and 0.5 s, and a few outliers near 2 s (issue #11: "roughly
50-600 ms per request"). A log-normal gives that long right tail; clipping keeps the run
predictable (p10 ≈ 100 ms, median 250 ms, mean ≈ 290 ms, 10 % at 600 ms).
"""

from __future__ import annotations

import math
import random
from typing import Any

REALISTIC = "realistic"
MEDIAN_MS, SIGMA, FLOOR_MS, CAP_MS = 250.0, 0.7, 50.0, 600.0


class SpecError(ValueError):
    """A latency or delay spec that is none of the accepted forms."""


def parse(spec: Any) -> Any:
    """The normalised spec (float, [lo, hi] or "realistic"), or SpecError."""
    if spec == REALISTIC:
        return REALISTIC
    if isinstance(spec, (list, tuple)) and len(spec) == 2:
        lo, hi = float(spec[0]), float(spec[1])
        if 0 <= lo <= hi:
            return [lo, hi]
    elif isinstance(spec, (int, float)) and not isinstance(spec, bool) and spec >= 0:
        return float(spec)
    elif isinstance(spec, str):
        return parse_text(spec)
    raise SpecError(f"latency must be ms >= 0, [lo, hi] or {REALISTIC!r}, got {spec!r}")


def parse_text(text: str) -> Any:
    """A spec from the command line: ``0``, ``100,300`` or ``realistic``."""
    text = text.strip()
    if text == REALISTIC:
        return REALISTIC
    try:
        return parse([float(p) for p in text.split(",")] if "," in text else float(text))
    except ValueError as exc:
        raise SpecError(f"latency must be ms, lo,hi or {REALISTIC!r}, got {text!r}") from exc


def draw_ms(spec: Any) -> float:
    """One wait in ms drawn from a normalised spec."""
    if spec == REALISTIC:
        return min(CAP_MS, max(FLOOR_MS, random.lognormvariate(math.log(MEDIAN_MS), SIGMA)))
    if isinstance(spec, list):
        return random.uniform(spec[0], spec[1]) if spec[1] > spec[0] else spec[0]
    return float(spec)


def draw(spec: Any) -> float:
    """One wait in seconds."""
    return draw_ms(spec) / 1000.0
