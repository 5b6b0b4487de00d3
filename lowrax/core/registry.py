"""A registry of named things (adapter methods, objectives, tasks): registered once, looked up
by name, an unknown name answered with the known ones and the closest match."""

from __future__ import annotations

import difflib
import importlib
from typing import Generic, TypeVar

from lowrax.errors import LowraxError

T = TypeVar("T")


class Registry(Generic[T]):
    """`unknown` is the error for a name not registered, formatted with {name!r} and {names}.
    `builtins`, a module that registers the built-in entries, is imported at the first lookup, so a
    lookup never misses one because nothing happened to import it yet."""

    def __init__(self, kind: str, unknown: str, builtins: str | None = None):
        self.kind, self.unknown, self._builtins = kind, unknown, builtins
        self._registered: dict[str, T] = {}

    @property
    def _items(self) -> dict[str, T]:
        if self._builtins is not None:
            builtins, self._builtins = self._builtins, None
            importlib.import_module(builtins)
        return self._registered

    def register(self, name: str, item: T) -> T:
        if name in self._registered:
            raise LowraxError(f"{self.kind} {name!r} is registered twice")
        self._registered[name] = item
        return item

    def names(self) -> list[str]:
        return list(self._items)

    def values(self) -> list[T]:
        return list(self._items.values())

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __getitem__(self, name: str) -> T:
        if not isinstance(name, str) or name not in self._items:
            close = difflib.get_close_matches(str(name), list(self._items), n=1)
            raise LowraxError(self.unknown.format(name=name, names=", ".join(self._items))
                              + (f"; did you mean {close[0]!r}?" if close else ""))
        return self._items[name]
