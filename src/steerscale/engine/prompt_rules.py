"""Steering decided once per prompt from the model's own reading of it (CAST conditions, learned controllers).

A ``PromptRule`` (``steer.conditional``: CAST conditions; ``steer.controller``: learned strength controllers)
reads the prompt at ``read_sites`` (mean or last of each row's real tokens) and returns, per edit site, one
direction and a per-row scale. ``prompt_interventions`` runs the reading pass, which stops right after the deepest
read site (so it costs ``(deepest + 1) / n_layers`` of one prefill), and turns the result into ordinary ``Add``
edits with per-row scales. Because the decision exists before the first generated token, every path that runs
per-row steering runs it unchanged, with or without the KV cache: batched ``generate`` (some rows steered, others
not), ``LocalBackend`` (one decision per prompt, kept with its encoded prompt), the server's scheduler (a decision
per request, made on the engine loop before its prefill). Token-by-token decisions: ``engine.token_gates``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch

from ..errors import SteerscaleError
from ..models.layout import ModelLayout
from ..models.sites import Site
from .capture import Batch, Readout, read_batch
from .ops import Add
from .runtime import Intervention
from .scope import ALL_TOKENS, TokenScope


# -- prompt-level rules ------------------------------------------------------------------------------------------
class PromptRule(ABC):
    """Steering decided once per prompt. Subclasses say where they read (``read_sites``, ``readout``) and map the
    readings to per-row scales of fixed directions (``site_scales``)."""

    #: how a prompt's activations at a read site become one vector: mean over its real tokens, or its last token
    readout: Readout = Readout.MEAN
    #: the token positions the resulting edits touch
    scope: TokenScope = ALL_TOKENS

    @property
    @abstractmethod
    def read_sites(self) -> tuple[Site, ...]: ...

    @abstractmethod
    def site_scales(self, readings: dict[Site, torch.Tensor]) -> dict[Site, tuple[torch.Tensor, torch.Tensor]]:
        """``readings``: ``{read site: (rows, dim)}`` float32. Returns ``{edit site: (direction (dim,), scales
        (rows,))}``: row b gets ``scales[b] * direction`` added at that site (0: unsteered)."""

    def check(self, layout: ModelLayout) -> None:
        """Raise a ``SteerscaleError`` when the rule was made for another model (artifacts override this)."""


@torch.no_grad()
def read_prompts(model, layout: ModelLayout, batch: Batch, rules: Sequence[PromptRule]) -> list[dict[Site, torch.Tensor]]:
    """Each rule's readings of ``batch`` (one reading pass for all rules and readouts, stopped after the deepest
    read site)."""
    sites = sorted({s for r in rules for s in r.read_sites})
    readouts = {Readout(r.readout) for r in rules}
    got = read_batch(model, layout, batch, sites, tuple(readouts))
    return [{s: got[Readout(r.readout)][s] for s in r.read_sites} for r in rules]


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
