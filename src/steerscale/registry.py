"""One registry shape for everything looked up by name: strategies, verifiers, extraction methods, tasks and CLI
commands.

A ``Registry`` maps a name to an entry (a function, a class, a module, a factory) and keeps a one-line
description of each for ``--help`` and listings. An unknown name is a ``SteerscaleError`` that lists the valid
names and suggests the closest one ("did you mean"). Aliases resolve to their entry but are not listed as entries
of their own. A registry is a read-only ``Mapping`` (``name in reg``, ``reg[name]``, ``sorted(reg)``), so code that
only reads it needs nothing else; entries are added with ``add`` or the ``register`` decorator.

This module is at the bottom of the package (it imports only ``errors``), so every layer may use it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Callable, Generic, Iterator, TypeVar

from .errors import SteerscaleError

T = TypeVar("T")


class Registry(Mapping, Generic[T]):
    """``name -> entry`` with descriptions, aliases and a helpful error for unknown names.

    ``kind`` names what is registered, for messages ("unknown strategy 'bets_of_n'; did you mean 'best_of_n'?").
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._descriptions: dict[str, str] = {}
        self._aliases: dict[str, str] = {}

    # -- filling --------------------------------------------------------------------------------------------
    def add(self, name: str, entry: T, description: str = "", aliases: tuple[str, ...] = ()) -> T:
        if not isinstance(name, str) or not name:
            raise SteerscaleError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self._entries or name in self._aliases:
            raise SteerscaleError(f"{self.kind} {name!r} is registered twice", "give each entry its own name")
        self._entries[name] = entry
        self._descriptions[name] = description or _first_line(entry)
        for alias in aliases:
            if alias in self._entries or alias in self._aliases:
                raise SteerscaleError(f"{self.kind} alias {alias!r} is registered twice")
            self._aliases[alias] = name
        return entry

    def register(self, name: str, description: str = "", aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator form of ``add``."""

        def deco(entry: T) -> T:
            return self.add(name, entry, description, aliases)

        return deco

    # -- reading --------------------------------------------------------------------------------------------
    def canonical(self, name: str) -> str:
        """The registered name for ``name`` (an alias resolves to its entry's name); unknown: SteerscaleError."""
        if isinstance(name, str):
            if name in self._entries:
                return name
            if name in self._aliases:
                return self._aliases[name]
        raise self.unknown(name)

    def get(self, name: str, default=None):
        """The entry for ``name`` (an alias resolves), or ``default`` when there is none; ``reg[name]`` raises the
        helpful error instead."""
        return self._entries[self.canonical(name)] if name in self else default

    def unknown(self, name) -> SteerscaleError:
        """The error for an unknown ``name``: the valid names, and the closest one when there is one."""
        names = list(self._entries) + list(self._aliases)
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6) if isinstance(name, str) else []
        guess = f"; did you mean {close[0]!r}?" if close else ""
        return SteerscaleError(f"unknown {self.kind} {name!r}{guess}", f"choose one of: {', '.join(self._entries)}")

    def description(self, name: str) -> str:
        return self._descriptions[self.canonical(name)]

    def describe(self) -> list[tuple[str, str]]:
        """``(name, one-line description)`` of every entry, in registration order."""
        return list(self._descriptions.items())

    def help_text(self, width: int = 18) -> str:
        """A listing for an argparse epilog: one ``name  description`` line per entry."""
        return "\n".join(f"  {n:<{width}} {d}" for n, d in self.describe())

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    # -- Mapping --------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> T:
        return self._entries[self.canonical(name)]

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and (name in self._entries or name in self._aliases)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


def _first_line(entry) -> str:
    doc = getattr(entry, "__doc__", None) or ""
    line = doc.strip().splitlines()[0].strip() if doc.strip() else ""
    return line.rstrip(".") if len(line) <= 100 else line[:97] + "..."
