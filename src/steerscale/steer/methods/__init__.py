"""Extraction methods: a registry of pure functions from activations to a direction.

A method module defines ``NAME`` and ``fit(pos, neg, **knobs) -> (direction, info)`` where ``pos`` and ``neg`` are
``(n_pairs, dim)`` activations of the positive and negative texts at one site (row i of each comes from pair i)
and ``direction`` is a ``(dim,)`` tensor at the method's natural strength, oriented so that adding it moves
toward the positive side. Which sites, layers and tokens are read is the job of ``steer.extract``.
"""

from __future__ import annotations

from types import ModuleType

from ...errors import SteerscaleError
from . import caa, pca_center, pca_diff, probe

METHODS: dict[str, ModuleType] = {m.NAME: m for m in (caa, pca_diff, pca_center, probe)}
ALIASES = {"pca": "pca_diff", "mean_diff": "caa", "repe": "pca_diff"}


def get_method(name: str) -> ModuleType:
    name = ALIASES.get(name, name)
    if name not in METHODS:
        raise SteerscaleError(f"unknown steering method {name!r}", f"choose one of: {', '.join(sorted(METHODS) + ['iti', 'lofit'])}")
    return METHODS[name]
