"""Edits: pure functions ``(hidden) -> hidden`` on the vectors at one site.

An edit sees a tensor of shape ``(batch, seq, dim)`` and returns one of the same shape. Parameters may be
per-row: a vector of shape ``(batch, dim)`` or a scale of shape ``(batch,)`` gives each row of the batch its own
edit. Which positions an edit touches is not the edit's business: the runtime selects positions (``TokenScope``)
and keeps the original values elsewhere.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import torch

from ..errors import SteerscaleError


def _as_tensor(value, name: str, allow_rows: bool = True) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32) if not isinstance(value, torch.Tensor) else value.detach()
    if t.dim() == 0 or t.dim() > (2 if allow_rows else 1):
        raise SteerscaleError(f"{name} must be a vector (dim,) or per-row (batch, dim), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise SteerscaleError(f"{name} contains NaN or inf", "check how the vector was computed or loaded")
    return t


def check_scale(scale, name: str = "scale") -> torch.Tensor:
    """A finite float or a per-row ``(batch,)`` tensor of finite floats."""
    if isinstance(scale, (int, float)):
        if not math.isfinite(scale):
            raise SteerscaleError(f"{name} must be a finite number, got {scale!r}", "pass a finite float such as 4.0")
        return torch.tensor(float(scale))
    t = torch.as_tensor(scale, dtype=torch.float32)
    if t.dim() > 1 or not torch.isfinite(t).all():
        raise SteerscaleError(f"{name} must be a finite number or a 1-D per-row tensor, got {scale!r}")
    return t


def _check_rows(n: int, h: torch.Tensor) -> None:
    if n != h.shape[0]:
        raise SteerscaleError(
            f"per-row parameter has {n} rows but the batch has {h.shape[0]}",
            "give one row per sequence in the batch (after num_return_sequences expansion)",
        )


def _row_vector(v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(dim,) stays as is; (batch, dim) becomes (batch, 1, dim) to broadcast over positions."""
    if v.dim() == 1:
        return v
    _check_rows(v.shape[0], h)
    return v[:, None, :]


def _row_scale(s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """() stays as is; (batch,) becomes (batch, 1, 1)."""
    if s.dim() == 0:
        return s
    _check_rows(s.shape[0], h)
    return s[:, None, None]


class Edit(ABC):
    """An edit of the hidden vectors at one site. Subclasses implement ``__call__`` and ``dim``."""

    #: rescale each edited vector to its original norm (useful for strong additions on normalised streams)
    preserve_norm: bool = False

    @abstractmethod
    def __call__(self, h: torch.Tensor) -> torch.Tensor: ...

    @property
    def dim(self) -> int | None:
        """Size of the last dimension the edit expects, or None when any size works."""
        return None

    def _params(self, h: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
        # Cast once per (device, dtype); hooks run on every decode step.
        key = (h.device, h.dtype)
        cache = self.__dict__.setdefault("_cast", {})
        if key not in cache:
            cache[key] = [t.to(device=h.device, dtype=h.dtype) for t in tensors]
        return cache[key]


def _unit(v: torch.Tensor, zero_rows: bool = False) -> torch.Tensor:
    """``v`` scaled to unit norm; with ``zero_rows`` a per-row ``(batch, dim)`` direction may have all-zero rows,
    which stay zero (the rows a batched edit leaves alone: ``h + (t - h . 0) 0 == h``)."""
    norm = v.norm(dim=-1, keepdim=True)
    if (norm == 0).any() and not (zero_rows and v.dim() == 2 and (norm > 0).any()):
        raise SteerscaleError("direction has zero norm", "a direction to ablate or clamp must be non-zero")
    return v / norm.clamp_min(torch.finfo(v.dtype).tiny)


@dataclass(eq=False)
class Add(Edit):
    """``h + scale * vector``: activation addition (CAA, RepE control vectors, ITI shifts)."""

    vector: torch.Tensor
    scale: float | torch.Tensor = 1.0
    preserve_norm: bool = False

    def __post_init__(self):
        self.vector = _as_tensor(self.vector, "steering vector")
        self.scale = check_scale(self.scale)

    @property
    def dim(self) -> int:
        return self.vector.shape[-1]

    def __call__(self, h):
        v, s = self._params(h, self.vector, self.scale)
        return h + _row_scale(s, h) * _row_vector(v, h)


class ClampMode(str, Enum):
    SET = "set"
    MIN = "min"  # raise the projection to at least `value`
    MAX = "max"  # lower the projection to at most `value`


@dataclass(eq=False)
class SetProjection(Edit):
    """Set (or clamp) the component along a direction: ``h + (target - h . u) u``."""

    direction: torch.Tensor
    value: float | torch.Tensor = 0.0  # or per row, (batch,)
    mode: ClampMode = ClampMode.SET
    preserve_norm: bool = False
    zero_rows: bool = False  # per-row directions: all-zero rows leave their row unchanged (batched per-row edits)

    def __post_init__(self):
        self.direction = _unit(_as_tensor(self.direction, "direction"), self.zero_rows)
        value = check_scale(self.value, "projection value")
        self.value = float(value) if value.dim() == 0 else value
        self.mode = ClampMode(self.mode)

    @property
    def dim(self) -> int:
        return self.direction.shape[-1]

    def __call__(self, h):
        per_row = not isinstance(self.value, float)
        # one _params call: its cast cache is keyed by device and dtype, not by the tensors asked for
        u, *value = self._params(h, self.direction, *([self.value] if per_row else []))
        u = _row_vector(u, h)
        proj = (h * u).sum(-1, keepdim=True)
        value = _row_scale(value[0], h) if per_row else self.value
        if self.mode is ClampMode.SET:
            target = torch.zeros_like(proj) + value
        elif self.mode is ClampMode.MIN:
            target = torch.maximum(proj, torch.zeros_like(proj) + value)
        else:
            target = torch.minimum(proj, torch.zeros_like(proj) + value)
        return h + (target - proj) * u


class Ablate(SetProjection):
    """Project a direction out: ``h - (h . u) u`` (directional ablation, e.g. refusal removal)."""

    def __init__(self, direction: torch.Tensor, preserve_norm: bool = False):
        super().__init__(direction, 0.0, ClampMode.SET, preserve_norm)


@dataclass(eq=False)
class Affine(Edit):
    """``h @ matrix.T + bias`` (matrix defaults to identity). Parameters may require grad: learned methods train them."""

    matrix: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    preserve_norm: bool = False

    def __post_init__(self):
        if self.matrix is None and self.bias is None:
            raise SteerscaleError("Affine edit needs a matrix, a bias, or both")
        if self.matrix is not None and (self.matrix.dim() != 2 or self.matrix.shape[0] != self.matrix.shape[1]):
            raise SteerscaleError(f"Affine matrix must be square (dim, dim), got {tuple(self.matrix.shape)}")
        for name in ("matrix", "bias"):
            t = getattr(self, name)
            if t is not None and not torch.isfinite(t.detach()).all():
                raise SteerscaleError(f"Affine {name} contains NaN or inf")

    @property
    def dim(self) -> int:
        return (self.matrix if self.matrix is not None else self.bias).shape[-1]

    def __call__(self, h):
        # No cast cache: trainable parameters change between calls (and may live on another device, e.g. CPU).
        out = h if self.matrix is None else h @ self.matrix.to(device=h.device, dtype=h.dtype).T
        return out if self.bias is None else out + self.bias.to(device=h.device, dtype=h.dtype)


@dataclass(eq=False)
class Lambda(Edit):
    """Any callable ``(h) -> h`` of the same shape: the escape hatch for learned and conditional methods."""

    fn: Callable[[torch.Tensor], torch.Tensor] = field(default=None)
    expected_dim: int | None = None
    preserve_norm: bool = False

    def __post_init__(self):
        if not callable(self.fn):
            raise SteerscaleError(f"Lambda edit needs a callable, got {self.fn!r}")

    @property
    def dim(self) -> int | None:
        return self.expected_dim

    def __call__(self, h):
        out = self.fn(h)
        if not isinstance(out, torch.Tensor) or out.shape != h.shape:
            raise SteerscaleError(
                f"Lambda edit returned {getattr(out, 'shape', type(out))}, expected a tensor of shape {tuple(h.shape)}"
            )
        return out


def apply_edit(edit: Edit, h: torch.Tensor) -> torch.Tensor:
    """Run ``edit`` and, when asked, restore each vector's original norm."""
    out = edit(h)
    if edit.preserve_norm:
        out = out * (h.norm(dim=-1, keepdim=True) / out.norm(dim=-1, keepdim=True).clamp_min(1e-8))
    return out
