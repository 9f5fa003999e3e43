"""Steering decided once per prompt from the model's own reading of it (CAST conditions, learned controllers).

A ``PromptRule`` (``steer.conditional``: CAST conditions; ``steer.controller``: learned strength controllers)
reads the prompt (``Read``: a site, the mean or last of each row's real tokens) and returns, per edit site, one
direction and a per-row scale. ``prompt_interventions`` runs the reading pass, which stops right after the deepest
read site (so it costs ``(deepest + 1) / n_layers`` of one prefill), and turns the result into ordinary ``Add``
edits with per-row scales. Because the decision exists before the first generated token, every path that runs
per-row steering runs it unchanged, with or without the KV cache: batched ``generate`` (some rows steered, others
not), ``LocalBackend`` (one decision per prompt, kept with its encoded prompt), the server's scheduler (a decision
per request, made on the engine loop before its prefill). Token-by-token decisions: ``engine.token_gates``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import SteerscaleError
from ..models.layout import ModelLayout
from ..models.sites import Site, SiteKind
from .capture import Batch, Readout, read_raw, reduce_rows
from .ops import Add
from .runtime import Intervention
from .scope import ALL_TOKENS, TokenScope


# -- prompt-level rules ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Read:
    """One vector per prompt at ``site``: the mean over its real tokens, or its last token. ``prefix``: token ids
    of a fixed start (a chat template's system prompt and role header, ``steer.conditional.template_prefix``)
    that a mean leaves out when a row starts with them: they say nothing about the prompt and would dominate the mean. A row that
    does not start with them (a raw completion prompt, another system prompt) is averaged whole."""

    site: Site
    readout: Readout = Readout.MEAN
    prefix: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "readout", Readout(self.readout))
        if self.readout is Readout.ALL:
            raise SteerscaleError("a prompt rule reads one vector per prompt", "use readout 'mean' or 'last'")
        if not isinstance(self.site, Site) or self.site.kind is SiteKind.ROUTER:
            raise SteerscaleError(f"a prompt rule reads a residual, attention, MLP or head site, got {self.site!r}")
        try:
            prefix = tuple(int(t) for t in self.prefix)
        except (TypeError, ValueError):
            raise SteerscaleError(f"prefix must be token ids, got {self.prefix!r}") from None
        object.__setattr__(self, "prefix", prefix if self.readout is Readout.MEAN else ())

    def spans(self, batch: Batch) -> list[tuple[int, int]] | None:
        """Per row, the real-token span a mean reads: past the prefix when the row starts with it (and has more)."""
        if not self.prefix:
            return None
        k, out = len(self.prefix), []
        for ids, mask in zip(batch.input_ids.tolist(), batch.attention_mask.tolist()):
            real = [t for t, m in zip(ids, mask) if m]
            out.append((k, len(real)) if len(real) > k and tuple(real[:k]) == self.prefix else (0, len(real)))
        return out


class PromptRule(ABC):
    """Steering decided once per prompt. Subclasses say what they read (``reads``) and map the readings to
    per-row scales of fixed directions (``site_scales``)."""

    #: the token positions the resulting edits touch
    scope: TokenScope = ALL_TOKENS

    @property
    def preserve_norm(self) -> bool:
        """Whether the resulting edits rescale each steered vector to its original norm (a GrAInS direction)."""
        vector = getattr(self, "vector", None)
        return bool(getattr(vector, "preserve_norm", False))

    @property
    @abstractmethod
    def reads(self) -> tuple[Read, ...]: ...

    @abstractmethod
    def site_scales(self, readings: dict[Read, torch.Tensor]) -> dict[Site, tuple[torch.Tensor, torch.Tensor]]:
        """``readings``: ``{read: (rows, dim)}`` float32. Returns ``{edit site: (direction (dim,), scales
        (rows,))}``: row b gets ``scales[b] * direction`` added at that site (0: unsteered)."""

    def check(self, layout: ModelLayout) -> None:
        """Raise a ``SteerscaleError`` when the rule was made for another model (artifacts override this)."""


@torch.no_grad()
def read_prompts(model, layout: ModelLayout, batch: Batch,
                 rules: Sequence[PromptRule]) -> list[dict[Read, torch.Tensor]]:
    """Each rule's readings of ``batch``, from one forward pass stopped after the deepest site any rule reads."""
    reads = {r for rule in rules for r in rule.reads}
    raw = read_raw(model, layout, batch, sorted({r.site for r in reads}))
    got = {r: reduce_rows(raw[r.site], batch.attention_mask, r.readout, r.spans(batch)) for r in reads}
    return [{r: got[r] for r in rule.reads} for rule in rules]


def prompt_interventions(model, layout: ModelLayout, rules: Sequence[PromptRule], batch: Batch,
                         repeat: int = 1) -> tuple[list, list[dict[str, float]]]:
    """The rules' edits for the rows of ``batch`` (each row repeated ``repeat`` times, as ``num_return_sequences``
    expands them), and per row the scale each edit site got (``{"resid_post.12": 4.0}``; empty: unsteered)."""
    rules = list(rules)
    if not rules:
        return [], [{} for _ in range(batch.input_ids.shape[0] * repeat)]
    for rule in rules:
        if not isinstance(rule, PromptRule):
            raise SteerscaleError(f"expected a PromptRule (a CAST condition or a steering controller), got "
                                  f"{type(rule).__name__}", "pass conditional steering objects as rules=[...]")
        rule.check(layout)
    edits, rows = [], [{} for _ in range(batch.input_ids.shape[0] * repeat)]
    for rule, readings in zip(rules, read_prompts(model, layout, batch, rules)):
        for site, (direction, scales) in rule.site_scales(readings).items():
            scales = scales.float().repeat_interleave(repeat)
            if not torch.isfinite(scales).all():
                raise SteerscaleError(f"{type(rule).__name__} produced a non-finite scale at {site.key()}",
                                      "the rule's artifact is damaged or diverged; refit it")
            edits.append(Intervention(site, Add(direction, scales, preserve_norm=rule.preserve_norm), rule.scope))
            for b, s in enumerate(scales.tolist()):
                if s != 0.0:
                    rows[b][site.key()] = rows[b].get(site.key(), 0.0) + s
    return edits, rows
