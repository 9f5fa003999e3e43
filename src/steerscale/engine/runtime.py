"""The hook runtime: the one place where hooks are attached to a model.

Contract
--------
* Two kinds of hook: edits (``intervene``) and read-only observers (``observe``, which ``engine.capture`` reads
  activations through). Both locate sites the same way and share one hook per module and hook point.
* An ``Intervention`` is ``(site, edit, scope, rows)``. ``layout.locate(site)`` says which module and hook point
  carry it (see ``models.layout``); this module never inspects module names.
* All interventions of one ``intervene`` block that share a module and hook point run in a single hook, in the
  order they were given. Across sites, order is the model's own forward order. Nested ``intervene`` blocks run
  outer edits before inner ones at a shared site (PyTorch runs hooks in registration order).
* Token positions come from the KV-cache length (see ``engine.scope``), so cached and uncached generation edit
  the same tokens. A pre-hook on the decoder stack computes them once per forward pass.
* Lifetime: hooks exist only inside the ``with`` block. They are removed in ``finally``, so after any exception
  the model is exactly as before; with no intervention active nothing is attached and nothing runs.
* Token gates (``engine.token_gates``): an intervention with ``gate=`` applies to a row from the first token at
  which the gate's probe fires; the gate is read at its own site in the same forward pass (before the edit: the
  edit's site must come later), and each row's latch lives in the ``Intervener``. A pass that starts at column 0
  (a prompt, or an uncached recompute) recomputes the latch from scratch.
* Isolation: state lives in the ``Intervener`` object, not in globals; two models, or two sequential requests on
  one model, never see each other's edits. Different rows of one batch can carry different edits (per-row
  vectors/scales in the edit, or ``rows=``), which is how concurrent requests share a forward pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Iterator, Sequence

import torch

from ..errors import SteerscaleError
from ..models.layout import HookPoint, Location, ModelLayout
from ..models.sites import Site
from .ops import Edit, apply_edit
from .scope import ALL_TOKENS, Scope, SequenceTracker, TokenScope, TokenState
from .token_gates import TokenGate

_NEVER = torch.iinfo(torch.long).max  # a row's latch before its gate has fired


@dataclass(frozen=True, eq=False)
class Intervention:
    site: Site
    edit: Edit
    scope: TokenScope = ALL_TOKENS
    rows: tuple[int, ...] | None = None  # only these batch rows; None: every row
    gate: TokenGate | None = None  # apply from the token at which this gate fires (per row), not from the start

    def __post_init__(self):
        if not isinstance(self.site, Site):
            raise SteerscaleError(f"Intervention.site must be a Site, got {self.site!r}")
        if not isinstance(self.edit, Edit):
            raise SteerscaleError(f"Intervention.edit must be an Edit, got {type(self.edit).__name__}")
        object.__setattr__(self, "scope", TokenScope.parse(self.scope))
        if self.rows is not None:
            object.__setattr__(self, "rows", tuple(int(r) for r in self.rows))
        if self.gate is not None:
            if not isinstance(self.gate, TokenGate):
                raise SteerscaleError(f"Intervention.gate must be a TokenGate, got {type(self.gate).__name__}")
            self.gate.check_edit_site(self.site)


@dataclass(frozen=True, eq=False)
class Observer:
    """A read-only callback at a site: ``fn(activation)`` gets the site's tensor on every forward pass (``(batch,
    seq, dim)``; for ``head_out`` the head's slice; a router's logits as the module passes them). It must not
    modify the tensor; its return value is ignored."""

    site: Site
    fn: Callable[[torch.Tensor], object]

    def __post_init__(self):
        if not isinstance(self.site, Site):
            raise SteerscaleError(f"Observer.site must be a Site, got {self.site!r}")
        if not callable(self.fn):
            raise SteerscaleError(f"Observer.fn must be callable, got {type(self.fn).__name__}")


class StopForward(Exception):
    """Raised right after the block named by ``observe(..., stop_after=)``: the rest of the forward pass would be
    wasted work for a caller that only reads earlier sites. Catch it around the model call."""


def _stop(module, args, output):
    raise StopForward


def attach_hook(location: Location, fn):
    """Register ``fn`` at ``location`` and return its removable handle: for ``HookPoint.INPUT`` a forward pre-hook
    ``fn(module, args, kwargs) -> (args, kwargs) | None``, for ``OUTPUT`` a forward hook ``fn(module, args, output)
    -> output | None``. Every hook steerscale puts on a model goes through here (``Intervener``; vLLM's worker,
    ``steerscale.vllm.worker``), so a reader finds where hooks attach in one place."""
    if location.point is HookPoint.INPUT:
        return location.module.register_forward_pre_hook(fn, with_kwargs=True)
    return location.module.register_forward_hook(fn)


def _by_hook(located: Iterable[tuple[object, Location]]) -> dict[tuple[int, HookPoint], list]:
    """``(item, location)`` pairs grouped by (module, hook point), in the order given: one hook per group. Each item
    keeps its own Location because items sharing a module can act on different slices of it (several heads of one
    attention output projection)."""
    groups: dict[tuple[int, HookPoint], list] = {}
    for item, loc in located:
        groups.setdefault((id(loc.module), loc.point), []).append((item, loc))
    return groups


def _check(layout: ModelLayout, iv: Intervention) -> Location:
    location = layout.locate(iv.site)  # raises for a bad layer / head / kind
    want = layout.site_dim(iv.site)
    got = iv.edit.dim
    if got is not None and got != want:
        raise SteerscaleError(
            f"edit at {iv.site.key()} has size {got}, but this {layout.architecture} model's site has size {want}",
            "the vector was probably made for another model or site; re-extract it for this model",
        )
    return location


class Intervener:
    """Attaches interventions (and observers) to a model and removes them again. Use ``intervene(...)`` or
    ``observe(...)``. At a shared site, observers see the activation after this object's edits."""

    def __init__(self, layout: ModelLayout, interventions: Sequence[Intervention], prompt_width: int | None = None,
                 observers: Sequence[Observer] = (), stop_after: int | None = None):
        self.layout = layout
        self.interventions = list(interventions)
        self.observers = list(observers)
        self.tracker = SequenceTracker(prompt_width)
        self._handles: list = []
        self._groups: dict[tuple[int, HookPoint], list[tuple[Intervention, Location]]] = _by_hook(
            (iv, _check(layout, iv)) for iv in self.interventions)
        self._latches: dict[int, torch.Tensor] = {}  # id(gate) -> (batch,) real index of the token it fired at
        gate_reads = self._gate_reads(iv.gate for iv in self.interventions)
        self._reads: dict[tuple[int, HookPoint], list[tuple[Observer, Location]]] = _by_hook(
            (ob, layout.locate(ob.site)) for ob in self.observers + gate_reads)
        if stop_after is not None and not 0 <= stop_after < layout.n_layers:
            raise SteerscaleError(f"stop_after={stop_after} is not a block of this model ({layout.n_layers} blocks)")
        self.stop_after = stop_after

    @property
    def state(self) -> TokenState | None:
        return self.tracker.state

    def _gate_reads(self, gates: Iterable[TokenGate | None]) -> list[Observer]:
        """The observers that read ``gates`` (each distinct gate once), checked against the model."""
        distinct = {id(g): g for g in gates if g is not None}
        for gate in distinct.values():
            if gate.dim != self.layout.site_dim(gate.site):
                raise SteerscaleError(f"gate at {gate.site.key()} has size {gate.dim}, but this "
                                      f"{self.layout.architecture} model's site has size "
                                      f"{self.layout.site_dim(gate.site)}",
                                      "the gate was fitted on another model; fit it on this one")
        return [Observer(g.site, partial(self._read_gate, g)) for g in distinct.values()]

    def gate_on(self, gate: TokenGate) -> torch.Tensor:
        """(batch, tokens) bool: the tokens of the pass in progress that ``gate`` has switched on (its latch is at or
        before them). What an edit that gates only some of its rows (a steering plan's gated slots) asks."""
        return self._gate_on(gate, self.tracker.state)

    def gate_positions(self, gate: TokenGate) -> list[int | None]:
        """Per row of the last forward pass, the real-token index at which ``gate`` fired (None: it did not)."""
        latch = self._latches.get(id(gate))
        return [] if latch is None else [None if int(p) == _NEVER else int(p) for p in latch]

    def new_sequence(self, prompt_width: int | None = None) -> None:
        """Forget the current prompt (only needed when a new prompt is an extension of the previous one)."""
        self.tracker.reset(prompt_width)

    # -- attaching -------------------------------------------------------------------------------------------
    def attach(self) -> "Intervener":
        if self._handles:
            raise SteerscaleError("this Intervener is already attached", "use a fresh intervene(...) block")
        try:
            if self._groups:  # edits need token positions; observers alone do not
                self._handles.append(attach_hook(Location(self.layout.base, HookPoint.INPUT), self._observe))
            self._register(self._groups, self._input_hook, self._output_hook)
            self._register(self._reads, self._read_input_hook, self._read_output_hook)
            if self.stop_after is not None:
                self._handles.append(attach_hook(Location(self.layout.blocks[self.stop_after], HookPoint.OUTPUT), _stop))
        except BaseException:
            self.detach()
            raise
        return self

    def _register(self, groups: dict, input_hook, output_hook) -> None:
        for group in groups.values():
            loc = group[0][1]
            hook = input_hook(group) if loc.point is HookPoint.INPUT else output_hook(group)
            self._handles.append(attach_hook(loc, hook))

    def detach(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        self.tracker.state = None

    # -- hooks -----------------------------------------------------------------------------------------------
    def _observe(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(input_ids, torch.Tensor):
            batch, width, device = input_ids.shape[0], input_ids.shape[1], input_ids.device
        else:
            embeds = kwargs["inputs_embeds"]
            input_ids, (batch, width), device = None, embeds.shape[:2], embeds.device
        self.tracker.observe(input_ids, width, batch, device, kwargs)

    def _edit(self, h: torch.Tensor, group: list[tuple[Intervention, Location]]) -> torch.Tensor:
        state = self.tracker.state
        if state is None:
            raise SteerscaleError(
                "a steered module ran outside a forward pass of the decoder stack",
                "call the full model (or layout.base), not a single block, inside intervene(...)",
            )
        flat_shape = None
        if group[0][1].flat_tokens:  # MoE routers see (batch*seq, experts)
            flat_shape = h.shape
            h = h.reshape(state.batch, -1, h.shape[-1])
        for iv, loc in group:
            x = h[..., loc.index] if loc.index is not None else h
            new = apply_edit(iv.edit, x)
            mask = state.mask(iv.scope)
            if iv.gate is not None:
                on = self._gate_on(iv.gate, state)
                mask = on if mask is None else mask & on
            if iv.rows is not None:
                rows = torch.zeros(h.shape[0], 1, dtype=torch.bool, device=h.device)
                rows[list(iv.rows)] = True
                mask = rows if mask is None else mask & rows
            if mask is not None:
                new = torch.where(mask[..., None], new, x)
            if loc.index is None:
                h = new
            else:
                h = torch.cat([h[..., : loc.index.start], new, h[..., loc.index.stop :]], dim=-1)
        return h.reshape(flat_shape) if flat_shape is not None else h

    def _edit_input(self, group, args, kwargs):
        if args:
            return (self._edit(args[0], group), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = self._edit(kwargs["hidden_states"], group)
        return args, kwargs

    def _edit_output(self, group, module, output):
        if isinstance(output, torch.Tensor):
            return self._edit(output, group)
        rebuild = group[0][1].rebuild
        if isinstance(output, tuple):
            edited = self._edit(output[0], group)
            return rebuild(module, edited, output) if rebuild else (edited, *output[1:])
        if hasattr(output, "last_hidden_state"):  # a ModelOutput
            output.last_hidden_state = self._edit(output.last_hidden_state, group)
            return output
        raise SteerscaleError(f"cannot edit output of type {type(output).__name__} at {type(module).__name__}")

    def _input_hook(self, group):
        return lambda module, args, kwargs: self._edit_input(group, args, kwargs)

    def _output_hook(self, group):
        return lambda module, args, output: self._edit_output(group, module, output)

    def _read_gate(self, gate: TokenGate, h: torch.Tensor) -> None:
        """Latch each row at the first position (last prompt token onwards) where ``gate`` fires."""
        state = self.tracker.state
        latch = self._latches.get(id(gate))
        if latch is None or int(state.cache_position[0]) == 0:  # a new sequence (or a recompute from column 0)
            latch = new_latch(state.batch, h.device)
        elif latch.shape[0] != state.batch:
            raise SteerscaleError(f"gate latches for {latch.shape[0]} rows in a pass of {state.batch}",
                                  "keep each row's latch with the row when the batch changes (select/merge it)")
        real = state.real_positions()
        fired = gate.fires(h) & state.mask(TokenScope(Scope.GENERATED))
        first = torch.where(fired, real, torch.full_like(real, _NEVER)).min(-1).values
        self._latches[id(gate)] = torch.minimum(latch, first.to(latch.device))

    def _gate_on(self, gate: TokenGate, state: TokenState) -> torch.Tensor:
        latch = self._latches.get(id(gate))
        if latch is None:  # the pass stopped before the gate's site: nothing has fired
            return torch.zeros(state.batch, state.cache_position.shape[0], dtype=torch.bool,
                               device=state.cache_position.device)
        return state.real_positions() >= latch[:, None]

    @staticmethod
    def _read(h: torch.Tensor, group: list[tuple[Observer, Location]]) -> None:
        for ob, loc in group:
            ob.fn(h[..., loc.index] if loc.index is not None else h)

    def _read_input_hook(self, group):
        def hook(module, args, kwargs):
            self._read(args[0] if args else kwargs["hidden_states"], group)

        return hook

    def _read_output_hook(self, group):
        def hook(module, args, output):
            self._read(output if isinstance(output, torch.Tensor) else output[0], group)

        return hook


def new_latch(rows: int, device=None) -> torch.Tensor:
    """A gate's latch for ``rows`` rows that have not fired: ``(rows,)`` long, the never-fired value."""
    return torch.full((rows,), _NEVER, dtype=torch.long, device=device)


class StandingIntervener(Intervener):
    """Hooks attached once for an engine's lifetime, running whatever edits (and reads) the current forward pass
    has: ``with hooks.running(interventions, observers, prompt_width): model(...)``. A module's hook is registered
    the first time an edit or read there is run (or up front, ``prepare(sites)``) and stays until ``close()``; a
    hooked module without edits in this pass returns at once. So an engine that decodes step after step under
    changing per-row edits registers no hooks per step (``registrations`` counts them), and the edits themselves are
    the same code as ``intervene``'s. Token gates run too: a gate's latch spans a whole generation, so the engine
    owns it (``running(latches=...)``: one ``(rows,)`` tensor per gate, kept with its rows across passes)."""

    def __init__(self, layout: ModelLayout):
        super().__init__(layout, [])
        self._hooked: set[tuple[int, HookPoint]] = set()
        self._groups, self._reads, self._gated = {}, {}, False
        self.registrations = 0

    def attach(self) -> "StandingIntervener":
        if not self._handles:
            self._handles.append(attach_hook(Location(self.layout.base, HookPoint.INPUT), self._observe_if_running))
            self.registrations += 1
        return self

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def close(self) -> None:
        self.detach()
        self._hooked.clear()

    def prepare(self, sites: Iterable[Site]) -> None:
        """Hook the modules that carry ``sites`` now (an engine's known vectors), not at their first use."""
        self._hook_all(self.layout.locate(s) for s in sites)

    def _hook_all(self, locations: Iterable[Location]) -> None:
        for loc in locations:
            key = (id(loc.module), loc.point)
            if key in self._hooked:
                continue
            if loc.point is HookPoint.INPUT:
                fn = partial(self._standing_input, key)
            else:
                fn = partial(self._standing_output, key)
            self._handles.append(attach_hook(loc, fn))
            self._hooked.add(key)
            self.registrations += 1

    @contextmanager
    def running(self, interventions: Sequence[Intervention] = (), observers: Sequence[Observer] = (),
                prompt_width: int | None = None, gates: Iterable[TokenGate] = (),
                latches: dict[int, torch.Tensor] | None = None) -> Iterator["StandingIntervener"]:
        """The edits and reads of the forward passes inside the block; nothing runs after it. Token gates (those of
        ``interventions`` and ``gates``, the gates an edit asks about through ``gate_on``) are read in every pass;
        ``latches`` (``id(gate) -> (rows,)``, ``new_latch``) is the caller's and is updated in place, so a gate that
        fired in one pass stays on in the next; a pass from column 0 starts every latch afresh."""
        if not self._handles:
            raise SteerscaleError("these standing hooks are closed", "build a new engine")
        groups = _by_hook((iv, _check(self.layout, iv)) for iv in interventions)
        gate_reads = self._gate_reads([*(iv.gate for iv in interventions), *gates])
        reads = _by_hook((ob, self.layout.locate(ob.site)) for ob in [*observers, *gate_reads])
        self._hook_all(group[0][1] for group in (*groups.values(), *reads.values()))
        self._groups, self._reads, self._gated = groups, reads, bool(gate_reads)
        self._latches = latches if latches is not None else {}
        self.tracker.reset(prompt_width)
        try:
            yield self
        finally:
            self._groups, self._reads, self._latches, self._gated = {}, {}, {}, False
            self.tracker.state = None

    def _observe_if_running(self, module, args, kwargs):
        if self._groups or self._gated:  # edits and gates need token positions; a pass without them skips the work
            self._observe(module, args, kwargs)

    def _standing_input(self, key, module, args, kwargs):
        group = self._groups.get(key)
        edited = self._edit_input(group, args, kwargs) if group else None
        reads = self._reads.get(key)
        if reads:  # observers see the edited input, as in intervene + observe
            a, kw = edited if edited is not None else (args, kwargs)
            self._read(a[0] if a else kw["hidden_states"], reads)
        return edited

    def _standing_output(self, key, module, args, output):
        group = self._groups.get(key)
        if group:
            output = self._edit_output(group, module, output)
        reads = self._reads.get(key)
        if reads:
            self._read(output if isinstance(output, torch.Tensor) else output[0], reads)
        return output if group else None


@contextmanager
def intervene(
    layout: ModelLayout, interventions: Iterable[Intervention] | Intervention, prompt_width: int | None = None
) -> Iterator[Intervener]:
    """Apply interventions inside a ``with`` block; everything is removed on exit, exception or not.

    >>> with intervene(layout, [Intervention(Site(10), Add(vec, 4.0))]):
    ...     model.generate(...)
    """
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    ivs = list(interventions)
    if not ivs:  # zero overhead: attach nothing at all
        yield Intervener(layout, [])
        return
    handle = Intervener(layout, ivs, prompt_width).attach()
    try:
        yield handle
    finally:
        handle.detach()


@contextmanager
def observe(layout: ModelLayout, observers: Iterable[Observer], stop_after: int | None = None) -> Iterator[Intervener]:
    """Run read-only ``observers`` at their sites inside a ``with`` block; removed on exit, exception or not.

    ``stop_after``: a block index; right after that block runs, the forward pass raises ``StopForward`` (catch it
    around the model call), so reading early layers costs only those layers.

    >>> seen = {}
    >>> with observe(layout, [Observer(Site(3), lambda h: seen.setdefault("h", h))], stop_after=3):
    ...     try:
    ...         model(input_ids)
    ...     except StopForward:
    ...         pass
    """
    handle = Intervener(layout, [], observers=list(observers), stop_after=stop_after).attach()
    try:
        yield handle
    finally:
        handle.detach()


@contextmanager
def intervene_and_observe(layout: ModelLayout, interventions: Sequence[Intervention], observers: Sequence[Observer] = (),
                          prompt_width: int | None = None) -> Iterator[Intervener]:
    """``intervene`` and ``observe`` in one block, the observers attached after the edits (so they read the edited
    activations); both removed on exit."""
    with intervene(layout, interventions, prompt_width) as handle:
        if not observers:
            yield handle
            return
        with observe(layout, observers):
            yield handle
