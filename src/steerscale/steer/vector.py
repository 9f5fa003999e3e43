"""``SteeringVector``: the portable artifact every steering method produces.

A vector is a set of per-site directions plus the facts needed to use it safely elsewhere: which model (name
and a fingerprint of its shape), which method and hyperparameters, the data hash, probe accuracies, library
version. Directions are stored at their natural strength (CAA: the mean difference; ITI: alpha*std along the
probe direction), so ``scale=1`` means "the method's own strength" and scale sweeps are comparable.

Files are safetensors with the metadata as JSON in the header: no pickle anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine.ops import Add, SetProjection, check_scale
from ..engine.runtime import Intervention
from ..engine.scope import ALL_TOKENS, TokenScope
from ..errors import SteerscaleError
from ..models.layout import ModelLayout
from ..models.sites import Site, SiteKind
from ..version import __version__
from . import artifacts
from .artifacts import fingerprint, json_default  # noqa: F401 (re-exported: vectors' public API)

FORMAT = "steerscale.vector/1"
_READERS: dict[str, Callable[[Path], SteeringVector]] = {}  # file suffix -> reader, see register_reader


@dataclass
class SteeringVector:
    directions: dict[Site, torch.Tensor]
    model_name: str = ""
    model_fingerprint: str = ""
    method: str = "custom"
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.directions:
            raise SteerscaleError("a steering vector needs at least one site")
        clean = {}
        for site, vec in self.directions.items():
            site = site if isinstance(site, Site) else Site.parse(site)
            vec = torch.as_tensor(vec, dtype=torch.float32).detach().cpu()
            if vec.dim() != 1:
                raise SteerscaleError(f"direction at {site.key()} must be 1-D, got shape {tuple(vec.shape)}")
            if not torch.isfinite(vec).all():
                raise SteerscaleError(f"direction at {site.key()} contains NaN or inf")
            clean[site] = vec
        self.directions = dict(sorted(clean.items()))
        self.metadata.setdefault("library_version", __version__)

    # -- views ---------------------------------------------------------------------------------------------
    @property
    def sites(self) -> list[Site]:
        return list(self.directions)

    @property
    def layers(self) -> list[int]:
        return sorted({s.layer for s in self.directions})

    @property
    def is_residual(self) -> bool:
        return all(s.kind is SiteKind.RESID_POST for s in self.directions)

    @property
    def preserve_norm(self) -> bool:
        """Whether the edit rescales each steered activation back to its original norm (``metadata["preserve_norm"]``,
        set by GrAInS): ``interventions`` honours it, and the places that cannot (a GGUF control vector, a bias baked
        into a checkpoint, the vLLM worker) refuse such a vector instead of steering differently."""
        return bool(self.metadata.get("preserve_norm", False))

    def norms(self) -> dict[str, float]:
        return {s.key(): float(v.norm()) for s, v in self.directions.items()}

    def __repr__(self) -> str:
        sites = ", ".join(s.key() for s in list(self.directions)[:4]) + (" ..." if len(self.directions) > 4 else "")
        return f"SteeringVector(method={self.method!r}, model={self.model_name!r}, sites=[{sites}])"

    # -- use -----------------------------------------------------------------------------------------------
    def check(self, layout: ModelLayout) -> None:
        """Refuse a vector made for another model or of the wrong size at a site (the artifact interface's check;
        ``check_compatible`` is its first name)."""
        self.check_compatible(layout)

    def check_compatible(self, layout: ModelLayout) -> None:
        artifacts.check_model("vector", self.model_name, self.model_fingerprint, layout)
        for site, vec in self.directions.items():
            layout.locate(site)
            if vec.shape[0] != layout.site_dim(site):
                raise SteerscaleError(
                    f"direction at {site.key()} has size {vec.shape[0]}, but this model's site has size {layout.site_dim(site)}",
                    "the vector was made for another model; extract a new one",
                )

    def interventions(self, scale: float | tuple = 1.0, scope: TokenScope | str = ALL_TOKENS,
                      layout: ModelLayout | None = None) -> list[Intervention]:
        """Add ``scale * direction`` at each site (checked against ``layout`` when given), then rescale to the
        original norm when the vector says so (``preserve_norm``). ``scale`` may also be an op of the steering
        grammar (``steer.grammar``): ``("set", value)`` sets the component along each direction to ``value``
        (``SetProjection``; ablation is value 0)."""
        if layout is not None:
            self.check_compatible(layout)
        scope = TokenScope.parse(scope)
        if isinstance(scale, tuple):
            if len(scale) != 2 or scale[0] != "set":
                raise SteerscaleError(f"unknown steering op {scale!r}", 'use a scale, or ("set", value)')
            return [Intervention(site, SetProjection(vec, scale[1], preserve_norm=self.preserve_norm), scope)
                    for site, vec in self.directions.items()]
        check_scale(scale)
        return [Intervention(site, Add(vec, scale, preserve_norm=self.preserve_norm), scope)
                for site, vec in self.directions.items()]

    # -- arithmetic ----------------------------------------------------------------------------------------
    def _combine(self, other: "SteeringVector", sign: float) -> "SteeringVector":
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if self.model_fingerprint and other.model_fingerprint and self.model_fingerprint != other.model_fingerprint:
            raise SteerscaleError(
                f"cannot combine vectors of different models ({self.model_name!r} and {other.model_name!r})"
            )
        if self.preserve_norm != other.preserve_norm:
            raise SteerscaleError(
                "cannot add a norm-preserving vector (e.g. GrAInS) to one that is not: their sum has no single edit",
                "apply them as two separate steering entries (e.g. two --steer options) instead")
        dims = {s: v.shape[0] for s, v in self.directions.items()}
        out = dict(self.directions)
        for site, vec in other.directions.items():
            if site in dims and dims[site] != vec.shape[0]:
                raise SteerscaleError(f"cannot combine: sizes differ at {site.key()} ({dims[site]} vs {vec.shape[0]})")
            out[site] = out[site] + sign * vec if site in out else sign * vec
        method = f"({self.method} {'+' if sign > 0 else '-'} {other.method})"
        return SteeringVector(out, self.model_name or other.model_name, self.model_fingerprint or other.model_fingerprint,
                              method, {"combined_from": [self.metadata, other.metadata],
                                       **({"preserve_norm": True} if self.preserve_norm else {})})

    def __add__(self, other):
        return self._combine(other, 1.0)

    def __sub__(self, other):
        return self._combine(other, -1.0)

    def __mul__(self, factor):
        if not isinstance(factor, (int, float)) or not math.isfinite(factor):
            return NotImplemented if not isinstance(factor, (int, float)) else self._bad_factor(factor)
        return SteeringVector({s: v * factor for s, v in self.directions.items()}, self.model_name,
                              self.model_fingerprint, self.method, dict(self.metadata))

    __rmul__ = __mul__

    def __neg__(self):
        return self * -1.0

    def __truediv__(self, factor):
        if isinstance(factor, (int, float)) and factor == 0:
            raise SteerscaleError("cannot divide a steering vector by zero")
        return self * (1.0 / factor)

    @staticmethod
    def _bad_factor(factor):
        raise SteerscaleError(f"cannot scale a steering vector by {factor!r}", "use a finite number")

    # -- files ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        header = {"model_name": self.model_name, "model_fingerprint": self.model_fingerprint, "method": self.method,
                  "metadata": self.metadata}
        return artifacts.write(path, FORMAT, {site.key(): vec for site, vec in self.directions.items()}, header)

    @classmethod
    def load(cls, path: str | Path, layout: ModelLayout | None = None) -> "SteeringVector":
        """A vector file (steerscale's safetensors, or a registered reader's suffix such as ``.gguf``), checked
        against ``layout`` when given (the artifact interface, ``steer.artifacts.Artifact``)."""
        path = Path(path)
        if path.suffix in _READERS:
            vector = _READERS[path.suffix](path)
        else:
            tensors, header = artifacts.read(path, FORMAT, "steering vector")
            vector = cls({Site.parse(k): v for k, v in tensors.items()}, header.get("model_name", ""),
                         header.get("model_fingerprint", ""), header.get("method", "custom"),
                         header.get("metadata", {}))
        if layout is not None:
            vector.check(layout)
        return vector


def register_reader(suffix: str, read: Callable[[Path], SteeringVector]) -> None:
    """Let ``SteeringVector.load`` read files ending in ``suffix`` with ``read(path)``. Formats built on top of
    the vector register themselves (``steer.gguf``: ``.gguf``; the ``steer`` package imports it), so this module
    imports none of them."""
    _READERS[suffix] = read


def parse_steer_arg(text: str) -> tuple[str, float]:
    """``path[:scale]`` as used by ``--steer``; the scale defaults to 1."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(scale):
            raise SteerscaleError(f"--steer {text!r}: scale must be finite", "use e.g. vec.safetensors:4")
        return path, scale
    return text, 1.0


def load_steering(specs, layout: ModelLayout, scope: TokenScope | str = ALL_TOKENS) -> list[Intervention]:
    """Interventions for a list of ``path[:scale]`` specs (or ``(vector, scale)`` pairs), checked against ``layout``."""
    out: list[Intervention] = []
    for spec in specs:
        vector, scale = spec if isinstance(spec, tuple) else parse_steer_arg(spec)
        if not isinstance(vector, SteeringVector):
            vector = SteeringVector.load(vector)
        out.extend(vector.interventions(scale, scope, layout))
    return out
