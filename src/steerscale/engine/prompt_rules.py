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
from ..models.sites import Site
from .capture import Batch, Readout, read_batch, tokenize
from .ops import Add
from .runtime import Intervention
from .scope import ALL_TOKENS, TokenScope


# -- prompt-level rules ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Read:
    """One vector per prompt at ``site``: the mean over its real tokens after the first ``skip``, or its last
    token. ``skip`` leaves out a fixed prefix every prompt shares (a chat template's system prompt and role header,
    ``shared_prefix`` measures it): it says nothing about the prompt and would dominate the mean."""

    site: Site
    readout: Readout = Readout.MEAN
    skip: int = 0

    def __post_init__(self):
        object.__setattr__(self, "readout", Readout(self.readout))
        if self.readout is Readout.ALL:
            raise SteerscaleError("a prompt rule reads one vector per prompt", "use readout 'mean' or 'last'")
        if not isinstance(self.skip, int) or self.skip < 0:
            raise SteerscaleError(f"skip must be a non-negative number of tokens, got {self.skip!r}")
        if self.readout is Readout.LAST:
            object.__setattr__(self, "skip", 0)


class PromptRule(ABC):
    """Steering decided once per prompt. Subclasses say what they read (``reads``) and map the readings to
    per-row scales of fixed directions (``site_scales``)."""

    #: the token positions the resulting edits touch
    scope: TokenScope = ALL_TOKENS

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
def read_prompts(model, layout: ModelLayout, batch: Batch, rules: Sequence[PromptRule]) -> list[dict[Read, torch.Tensor]]:
    """Each rule's readings of ``batch``: one reading pass (stopped after the deepest site read) per number of
    skipped leading tokens among the reads, which is one pass in practice."""
    reads = {r for rule in rules for r in rule.reads}
    lengths = batch.attention_mask.sum(-1).tolist()
    got: dict[Read, torch.Tensor] = {}
    for skip in sorted({r.skip for r in reads}):
        group = [r for r in reads if r.skip == skip]
        spans = [(min(skip, n - 1), n) for n in lengths] if skip else None  # a short prompt keeps its last token
        out = read_batch(model, layout, batch, sorted({r.site for r in group}), tuple({r.readout for r in group}),
                         spans)
        got.update({r: out[r.readout][r.site] for r in group})
    return [{r: got[r] for r in rule.reads} for rule in rules]


def shared_prefix(tokenizer, texts: Sequence[str]) -> int:
    """How many leading tokens all ``texts`` share (at most the shortest one's length minus one): with a chat
    template, the system prompt and role header before the user's words."""
    ids = [tokenize(tokenizer, [t], "cpu").input_ids[0].tolist() for t in texts]
    n = 0
    while all(len(x) > n + 1 for x in ids) and len({x[n] for x in ids}) == 1:
        n += 1
    return n


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
            edits.append(Intervention(site, Add(direction, scales), rule.scope))
            for b, s in enumerate(scales.tolist()):
                if s != 0.0:
                    rows[b][site.key()] = rows[b].get(site.key(), 0.0) + s
    return edits, rows
