"""A registry of strategy objects by name (mask kinds, task methods), like timm's one registry."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named strategies of one kind; an unknown name is an error that lists the known ones."""

    def __init__(self, what: str, hint: str) -> None:
        self.what, self.hint = what, hint
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T, *, replace: bool = False) -> T:
        if name in self._items and not replace:
            raise ValueError(f"{self.what} {name!r} is already registered; pass replace=True")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown {self.what} {name!r}; known: {self.names()} ({self.hint})"
            ) from None

    def names(self) -> list[str]:
        return list(self._items)
