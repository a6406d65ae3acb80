"""One name, one function: the registry shape the ingress (event handlers) and the
dispatcher (outcome handlers) both use. Registering the same function twice is harmless
(a module imported again); a second function for a name is refused."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
F = TypeVar("F", bound=Callable[..., object])


class DuplicateHandler(RuntimeError):
    """Two functions claim the same name; the second registration is refused."""


class Registry(Generic[K, F]):
    """name -> function, refusing a second function for a name."""

    def __init__(self) -> None:
        self._functions: dict[K, F] = {}

    def add(self, name: K, fn: F) -> F:
        """Register ``fn`` under ``name`` (the same function again is a no-op)."""
        existing = self._functions.get(name)
        if existing is not None and existing is not fn:
            raise DuplicateHandler(
                f"{name!r} already handled by {getattr(existing, '__qualname__', existing)}")
        self._functions[name] = fn
        return fn

    def drop(self, name: K) -> None:
        """Forget ``name``'s function (a test standing in for a handler the factory set)."""
        self._functions.pop(name, None)

    def get(self, name: K) -> F | None:
        """The function registered under ``name``, or None."""
        return self._functions.get(name)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._functions))
