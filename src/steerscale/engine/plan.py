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
direction in the row), and ``addn``/``setn``, the same for norm-preserving vectors (GrAInS): the stream is
rescaled to its norm before, on the rows the slot edits (``engine.ops.apply_edit``'s rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from ..models.sites import Site
from .ops import Edit

CLASSES = 3  # token classes per request: early prompt tokens, the last prompt token, generated tokens
APPLIES = {"all": (True, True, True), "prompt": (True, True, False), "generated": (False, True, True)}


@dataclass
class EditSlot:
    """One edit slot at a site: its kind and its table ((1 + 3 x steered requests, width); ``targets`` per row for
    the ``set`` kinds)."""

    kind: str
    rows: torch.Tensor
    targets: torch.Tensor | None = None

    def to(self, device, dtype) -> "EditSlot":
        return EditSlot(self.kind, self.rows.to(device, dtype),
                        None if self.targets is None else self.targets.to(device, dtype))

    def apply(self, x: torch.Tensor, index: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (..., width) edited by each token's row (``index``: x.shape[:-1]); the residual stream is ``x +
        extra`` (a vLLM layer passes its residual separately) or ``x``."""
        rows = self.rows[index]
        if self.kind == "add":
            return x + rows
        stream = x if extra is None else x + extra
        if self.kind in ("set", "setn"):
            moved = stream + (self.targets[index][..., None] - (stream * rows).sum(-1, keepdim=True)) * rows
        else:  # "addn"
            moved = stream + rows
        if self.kind == "set":
            return moved if extra is None else moved - extra
        out = moved * (stream.norm(dim=-1, keepdim=True) / moved.norm(dim=-1, keepdim=True).clamp_min(1e-8))
        out = torch.where(rows.abs().sum(-1, keepdim=True) > 0, out, stream)  # rows the slot leaves alone: as they were
        return out if extra is None else out - extra


def request_slots(entries: Iterable[tuple], columns: Callable[[Site, torch.Tensor], torch.Tensor | None] | None = None
                  ) -> dict[Site, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]]]:
    """One request's edits: ``{site: {(entry k, kind): (rows (3, width), targets (3,) or None)}}`` from its entries
    ``(vector, op, scope kind)`` in order (a vector has ``directions`` and ``preserve_norm``). ``columns(site,
    direction)`` places a direction in the width the engine edits (a head's columns on a tensor-parallel rank; None:
    not on this rank); without it a direction is its own width."""
    out: dict = {}
    for k, (vector, op, scope) in enumerate(entries):
        on = torch.tensor(APPLIES[str(scope)], dtype=torch.float32)[:, None]
        for site, direction in vector.directions.items():
            d = direction.float() if columns is None else columns(site, direction.float())
            if d is None:
                continue
            if isinstance(op, tuple):  # ("set", value): the unit direction, and its target per token class
                kind = "setn" if vector.preserve_norm else "set"
                out.setdefault(site, {})[(k, kind)] = (on * (d / d.norm()), on[:, 0] * float(op[1]))
            else:
                kind = "addn" if vector.preserve_norm else "add"
                out.setdefault(site, {})[(k, kind)] = (on * (float(op) * d), None)
    return out


def build_tables(requests: Sequence[dict], device=None, dtype=None) -> dict[Site, list[EditSlot]]:
    """Per site the edit slots of the steered ``requests`` (``request_slots`` of each, in batch order), stacked into
    tables with row 0 zeros, on ``device``/``dtype``."""
    ops: dict[Site, list[EditSlot]] = {}
    for site in dict.fromkeys(site for r in requests for site in r):
        slots = sorted({slot for r in requests for slot in r.get(site, {})})
        width = next(v[0].shape[-1] for r in requests for v in r.get(site, {}).values())
        for slot in slots:
            parts, targets = [torch.zeros(1, width)], [torch.zeros(1)]
            for r in requests:
                vec, tgt = r.get(site, {}).get(slot, (torch.zeros(CLASSES, width), None))
                parts.append(vec)
                targets.append(tgt if tgt is not None else torch.zeros(CLASSES))
            op = EditSlot(slot[1], torch.cat(parts), torch.cat(targets) if slot[1].startswith("set") else None)
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
