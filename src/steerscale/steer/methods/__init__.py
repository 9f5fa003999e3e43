"""Extraction methods: one registry of every way ``steer.extract`` can make a vector, with a line on each.

A direction-finding module defines ``NAME`` and ``fit(pos, neg, **knobs) -> (direction, info)`` where ``pos`` and
``neg`` are ``(n_pairs, dim)`` activations of the positive and negative texts at one site (row i of each comes from
pair i) and ``direction`` is a ``(dim,)`` tensor at the method's natural strength, oriented so that adding it moves
toward the positive side; ``PAIRED_ONLY`` says whether it needs pairs (not labelled texts) and ``PER_HEAD`` (ITI)
that it is fitted per attention head. Which sites, layers and tokens are read is the job of ``steer.extract``.
LoFiT's entry is ``steer.lofit``, which learns its offsets by training on the model (``fit_lofit``) instead;
GrAInS's is ``steer.grains``, which needs the model's gradients (``fit_grains``).
"""

from __future__ import annotations

from types import ModuleType

from ...registry import Registry
from .. import grains, lofit
from . import caa, iti, pca_center, pca_diff, probe

METHODS: Registry[ModuleType] = Registry("steering method")
METHODS.add(caa.NAME, caa, "mean difference of positive and negative activations (CAA)", aliases=("mean_diff",))
METHODS.add(pca_diff.NAME, pca_diff, "first principal component of the paired differences (RepE, repeng)",
            aliases=("pca", "repe"))
METHODS.add(pca_center.NAME, pca_center, "first principal component of activations centred on each pair (RepE)")
METHODS.add(probe.NAME, probe, "normal of a logistic-regression probe, with its held-out accuracy")
METHODS.add(iti.NAME, iti, "per attention head: mass-mean shift at the heads a probe sweep ranks best (ITI)")
METHODS.add(lofit.NAME, lofit, "learned per-head offsets (LoFiT); trains for minutes")
METHODS.add(grains.NAME, grains, "directions from gradient-attributed prompt tokens, norm-preserving (GrAInS)")
ALIASES: dict[str, str] = METHODS.aliases


def get_method(name: str) -> ModuleType:
    """The module of method ``name`` (or an alias); an unknown name lists the methods and the closest one."""
    return METHODS[name]
