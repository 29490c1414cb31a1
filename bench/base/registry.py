"""A small generic registry: a decorator registers a class under a name; duplicates are an error and unknown
names get a "did you mean" suggestion (the lm-evaluation-harness pattern, minus the nested dicts)."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

from bench.base.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (usually classes). ``kind`` names the things in error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._items[name]!r})")
            self._items[name] = obj
            return obj

        return deco

    def unregister(self, name: str) -> T:
        """Remove a registration (for plugins defined in tests or notebooks); returns what was registered."""
        return self._items.pop(name)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UserError(unknown_name_message(self.kind, name, self.names()))
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(self.names())


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"Unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(known)}. (`python -m bench ls` lists them.)"
