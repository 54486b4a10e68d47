"""One registry pattern for everything that extends dit_sparse: methods, model adapters, kernel backends.

A :class:`Registry` maps a name to a registered class or object. Register with the decorator
(``@METHODS.register`` on a class with a ``name``) or a call (``ADAPTERS.register(MyAdapter())``); look up with
:meth:`Registry.get`, which names the known entries on a miss. The CLI reads its choices from the registries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → entry, in registration order.

    Args:
        kind: what the entries are, for messages (``"sparse-attention method"``).
        key: how to read an entry's name (default: its ``name`` attribute).
        known: how a miss names the known entries (default ``kind`` + "s": "known sparse-attention methods: ...").
    """

    def __init__(self, kind: str, key: Callable[[T], str] = lambda entry: entry.name, known: str | None = None) -> None:
        self.kind = kind
        self._key = key
        self._known = known or f"{kind}s"
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        """Add ``entry`` under its name (usable as a class decorator); a second entry of the same name is an error."""
        name = self._key(entry)
        if not name:
            raise ValueError(f"a {self.kind} needs a non-empty name, got {entry!r}")
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"a {self.kind} named {name!r} is already registered ({self._entries[name]!r})")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """The entry named ``name``; a ValueError listing the known names otherwise."""
        entry = self._entries.get(name)
        if entry is None:
            raise ValueError(f"unknown {self.kind} {name!r}; known {self._known}: {', '.join(self.names())}")
        return entry

    def find(self, name: str) -> T | None:
        return self._entries.get(name)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


__all__ = ["Registry"]
