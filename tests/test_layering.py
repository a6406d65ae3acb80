"""Settings have one home: only app/config.py reads the process environment.

The import rules (floors, the one way out, the sandbox) are in tests/test_import_rules.py."""

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
