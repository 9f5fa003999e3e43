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

Token gates: an entry ``(vector, op, scope, gate)`` gets a slot of its own that waits on ``gate`` (a
``TokenGate``): its tokens read their row only from the one at which the gate fired for their batch row on, and
row 0 before. Which tokens a gate has switched on is known only inside the pass (the gate is read at an earlier
site of the same pass), so the plan asks the hooks that run it (``SteeringPlan.gate_on``, the standing hooks'
``gate_on``); the latches live with the engine's rows.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from ..errors import SteerscaleError
from ..models.sites import Site
from .ops import Edit
from .runtime import Intervention
from .scope import ALL_TOKENS, TokenScope
from .token_gates import TokenGate

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
    gate: TokenGate | None = None  # the slot's rows apply from the token at which this gate fired (per batch row)

    def to(self, device, dtype) -> "EditSlot":
        return EditSlot(self.kind, {k: v.to(device, dtype) for k, v in self.parts.items()}, self.gate)

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
    """One request's edits: ``{site: {(entry k, kind, gate): {part: (3, ...)}}}`` from its entries ``(vector, op,
    scope kind)`` or ``(vector, op, scope kind, gate)`` in order (a vector has ``directions`` and ``preserve_norm``; a
    ``FeatureClamp`` goes with ``("clamp", value)``; ``gate``: a ``TokenGate`` or None, its site checked before the
    entry's by whoever takes the request: ``Intervention``, ``Scheduler.submit``). ``columns(site, direction)``
    places a direction in the width the engine edits (a head's columns on a tensor-parallel rank; None: not on this
    rank); without it a direction is its own width."""
    out: dict = {}
    for k, entry in enumerate(entries):
        vector, op, scope, gate = _entry(entry)
        on = torch.tensor(APPLIES[str(scope)], dtype=torch.float32)[:, None]
        for site, direction in vector.directions.items():
            d = direction.float() if columns is None else columns(site, direction.float())
            if d is None:
                continue
            if isinstance(vector, FeatureClamp):  # ("clamp", value)
                consts = torch.tensor([vector.bias, vector.threshold, vector.norm_cap], dtype=torch.float32)
                out.setdefault(site, {})[(k, "clamp", gate)] = {
                    "rows": on * d, "targets": on[:, 0] * float(op[1]), "enc": on * vector.encoder.float(),
                    "consts": on * consts}
            elif isinstance(op, tuple):  # ("set", value): the unit direction, and its target per token class
                kind = "setn" if vector.preserve_norm else "set"
                out.setdefault(site, {})[(k, kind, gate)] = {"rows": on * (d / d.norm()),
                                                             "targets": on[:, 0] * float(op[1])}
            else:
                kind = "addn" if vector.preserve_norm else "add"
                out.setdefault(site, {})[(k, kind, gate)] = {"rows": on * (float(op) * d)}
    return out


def _entry(entry: tuple) -> tuple:
    """``(vector, op, scope, gate)`` of an entry given with or without its gate."""
    if len(entry) == 3:
        return (*entry, None)
    vector, op, scope, gate = entry
    if gate is not None and not isinstance(gate, TokenGate):
        raise SteerscaleError(f"a steering entry's gate must be a TokenGate, got {type(gate).__name__}")
    return vector, op, scope, gate


def _slot_order(slot: tuple) -> tuple:
    """Slots in entry order; an entry's gated and ungated slots (different requests) in a fixed order."""
    k, kind, gate = slot
    return k, kind, 0 if gate is None else id(gate)


def build_tables(requests: Sequence[dict], device=None, dtype=None) -> dict[Site, list[EditSlot]]:
    """Per site the edit slots of the steered ``requests`` (``request_slots`` of each, in batch order), stacked into
    tables with row 0 zeros, on ``device``/``dtype``."""
    ops: dict[Site, list[EditSlot]] = {}
    for site in dict.fromkeys(site for r in requests for site in r):
        for slot in sorted({slot for r in requests for slot in r.get(site, {})}, key=_slot_order):
            like = next(r[site][slot] for r in requests if slot in r.get(site, {}))  # part shapes
            parts = {name: torch.cat([torch.zeros(1, *t.shape[1:])]
                                     + [r[site][slot][name] if slot in r.get(site, {}) else torch.zeros_like(t)
                                        for r in requests])
                     for name, t in like.items()}
            op = EditSlot(slot[1], parts, slot[2])
            ops.setdefault(site, []).append(op.to(device, dtype) if device is not None else op)
    return ops


def token_index(slot: torch.Tensor, positions: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
    """Each token's row in the tables: ``slot`` is its request's place among the steered requests (-1: unsteered,
    or a padding token), ``positions`` its position in its sequence, ``prompt_lens`` its request's prompt length."""
    cls = (positions >= prompt_lens - 1).long() + (positions >= prompt_lens).long()
    return torch.where(slot >= 0, 1 + CLASSES * slot + cls, torch.zeros_like(slot))


@dataclass
class SteeringPlan:
    """One forward pass's steering: per site its edit slots in order, and each token's row in their tables.
    ``gate_on(gate)``: the (rows, tokens) tokens of this pass a gate has switched on, for plans with gated slots
    (the standing hooks' ``gate_on``)."""

    ops: dict[Site, list[EditSlot]]
    index: torch.Tensor
    gate_on: Callable[[TokenGate], torch.Tensor] | None = None

    @functools.cached_property
    def gates(self) -> list[TokenGate]:
        """The distinct gates the plan's slots wait on (the hooks must read them in every pass)."""
        return list({id(op.gate): op.gate for ops in self.ops.values() for op in ops if op.gate is not None}.values())

    def edit(self, site: Site, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` with the site's slots applied in order. A flat ``x`` (tokens, width) longer than the index (an
        engine's padded tokens) gets row 0 past it."""
        index = self.index
        if index.dim() == 1 and index.shape[0] != x.shape[0]:
            index = torch.nn.functional.pad(index[: x.shape[0]], (0, max(0, x.shape[0] - index.shape[0])))
        index = index.to(x.device)
        for op in self.ops.get(site, ()):
            x = op.apply(x, index if op.gate is None else self._gated(op.gate, index), extra)
        return x

    def _gated(self, gate: TokenGate, index: torch.Tensor) -> torch.Tensor:
        if self.gate_on is None or index.dim() != 2:
            raise SteerscaleError("this engine runs no token gates", "run token-gated steering on a local engine "
                                  "(generate, LocalBackend, steerscale serve)")
        return torch.where(self.gate_on(gate).to(index.device), index, torch.zeros_like(index))


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


# -- the plan in fixed buffers (CUDA graphs) --------------------------------------------------------------------
_COEF, _SETM, _TARGET, _BIAS, _THRESHOLD, _CAP, _NORM = range(7)  # a stage row's numbers


class StaticPlan:
    """The same plan in buffers allocated once and updated in place, so a captured CUDA graph (or any compiled
    graph that must not change between steps) reads each step's steering: LoRA's design in vLLM. Per site: a table
    of directions (row 0 zeros; the registered vectors' directions and unit directions, written on registration,
    like LoRA's adapter slots), and ``stages`` stage tables with one row per token class of each request slot (row 0:
    no edit) holding which directions the row writes and reads and its numbers; one per-token index, as
    ``SteeringPlan``. Stage k applies each request's k-th entry at the site in one formula that covers every slot
    kind of ``EditSlot``::

        delta = (coef + setm x (target - act(s . read + bias))) x write      act: 0 at or below threshold
        h' = h + delta                  (0 where |s| passes cap; norm-preserving rows: rescaled to |s|)

    add: coef = scale, write = d; set: setm = 1, read = write = the unit direction, threshold -inf; clamp: read =
    encoder, write = decoder. Every stage runs on every pass whatever the batch holds: a captured graph replays the
    same kernels and only the buffers' contents change."""

    def __init__(self, widths: dict[Site, int], *, requests: int, stages: int, directions: int, tokens: int,
                 device=None, dtype=torch.float32):
        self.stages, self.requests, self.capacity, self._dtype = stages, requests, directions, dtype
        self.index = torch.zeros(tokens, dtype=torch.long, device=device)
        self.dirs: dict[Site, torch.Tensor] = {}
        self.ids: dict[Site, torch.Tensor] = {}
        self.vals: dict[Site, torch.Tensor] = {}
        self._slots: dict[Site, dict] = {}  # per site: key -> direction row
        for site, width in widths.items():
            self.add_site(site, width)

    def add_site(self, site: Site, width: int) -> None:
        """Buffers for one more site (before a graph is captured: its buffers must exist then)."""
        if site in self.dirs:
            return
        like = self.index
        dtype = self._dtype
        self.dirs[site] = torch.zeros(self.capacity + 1, width, device=like.device, dtype=dtype)
        self.ids[site] = torch.zeros(self.stages, 1 + CLASSES * self.requests, 2, dtype=torch.long, device=like.device)
        self.vals[site] = torch.zeros(self.stages, 1 + CLASSES * self.requests, 7, device=like.device, dtype=dtype)
        self._slots[site] = {}

    def direction(self, site: Site, key, direction: torch.Tensor) -> int:
        """The row of ``direction`` (named ``key``) in ``site``'s table, written on first use."""
        slots = self._slots[site]
        if key not in slots:
            if len(slots) >= self.capacity:
                raise SteerscaleError(f"{site.key()} holds {self.capacity} steering directions already",
                                      "unregister vectors, or raise STEERSCALE_VLLM_DIRECTIONS")
            slots[key] = len(slots) + 1
            self.dirs[site][slots[key]].copy_(direction.to(self.dirs[site].dtype))
        return slots[key]

    def forget(self) -> None:
        """Drop every direction (vectors were unregistered or replaced); rows are written again on use."""
        for site in self._slots:
            self._slots[site] = {}
            self.dirs[site].zero_()

    def request_stages(self, entries: Iterable[tuple], columns=None) -> dict[Site, list[tuple]]:
        """One request's stage rows per site: ``[(ids (3, 2), vals (3, 7))]`` in entry order (the ``request_slots``
        of this layout); a site with more entries than stages is refused."""
        out: dict[Site, list] = {}
        for entry in entries:
            vector, op, scope, gate = _entry(entry)
            if gate is not None:
                raise SteerscaleError("token gates do not run in the static (CUDA-graph) plan",
                                      "run token-gated steering on a local engine (steerscale serve)")
            on = torch.tensor(APPLIES[str(scope)], dtype=torch.float32)
            for site, direction in vector.directions.items():
                if site not in self.dirs:
                    raise SteerscaleError(f"{site.key()} has no steering buffers", "hook the site at start")
                d = direction.float() if columns is None else columns(site, direction.float())
                if d is None:
                    continue
                vals = torch.zeros(CLASSES, 7)
                vals[:, _CAP] = math.inf
                vals[:, _NORM] = float(vector.preserve_norm)
                if isinstance(vector, FeatureClamp):
                    enc = vector.encoder.float() if columns is None else columns(site, vector.encoder.float())
                    write = self.direction(site, (vector.name or id(vector), "dec"), d)
                    read = self.direction(site, (vector.name or id(vector), "enc"), enc)
                    vals[:, _SETM], vals[:, _TARGET] = 1.0, float(op[1])
                    vals[:, _BIAS], vals[:, _THRESHOLD], vals[:, _CAP] = vector.bias, vector.threshold, vector.norm_cap
                elif isinstance(op, tuple):  # ("set", value)
                    write = read = self.direction(site, (id(direction), "unit"), d / d.norm())
                    vals[:, _SETM], vals[:, _TARGET], vals[:, _THRESHOLD] = 1.0, float(op[1]), -math.inf
                else:
                    write, read = self.direction(site, (id(direction), "raw"), d), 0
                    vals[:, _COEF] = float(op)
                ids = torch.tensor([[write, read]] * CLASSES)
                off = on[:, None] == 0  # classes the scope leaves alone: row 0's zeros (no inf x 0)
                out.setdefault(site, []).append((ids.masked_fill(off, 0), vals.masked_fill(off, 0.0)))
        for site, stages in out.items():
            if len(stages) > self.stages:
                raise SteerscaleError(f"{len(stages)} steering entries at {site.key()} but the plan holds "
                                      f"{self.stages} per site", "send fewer entries, or raise STEERSCALE_VLLM_STAGES")
        return out

    def load(self, requests: Sequence[dict], index: torch.Tensor) -> None:
        """Write the stage rows of the steered ``requests`` (``request_stages`` of each, in slot order) and the
        token index (longer than the buffer: refused; the rest of the buffer reads row 0), in place."""
        if len(requests) > self.requests:
            raise SteerscaleError(f"{len(requests)} steered requests in one pass; the plan holds {self.requests}")
        n = index.shape[0]
        if n > self.index.shape[0]:
            raise SteerscaleError(f"{n} tokens in one pass; the plan's index holds {self.index.shape[0]}")
        for site in self.dirs:
            ids = torch.zeros(self.ids[site].shape, dtype=torch.long)
            vals = torch.zeros(self.vals[site].shape)
            for r, request in enumerate(requests):
                for k, (i, v) in enumerate(request.get(site, ())):
                    ids[k, 1 + CLASSES * r: 1 + CLASSES * (r + 1)] = i
                    vals[k, 1 + CLASSES * r: 1 + CLASSES * (r + 1)] = v
            self.ids[site].copy_(ids, non_blocking=True)
            self.vals[site].copy_(vals, non_blocking=True)
        self.set_index(index)

    def set_index(self, index: torch.Tensor) -> None:
        n = index.shape[0]
        self.index[:n].copy_(index, non_blocking=True)
        self.index[n:].zero_()

    def edit(self, site: Site, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (tokens, width) after every stage at ``site``: fixed shapes and kernels, no branch on the data."""
        index = self.index[: x.shape[0]]
        dirs = self.dirs[site]
        for k in range(self.stages):
            ids, vals = self.ids[site][k][index], self.vals[site][k][index]
            write, read = dirs[ids[:, 0]], dirs[ids[:, 1]]
            stream = x if extra is None else x + extra
            coef = vals[:, _COEF] + vals[:, _SETM] * clamp_coefficient(
                stream, read, vals[:, _BIAS], vals[:, _THRESHOLD], vals[:, _TARGET], vals[:, _CAP])
            delta = coef[:, None] * write
            moved = stream + delta
            kept = moved * (stream.norm(dim=-1, keepdim=True) / moved.norm(dim=-1, keepdim=True).clamp_min(1e-8))
            x = torch.where(vals[:, _NORM:_NORM + 1] > 0, kept if extra is None else kept - extra, x + delta)
        return x
