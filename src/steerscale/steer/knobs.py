"""``Knobs``: how a method's settings dataclass (``LofitConfig``, ``GrainsConfig``, ``CasalConfig``) reads the
CLI's ``--train NAME=VALUE,...`` string and builds a config with overrides, with one set of error messages."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from enum import Enum
from typing import ClassVar

from ..errors import SteerscaleError


class Knobs:
    """Mixin for a dataclass of knobs; ``LABEL`` names the method in messages. Number fields are converted here;
    enum and text fields pass as text and are checked (with their choices listed) when the config is built."""

    LABEL: ClassVar[str] = "method"

    @classmethod
    def parse(cls, spec: str | dict | None) -> dict:
        """``"epochs=3,lr=0.01"`` (the CLI's ``--train``) as typed overrides of the config's fields."""
        if not spec:
            return {}
        if isinstance(spec, dict):
            return dict(spec)
        kinds = {f.name: type(f.default) for f in dataclasses.fields(cls)}
        out = {}
        for part in str(spec).split(","):
            key, eq, value = (x.strip() for x in part.partition("="))
            if not eq or key not in kinds:
                raise SteerscaleError(f"bad {cls.LABEL} setting {part!r}",
                                      f"use NAME=VALUE pairs with NAME one of: {', '.join(kinds)}")
            if issubclass(kinds[key], (Enum, str)):
                out[key] = value
                continue
            try:
                out[key] = kinds[key](value)
            except ValueError:
                raise SteerscaleError(f"{cls.LABEL} {key} must be a number, got {value!r}") from None
        return out

    @classmethod
    def build(cls, config=None, **knobs):
        """``config`` with ``knobs`` overriding its fields; an unknown knob is an error that lists the known ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(knobs) - set(names))
        if unknown:
            raise SteerscaleError(f"unknown {cls.LABEL} setting(s) {', '.join(unknown)}", f"known: {', '.join(names)}")
        return cls(**{**(asdict(config) if config else {}), **knobs})
