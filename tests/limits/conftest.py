"""Per-portal dispatcher limits and routing rules (issue 24 point 2): helpers shared by this
directory's tests. The page tests use the live app and the sandbox portal that opens the
settings page (fixtures of tests/install/conftest.py, as tests/placements_settings does)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.install.conftest import (  # noqa: F401 - fixtures used by this directory's tests
    LiveApp,
    installed,
    live_app,
    make_portal,
)


@pytest.fixture
def form_kind() -> str:
    """These pages read no iframe form field the two forms differ in: one form is enough."""
    return "full"


def overlap(entries: list[dict[str, Any]]) -> int:
    """The most batches the sandbox had in hand at once, from its request log: a batch is on
    its way from its first command's start to its last command's finish."""
    spans: dict[str, list[float]] = {}
    for entry in entries:
        span = spans.setdefault(entry["batch_id"], [entry["start"], entry["finish"]])
        span[0], span[1] = min(span[0], entry["start"]), max(span[1], entry["finish"])
    edges = sorted([(start, 1) for start, _ in spans.values()]
                   + [(finish, -1) for _, finish in spans.values()],
                   key=lambda edge: (edge[0], edge[1]))  # a finish before a start at a tie
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most
