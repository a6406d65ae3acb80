"""Handler registry: adding an event type is one decorated function, or one table.

    @on("ONEXTERNALCALLSTART")
    def click_to_call(portal, event): ...

Areas that must not import ingress (tenants) expose a plain ``{event: handler}``
mapping instead, which the app factory hands to :func:`register` at bootstrap.

``source`` is ``"b24"`` for Bitrix24 events and ``"pbx"`` for PBX call events.
A handler receives the Portal and the stored event payload (a dict) and must be
idempotent: the same inbox row may be processed more than once after a crash.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from app.registry import DuplicateHandler, Registry

__all__ = ["DuplicateHandler", "Handler", "handler_for", "on", "register", "registered"]

Handler = Callable[[Any, dict[str, Any]], Any]

_handlers: Registry[tuple[str, str], Handler] = Registry()


def on(event_type: str, source: str = "b24") -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of ``event_type`` from ``source``."""
    key = (source, event_type.upper())
    return lambda fn: _handlers.add(key, fn)


def register(handlers: Mapping[str, Handler], source: str = "b24") -> None:
    """Register a table of event type -> handler (the same rules as :func:`on`)."""
    for event_type, fn in handlers.items():
        on(event_type, source)(fn)


def handler_for(source: str, event_type: str) -> Handler | None:
    """The handler for an event, or None when the app does not handle it."""
    return _handlers.get((source, event_type.upper()))


def registered(source: str | None = None) -> list[str]:
    """Event types with a handler, optionally for one source."""
    return sorted(ev for (src, ev) in _handlers if source is None or src == source)
