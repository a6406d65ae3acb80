"""Invariants of the layout: the app does not import the sandbox, and settings have one home."""

from __future__ import annotations

import ast
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT

# Reading the environment is app/config.py's job; everything else reads app.config.
ENV_READERS = {"environ", "getenv", "env_str", "env_int", "env_float", "env_bool"}
MAY_READ_ENVIRONMENT = {"app/config.py"}
# A WSGI environ (``request.environ``, a middleware's ``environ`` argument) is the request,
# not the process's environment: ``environ`` counts only as ``os.environ`` or imported
# from os.
WSGI_NAMES = {"environ"}


def _modules(*packages: str) -> Iterator[tuple[str, ast.Module]]:
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), str(path))


def _imported(tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def _environment_reads(tree: ast.Module) -> Iterator[int]:
    """Lines that touch os.environ/os.getenv or call app.config's env_* readers."""
    from_os = {alias.asname or alias.name for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and node.module == "os"
               for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ENV_READERS:
            on_os = isinstance(node.value, ast.Name) and node.value.id == "os"
            if node.attr not in WSGI_NAMES or on_os:
                yield node.lineno
        elif isinstance(node, ast.Name) and node.id in ENV_READERS:
            if node.id not in WSGI_NAMES or node.id in from_os:
                yield node.lineno
        elif isinstance(node, ast.ImportFrom) and any(a.name in ENV_READERS for a in node.names):
            yield node.lineno


def test_nothing_under_app_imports_the_sandbox():
    found = [f"{path}: {name}" for path, tree in _modules("app") for name in _imported(tree)
             if name == "sandbox" or name.startswith("sandbox.")]
    assert found == [], "the app must run without the sandbox (move such code to sandbox/)"


@pytest.mark.parametrize("source, reads", [
    ("import os\nx = os.environ['A']", True),
    ("import os\nx = os.getenv('A')", True),
    ("from os import environ\nx = environ['A']", True),
    ("from app.config import env_int\nx = env_int('A', 1)", True),
    ("def app(environ, start_response):\n    return environ['PATH_INFO']", False),
    ("from flask import request\nx = request.environ.get('k')", False),
])
def test_the_environment_check_sees_the_process_environment_only(source, reads):
    assert bool(list(_environment_reads(ast.parse(source)))) is reads


def test_only_app_config_reads_the_environment():
    found = [f"{path}:{line}" for path, tree in _modules("app", "workers", "placements")
             if path not in MAY_READ_ENVIRONMENT for line in _environment_reads(tree)]
    assert found == [], "declare the setting in app/config.py and read current_app.config"


# The floors (issue 20; /work/shared/docs/architecture.md "Layout"): only the factory, workers/
# and placements/ import a use case; the services (dispatcher, ingress) import none; the floor
# (tenants) imports no service and no use case.
USE_CASES = ("app.installation",)
SERVICES = ("app.dispatcher", "app.ingress")
MAY_IMPORT_USE_CASES = ("app/__init__.py", "workers/", "placements/")
# Still in the floor until the outbox executor of the setup moves to app/installation (issue 20).
NOT_YET_MOVED = {"app/tenants/upkeep.py"}


def _under(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _arrows(*packages: str) -> Iterator[tuple[str, str]]:
    """``(path, imported module)`` for every import in the packages, NOT_YET_MOVED left out."""
    for path, tree in _modules(*packages):
        if path not in NOT_YET_MOVED:
            yield from ((path, name) for name in _imported(tree))


def _own_use_case(path: str) -> str:
    """The use case whose package holds ``path`` ("" when none): it may import itself."""
    return next((u for u in USE_CASES if path.startswith(u.replace(".", "/") + "/")), "")


def test_only_the_factory_workers_and_placements_import_a_use_case():
    arrows = list(_arrows("app", "workers", "placements"))
    assert ("app/__init__.py", "app.installation.events") in arrows, "the scan is blind"
    found = [f"{path}: {name}" for path, name in arrows
             if _under(name, USE_CASES) and not path.startswith(MAY_IMPORT_USE_CASES)
             and not _under(name, (_own_use_case(path),))]
    assert found == [], "a use case is wired by the factory, workers/ or placements/ only"


def test_the_floor_imports_no_service_and_no_use_case():
    arrows = list(_arrows("app/tenants"))
    assert ("app/tenants/tokens.py", "app.tenants.models") in arrows, "the scan is blind"
    found = [f"{path}: {name}" for path, name in arrows if _under(name, SERVICES + USE_CASES)]
    assert found == [], "app/tenants is the floor: move the code up, or invert the arrow"
