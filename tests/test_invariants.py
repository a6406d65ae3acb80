"""Cross-cutting invariants: bound events have a home, tenant tables carry portal_id,
actors enqueued by name exist.

What the worker side registers (handlers, actors) is read from a real
``import workers`` in a subprocess built from the test config, exactly as
``dramatiq workers`` would see it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.extensions import db
from app.installation.plan import EVENTS
from tests.conftest import ROOT, child_env

# Events bound at install but not handled yet: their rows are parked as ``unhandled``
# and the sweeper hands them out as soon as a handler is registered, so none is lost.
# Empty now: ONEXTERNALCALLSTART (app/telephony/click.py) and ONEXTERNALCALLBACKSTART
# (app/telephony/callback.py) have their handlers.
PARKED_UNTIL_TELEPHONY_CONNECTOR: frozenset[str] = frozenset()

# Tables that legitimately have no portal_id column, each with the reason.
NOT_TENANT_TABLES: dict[str, str] = {
    "portals": "the tenant table itself",
}

_PROBE = """
import json
import dramatiq
import workers
from app.ingress import registry
print(json.dumps({
    "actors": sorted(dramatiq.get_broker().get_declared_actors()),
    "handlers": {src: registry.registered(src) for src in ("b24", "pbx")},
}))
"""


@pytest.fixture(scope="module")
def worker_side(base_config: dict[str, Any], _schema: None) -> dict[str, Any]:
    """Actors and handlers registered by importing ``workers`` (in a fresh process)."""
    env = child_env(base_config, B24RELAY_NO_PERIODIC="1")
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_bound_event_has_a_handler_or_is_knowingly_parked(worker_side):
    handled = set(worker_side["handlers"]["b24"])
    homeless = sorted(e for e in EVENTS if e.upper() not in handled
                      and e.upper() not in PARKED_UNTIL_TELEPHONY_CONNECTOR)
    assert homeless == [], f"bound at install but neither handled nor knowingly parked: {homeless}"


def test_the_parked_list_names_only_bound_events_without_a_handler(worker_side):
    handled = set(worker_side["handlers"]["b24"])
    assert PARKED_UNTIL_TELEPHONY_CONNECTOR <= {e.upper() for e in EVENTS}
    assert sorted(PARKED_UNTIL_TELEPHONY_CONNECTOR & handled) == [], \
        "these have a handler now: take them off PARKED_UNTIL_TELEPHONY_CONNECTOR"


def test_every_tenant_table_has_a_portal_id(app):
    tables = {t.name: t for t in db.metadata.sorted_tables}
    assert "portals" in tables and len(tables) > 1
    missing = sorted(name for name, table in tables.items()
                     if "portal_id" not in table.c and name not in NOT_TENANT_TABLES)
    assert missing == [], f"no portal_id (add it, or allow-list with a reason): {missing}"
    assert set(NOT_TENANT_TABLES) <= set(tables), "the allow-list names a table that is gone"


def _module_strings(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "text"`` constants."""
    out: dict[str, str] = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node.value.value
    return out


def _actor_names_enqueued_by_name(source: str) -> set[str]:
    """Actor names in ``*.enqueue("name", ...)`` and ``Message(actor_name="name")`` calls."""
    tree = ast.parse(source)
    consts = _module_strings(tree)

    def resolve(node: ast.expr) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            return consts.get(node.id)
        return None

    names: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        candidates: list[ast.expr] = []
        if called == "enqueue" and node.args:
            candidates.append(node.args[0])
        candidates += [kw.value for kw in node.keywords if kw.arg == "actor_name"]
        names |= {name for name in map(resolve, candidates) if name}
    return names


def test_every_actor_enqueued_by_name_exists(worker_side):
    enqueued: dict[str, list[str]] = {}
    for path in sorted((ROOT / "app").rglob("*.py")):
        for name in _actor_names_enqueued_by_name(path.read_text()):
            enqueued.setdefault(name, []).append(str(Path(path).relative_to(ROOT)))
    assert "process_inbox_event" in enqueued, "the scan found nothing: is it still looking?"
    unknown = {name: where for name, where in enqueued.items()
               if name not in worker_side["actors"]}
    assert unknown == {}, f"enqueued by name but no such actor after `import workers`: {unknown}"


def _imported_modules(path: Path) -> set[str]:
    """Every module a source file imports (``from a.b import c`` gives a.b and a.b.c)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_tenants_do_not_import_the_ingress_handler_registry():
    """Tenants expose a plain handler table; the app factory registers it at bootstrap."""
    sources = sorted((ROOT / "app" / "tenants").rglob("*.py"))
    assert sources, "the scan found nothing: is it still looking?"
    offenders = sorted(str(path.relative_to(ROOT)) for path in sources
                       if "app.ingress.registry" in _imported_modules(path))
    assert offenders == [], f"import app.ingress.registry (expose a HANDLERS table): {offenders}"


def test_the_tenants_handler_table_is_what_the_workers_register(worker_side):
    from app.installation.events import HANDLERS

    assert set(HANDLERS) <= set(worker_side["handlers"]["b24"])
