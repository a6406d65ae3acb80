"""Layering of the web side: a blueprint's views are wired by the factory, never imported by
another blueprint; the framing helpers live once, in ``app/framing.py``.

Read from the source with ``ast`` (no import side effects): a module "defines a
blueprint" when it calls ``Blueprint(...)``.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("app", "placements")  # the web side (workers/system.py reads app.health's ping)
# The wiring: the factory registers every blueprint, placements.init_app its own ones.
WIRING = {"app": {"app.health", "app.ingress.views", "app.installation.views",
                  "app.telephony.views", "placements"},
          "placements": {"placements.settings.views", "placements.widgets.views",
                         "placements.dashboard.views"}}
FRAMING_HELPERS = {"framed_by", "frameable", "portal_origin_from_query", "known_portal_origin"}


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    """``dotted.name → (path, tree)`` for every module of the web side."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = (path, ast.parse(path.read_text(), str(path)))
    return out


def _imports(name: str, path: Path, tree: ast.Module) -> set[str]:
    """Every module ``name`` imports, with ``from a import b`` counted as ``a`` and ``a.b``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def _defines_blueprint(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called == "Blueprint":
                return True
    return False


def test_no_module_imports_another_blueprints_views():
    modules = _modules()
    blueprints = {name for name, (_, tree) in modules.items() if _defines_blueprint(tree)}
    assert {"app.installation.views", "placements.settings.views"} <= blueprints, \
        "the scan is blind"
    offences = []
    for name, (path, tree) in modules.items():
        allowed = WIRING.get(name, set()) | {name}
        for target in sorted((_imports(name, path, tree) & blueprints) - allowed):
            offences.append(f"{name} imports {target}")
    assert offences == [], ("a blueprint's views are wired by the factory only; shared code "
                            f"belongs in a module of its own (app/framing.py, ...): {offences}")


def test_the_framing_helpers_are_defined_once_in_app_framing():
    homes: dict[str, list[str]] = {}
    for name, (_, tree) in _modules().items():
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name in FRAMING_HELPERS:
                homes.setdefault(node.name, []).append(name)
    assert homes == {helper: ["app.framing"] for helper in FRAMING_HELPERS}
