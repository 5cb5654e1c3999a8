"""A registry: named entries in registration order — the order a command's option lists them in —
looked up with that option's error for a name not among them (the modes of `solve --mode`, the
formats of `export --format`)."""

from __future__ import annotations

from typing import Generic, TypeVar

from .errors import not_one_of

Entry = TypeVar("Entry")


class Registry(dict, Generic[Entry]):
    def __init__(self, option: str):
        super().__init__()
        self.option = option

    def add(self, entry: Entry) -> Entry:
        """Register `entry` under its `name`."""
        self[entry.name] = entry
        return entry

    def named(self, name: str) -> Entry:
        """The entry `name`, or the error `OPTION NAME is not one of …` (with the nearest name, when one is near)."""
        if name not in self:
            raise not_one_of(self.option, name, self)
        return self[name]
