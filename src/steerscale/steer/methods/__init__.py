"""Extraction methods: one registry of every way ``steer.extract`` can make a vector, with what each needs.

Each entry is a ``steer.capabilities.Capability``: the method's fit function plus what it reads, which data it
takes, what it writes and its knobs. ``steer.extract`` and the ``extract`` command read those fields and name no
method, so adding a method is one module and one line here (docs/extending.md).

A direction-finding module (``reads=activations``) has ``fit(pos, neg, **knobs) -> (direction, info)`` where
``pos`` and ``neg`` are ``(n_pairs, dim)`` activations of the positive and negative texts at one site (row i of
each comes from pair i, or unpaired rows for labelled texts) and ``direction`` is a ``(dim,)`` tensor at the
method's natural strength, oriented so that adding it moves toward the positive side. Which sites, layers and
tokens are read is the job of ``steer.extract``. A method with ``reads=model`` fits by running the model (LoFiT
trains offsets, ``steer.lofit``; GrAInS attributes with gradients, ``steer.grains``) and returns the
``SteeringVector`` itself.
"""

from __future__ import annotations

from ...models.sites import SiteKind
from ...registry import Registry
from .. import grains, lofit
from ..capabilities import Capability, Data, Reads
from ..vector import SteeringVector
from . import caa, iti, pca_center, pca_diff, probe

PAIRS, LABELLED = Data.PAIRS, Data.LABELLED


def _direction(fit, data=(PAIRS, LABELLED), **extra) -> Capability:
    """An entry for a method that fits a direction on collected activations."""
    return Capability(fit, Reads.ACTIVATIONS, data, SteeringVector, **extra)


METHODS: Registry[Capability] = Registry("steering method")
METHODS.add("caa", _direction(caa.fit), "mean difference of positive and negative activations (CAA)",
            aliases=("mean_diff",))
METHODS.add("pca_diff", _direction(pca_diff.fit, (PAIRS,)),
            "first principal component of the paired differences (RepE, repeng)", aliases=("pca", "repe"))
METHODS.add("pca_center", _direction(pca_center.fit, (PAIRS,)),
            "first principal component of activations centred on each pair (RepE)")
METHODS.add("probe", _direction(probe.fit), "normal of a logistic-regression probe, with its held-out accuracy")
METHODS.add("iti", _direction(iti.fit, sites=SiteKind.HEAD_OUT),
            "per attention head: mass-mean shift at the heads a probe sweep ranks best (ITI)")
METHODS.add("lofit", Capability(lofit.fit_lofit, Reads.MODEL, (PAIRS,), SteeringVector, knobs=lofit.LofitConfig,
                                settings=("heads", "seed"), sites=SiteKind.HEAD_OUT),
            "learned per-head offsets (LoFiT); trains for minutes")
METHODS.add("grains", Capability(grains.fit_grains, Reads.MODEL, (PAIRS,), SteeringVector, knobs=grains.GrainsConfig,
                                 settings=("seed", "holdout"), preserve_norm=True),
            "directions from gradient-attributed prompt tokens, norm-preserving (GrAInS)")
ALIASES: dict[str, str] = METHODS.aliases
DEFAULT_METHOD = "caa"  # what extract and the extract command use when no method is named


def get_method(name: str) -> Capability:
    """The entry of method ``name`` (or an alias); an unknown name lists the methods and the closest one."""
    return METHODS[name]
