"""The import rules of ARCHITECTURE.md, read from the source (``ast``, no import side effects).

Packages sit on floors and import only downward (or sideways where a row says so). The
table below is the rule; each test reads it, so a new package is one row, and an arrow that
breaks a rule fails here whatever incident it would have caused.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCANNED = ("app", "workers", "placements")

# Components, most specific prefix first: a module belongs to the first one it starts with.
INFRA = ("app.config", "app.extensions", "app.queue", "app.crypto", "app.metrics",
         "app.embedded", "app.serving", "app.health", "app.redis_breaker", "app.logs",
         "app.registry", "app.i18n")
USE_CASES = ("app.installation", "app.telephony", "app.dashboard")
COMPONENTS: dict[str, tuple[str, ...]] = {
    "library": ("app.bitrix",),
    "infra": INFRA,
    "floor": ("app.tenants",),
    "web": ("app.framing",),
    "dispatcher": ("app.dispatcher",),
    "ingress": ("app.ingress",),
    **{name.removeprefix("app."): (name,) for name in USE_CASES},
    "top": ("app", "workers", "placements"),
    # Not part of the app: the app runs without them.
    "outside": ("sandbox", "tests", "bench"),
}
# Which components each may import (its own always). Use cases never import each other.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "library": frozenset(),
    "infra": frozenset({"infra"}),
    "floor": frozenset({"infra", "library"}),
    "web": frozenset({"infra", "floor"}),
    "dispatcher": frozenset({"infra", "library", "floor"}),
    "ingress": frozenset({"infra", "library", "floor", "dispatcher"}),
    **{name.removeprefix("app."): frozenset({"infra", "library", "floor", "web", "dispatcher",
                                             "ingress"}) for name in USE_CASES},
    "top": frozenset(COMPONENTS) - {"outside"},
    "outside": frozenset(COMPONENTS),
}
# Sending REST is the dispatcher's job: nobody else touches the REST clients.
REST_CLIENTS = {"app.bitrix.rest", "app.bitrix.aio", "app.bitrix.RestClient",
                "app.bitrix.AsyncRestClient"}
MAY_SEND_REST = ("app.bitrix", "app.dispatcher")
# The outbox's table is the dispatcher's; the factory registers the models, nobody else.
DISPATCHER_TABLES = {"app.dispatcher.models"}
MAY_READ_DISPATCHER_TABLES = ("app.dispatcher", "app")


@dataclass(frozen=True)
class Arrow:
    """One import: ``source`` (a module) imports ``target`` (a dotted name) at ``line``."""

    source: str
    target: str
    line: int


def component(module: str) -> str | None:
    """The component a dotted module name belongs to, or None outside the scanned packages."""
    best: tuple[int, str] | None = None
    for name, prefixes in COMPONENTS.items():
        for prefix in prefixes:
            if module == prefix or (prefix != "app" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), name)
    return best[1] if best else None


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``module`` is one of ``prefixes`` or inside one (``app`` means the factory)."""
    return any(module == p or (p != "app" and module.startswith(p + ".")) for p in prefixes)


def _modules() -> Iterator[tuple[str, Path]]:
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


def arrows_of(module: str, source: str, is_package: bool = False) -> Iterator[Arrow]:
    """Every import in ``source``; ``from a import b`` yields ``a`` and ``a.b``."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Arrow(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base not in SCANNED:  # ``from app import x`` names x, not the factory
                yield Arrow(module, base, node.lineno)
            for alias in node.names:
                yield Arrow(module, f"{base}.{alias.name}", node.lineno)


def _all_arrows() -> list[Arrow]:
    return [arrow for module, path in _modules()
            for arrow in arrows_of(module, path.read_text(), path.name == "__init__.py")]


def breaks(arrow: Arrow) -> str | None:
    """Why ``arrow`` breaks a rule, or None when it keeps them all."""
    source, target = component(arrow.source), component(arrow.target)
    if source is None or target is None or source == target:
        pass
    elif target not in MAY_IMPORT[source]:
        return f"{source} may not import {target}"
    if arrow.target in REST_CLIENTS and not _within(arrow.source, MAY_SEND_REST):
        return "only the dispatcher sends REST"
    if arrow.target in DISPATCHER_TABLES and not _within(arrow.source,
                                                         MAY_READ_DISPATCHER_TABLES):
        return "the outbox's table is the dispatcher's"
    return None


def test_every_scanned_module_has_a_component():
    homeless = [m for m, _ in _modules() if component(m) is None]
    assert homeless == [], "give each new package a row in COMPONENTS"


def test_every_import_keeps_the_rules():
    offences = [f"{a.source}:{a.line} imports {a.target}: {why}"
                for a in _all_arrows() if (why := breaks(a)) is not None]
    assert offences == [], "\n".join(offences)


@pytest.mark.parametrize("module, source, broken", [
    ("app.tenants.models", "from app.dispatcher import submit", "floor may not import"),
    ("app.tenants.tokens", "import app.ingress.inbox", "floor may not import"),
    ("app.dispatcher.engine", "from app.ingress import registry", "dispatcher may not"),
    ("app.dispatcher.engine", "from app.installation import setup", "dispatcher may not"),
    ("app.ingress.inbox", "from app.telephony.calls import Call", "ingress may not"),
    ("app.telephony.calls", "from app.installation import users", "telephony may not"),
    ("app.bitrix.rest", "from app.extensions import db", "library may not"),
    ("app.extensions", "from app.tenants.models import Portal", "infra may not"),
    ("app.installation.install", "from app.bitrix import RestClient", "only the dispatcher"),
    ("app.telephony.calls", "from app.bitrix.aio import AsyncRestClient", "only the dispatch"),
    ("placements.settings.views", "from app.bitrix.rest import RestClient", "only the dispat"),
    ("app.installation.setup", "from app.dispatcher.models import OutboxCommand", "outbox's"),
    ("app.ingress.processing", "from app.dispatcher import models", "outbox's table"),
    ("app.installation.setup", "from . import plan", None),
    ("app.ingress.views", "from sandbox import state", "ingress may not import outside"),
    ("workers.system", "import tests.conftest", "top may not import outside"),
    ("app.telephony.calls", "from app.dispatcher import submit", None),
    ("app.telephony.calls", "from app.ingress.registry import on", None),
    ("app.dispatcher.direct", "from app.bitrix import RestClient", None),
    ("app", "from app.dispatcher import models", None),
    ("workers.outcomes", "from app.installation import upkeep", None),
    ("placements.settings.views", "from app.installation import sessions", None),
])
def test_the_rule_check_catches_what_it_should(module, source, broken):
    found = [why for a in arrows_of(module, source) if (why := breaks(a))]
    if broken is None:
        assert found == []
    else:
        assert found and all(broken in why for why in found[:1]), found
