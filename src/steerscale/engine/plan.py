"""The steering plan: the compiled form of "what each token of a batch gets", shared by the server's engine loop
(``serve.scheduler``) and the vLLM worker (``vllm.worker``).

A batch holds rows of several requests, each with its own steering entries ``(vector, op, scope)`` (``op``: a scale,
or ``("set", value)``; ablation is the value 0). The plan keeps, per site and in each request's entry order, *edit
slots*: a table with row 0 all zeros (no edit) and three rows per steered request, one per token class (its early
prompt tokens, its last prompt token, its generated tokens), and one index tensor that gives each token of the
forward pass its row. A scope is which classes a request's rows cover (``prompt``: the first two; ``generated``:
the last two, since the last prompt token's output is the first generated token). So a prefill chunk, a decoding
step or a mix of both is ``table[index]`` per slot, whatever the requests: LoRA's design in vLLM (per-slot tables,
a per-token index), which keeps working inside compiled graphs. Tables are rebuilt when the batch's composition
changes; the index every forward pass.

Slot kinds: ``add`` (``h + row``), ``set`` (``h + (target - s . u) u``, ``s`` the residual stream, ``u`` the unit
direction in the row), ``addn``/``setn``, the same for norm-preserving vectors (GrAInS): the stream is rescaled to
its norm before, on the rows the slot edits (``engine.ops.apply_edit``'s rule), and ``clamp`` (a ``FeatureClamp``,
such as an SAE feature: ``h + (target - act(s . e + b)) d``, tokens whose stream norm passes the feature's cap left
alone). A slot's table is a few named parts (``rows``, and ``targets``, ``enc``, ``consts`` for the kinds that read
the stream), each indexed by the same per-token index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from ..errors import SteerscaleError
from ..models.sites import Site
from .ops import Edit
from .runtime import Intervention
from .scope import ALL_TOKENS, TokenScope

CLASSES = 3  # token classes per request: early prompt tokens, the last prompt token, generated tokens
APPLIES = {"all": (True, True, True), "prompt": (True, True, False), "generated": (False, True, True)}


@dataclass(eq=False)
class FeatureClamp:
    """A feature whose activation a request sets (an SAE feature: ``steer.sae.edits.ClampableSAE.clamp``). At
    ``site`` its activation is ``s . encoder + bias`` where that passes ``threshold`` (ReLU: 0; JumpReLU: its
    threshold), else 0; clamping it to a value adds ``(value - activation) x decoder``, which keeps everything else
    the SAE does not explain. Tokens whose stream norm passes ``norm_cap`` (attention sinks, which SAEs are not
    trained on) are left alone."""

    site: Site
    encoder: torch.Tensor
    bias: float
    threshold: float
    decoder: torch.Tensor
    norm_cap: float
    name: str = ""
    preserve_norm = False

    @property
    def directions(self) -> dict[Site, torch.Tensor]:
        return {self.site: self.decoder}

    def check_compatible(self, layout) -> None:
        if layout.site_dim(self.site) != self.decoder.shape[-1]:
            raise SteerscaleError(f"feature clamp {self.name!r} is {self.decoder.shape[-1]} wide but this model's "
                                  f"{self.site.key()} is {layout.site_dim(self.site)} wide",
                                  "use an SAE trained on this model")

    def interventions(self, op: tuple, scope: TokenScope | str = ALL_TOKENS, layout=None) -> list[Intervention]:
        """The clamp as the hook runtime runs it (``generate``, ``LocalBackend``): ``op`` is ``("clamp", value)``."""
        if not (isinstance(op, tuple) and len(op) == 2 and op[0] == "clamp"):
            raise SteerscaleError(f"a feature clamp takes the op ('clamp', value), not {op!r}")
        if layout is not None:
            self.check_compatible(layout)
        return [Intervention(self.site, _ClampEdit(self, float(op[1])), TokenScope.parse(scope))]


def clamp_coefficient(stream: torch.Tensor, enc: torch.Tensor, bias, threshold, target, cap) -> torch.Tensor:
    """How much of the decoder row a feature clamp adds at each token: ``target - act(stream . enc + bias)``, 0 at
    tokens whose stream norm passes ``cap`` (one formula for a plan's rows and a single clamp)."""
    pre = (stream * enc).sum(-1) + bias
    coef = target - torch.where(pre > threshold, pre, torch.zeros_like(pre))
    return torch.where(stream.norm(dim=-1) > cap, torch.zeros_like(coef), coef)


@dataclass(eq=False)
class _ClampEdit(Edit):
    clamp: FeatureClamp
    value: float
    preserve_norm: bool = False

    @property
    def dim(self) -> int:
        return self.clamp.decoder.shape[-1]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        c = self.clamp
        enc, dec = c.encoder.to(h.device, h.dtype), c.decoder.to(h.device, h.dtype)
        return h + clamp_coefficient(h, enc, c.bias, c.threshold, self.value, c.norm_cap)[..., None] * dec


@dataclass
class EditSlot:
    """One edit slot at a site: its kind and its table's parts, each (1 + 3 x steered requests, ...): ``rows`` (the
    width edited), ``targets`` per row for the ``set`` kinds and ``clamp``, and for ``clamp`` the encoder rows
    ``enc`` and ``consts`` (bias, threshold, norm cap) per row."""

    kind: str
    parts: dict[str, torch.Tensor]

    def to(self, device, dtype) -> "EditSlot":
        return EditSlot(self.kind, {k: v.to(device, dtype) for k, v in self.parts.items()})

    @property
    def rows(self) -> torch.Tensor:
        return self.parts["rows"]

    def apply(self, x: torch.Tensor, index: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (..., width) edited by each token's row (``index``: x.shape[:-1]); the residual stream is ``x +
        extra`` (a vLLM layer passes its residual separately) or ``x``."""
        rows = self.rows[index]
        if self.kind == "add":
            return x + rows
        stream = x if extra is None else x + extra
        if self.kind == "clamp":
            bias, threshold, cap = self.parts["consts"][index].unbind(-1)
            coef = clamp_coefficient(stream, self.parts["enc"][index], bias, threshold, self.parts["targets"][index],
                                     cap)
            return x + coef[..., None] * rows
        if self.kind in ("set", "setn"):
            moved = stream + (self.parts["targets"][index][..., None] - (stream * rows).sum(-1, keepdim=True)) * rows
        else:  # "addn"
            moved = stream + rows
        if self.kind == "set":
            return moved if extra is None else moved - extra
        out = moved * (stream.norm(dim=-1, keepdim=True) / moved.norm(dim=-1, keepdim=True).clamp_min(1e-8))
        out = torch.where(rows.abs().sum(-1, keepdim=True) > 0, out, stream)  # rows the slot leaves alone: as they were
        return out if extra is None else out - extra


def request_slots(entries: Iterable[tuple], columns: Callable[[Site, torch.Tensor], torch.Tensor | None] | None = None
                  ) -> dict[Site, dict[tuple[int, str], dict[str, torch.Tensor]]]:
    """One request's edits: ``{site: {(entry k, kind): {part: (3, ...)}}}`` from its entries ``(vector, op, scope
    kind)`` in order (a vector has ``directions`` and ``preserve_norm``; a ``FeatureClamp`` goes with ``("clamp",
    value)``). ``columns(site, direction)`` places a direction in the width the engine edits (a head's columns on a
    tensor-parallel rank; None: not on this rank); without it a direction is its own width."""
    out: dict = {}
    for k, (vector, op, scope) in enumerate(entries):
        on = torch.tensor(APPLIES[str(scope)], dtype=torch.float32)[:, None]
        for site, direction in vector.directions.items():
            d = direction.float() if columns is None else columns(site, direction.float())
            if d is None:
                continue
            if isinstance(vector, FeatureClamp):  # ("clamp", value)
                consts = torch.tensor([vector.bias, vector.threshold, vector.norm_cap], dtype=torch.float32)
                out.setdefault(site, {})[(k, "clamp")] = {
                    "rows": on * d, "targets": on[:, 0] * float(op[1]), "enc": on * vector.encoder.float(),
                    "consts": on * consts}
            elif isinstance(op, tuple):  # ("set", value): the unit direction, and its target per token class
                kind = "setn" if vector.preserve_norm else "set"
                out.setdefault(site, {})[(k, kind)] = {"rows": on * (d / d.norm()), "targets": on[:, 0] * float(op[1])}
            else:
                kind = "addn" if vector.preserve_norm else "add"
                out.setdefault(site, {})[(k, kind)] = {"rows": on * (float(op) * d)}
    return out


def build_tables(requests: Sequence[dict], device=None, dtype=None) -> dict[Site, list[EditSlot]]:
    """Per site the edit slots of the steered ``requests`` (``request_slots`` of each, in batch order), stacked into
    tables with row 0 zeros, on ``device``/``dtype``."""
    ops: dict[Site, list[EditSlot]] = {}
    for site in dict.fromkeys(site for r in requests for site in r):
        for slot in sorted({slot for r in requests for slot in r.get(site, {})}):
            like = next(r[site][slot] for r in requests if slot in r.get(site, {}))  # part shapes
            parts = {name: torch.cat([torch.zeros(1, *t.shape[1:])]
                                     + [r[site][slot][name] if slot in r.get(site, {}) else torch.zeros_like(t)
                                        for r in requests])
                     for name, t in like.items()}
            op = EditSlot(slot[1], parts)
            ops.setdefault(site, []).append(op.to(device, dtype) if device is not None else op)
    return ops


def token_index(slot: torch.Tensor, positions: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
    """Each token's row in the tables: ``slot`` is its request's place among the steered requests (-1: unsteered,
    or a padding token), ``positions`` its position in its sequence, ``prompt_lens`` its request's prompt length."""
    cls = (positions >= prompt_lens - 1).long() + (positions >= prompt_lens).long()
    return torch.where(slot >= 0, 1 + CLASSES * slot + cls, torch.zeros_like(slot))


@dataclass
class SteeringPlan:
    """One forward pass's steering: per site its edit slots in order, and each token's row in their tables."""

    ops: dict[Site, list[EditSlot]]
    index: torch.Tensor

    def edit(self, site: Site, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` with the site's slots applied in order. A flat ``x`` (tokens, width) longer than the index (an
        engine's padded tokens) gets row 0 past it."""
        index = self.index
        if index.dim() == 1 and index.shape[0] != x.shape[0]:
            index = torch.nn.functional.pad(index[: x.shape[0]], (0, max(0, x.shape[0] - index.shape[0])))
        index = index.to(x.device)
        for op in self.ops.get(site, ()):
            x = op.apply(x, index, extra)
        return x


@dataclass(eq=False)
class PlanEdit(Edit):
    """The plan's slots at one site as an ``engine.ops.Edit``, so the hook runtime (``engine.runtime``) runs it where
    it runs every edit (sites, heads' slices): the edit a steering plan puts at a site for a local model."""

    plan: SteeringPlan
    site: Site

    @property
    def dim(self) -> int | None:
        ops = self.plan.ops.get(self.site)
        return ops[0].rows.shape[-1] if ops else None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.plan.edit(self.site, h)
