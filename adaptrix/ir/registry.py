"""Read-only tables of named things (targets, passes, adapter formats, binders)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TypeVar

__all__ = ["registry"]

T = TypeVar("T")


def registry(kind: str, entries: Iterable[tuple[str, T]]) -> Mapping[str, T]:
    """A read-only table of `entries` by name; a name registered twice is an error."""
    table: dict[str, T] = {}
    for name, entry in entries:
        if name in table:
            raise ValueError(f"{kind} {name!r} is registered twice")
        table[name] = entry
    return MappingProxyType(table)
