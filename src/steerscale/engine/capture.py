"""Activation capture: read the vectors at any sites for a batch of texts, padding handled.

Readouts (``Readout``): the last real token, the mean over all real tokens, the mean over a token span per
text (e.g. the completion after a prompt), or every real token. Reading goes through the hook runtime's
observers (``engine.runtime.observe``), and the forward pass stops right after the deepest block that is read,
so reading early layers costs only those layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..errors import SteerscaleError
from ..models.layout import ModelLayout
from ..models.sites import Site, SiteKind
from ..models.threads import refresh as refresh_threads
from .runtime import Observer, StopForward, observe


class Readout(str, Enum):
    LAST = "last"  # the last real token of each text
    MEAN = "mean"  # mean over real tokens (or over `spans` when given)
    ALL = "all"  # every real token: a list of (n_tokens, dim) tensors


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def model_inputs(self) -> dict:
        """Inputs for a plain forward pass. Position ids count real tokens only, so a left-padded row gets the
        same absolute positions as it would alone (models with learned position embeddings need this)."""
        position_ids = (self.attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": position_ids}


def tokenize(tokenizer, texts: Sequence[str], device, add_special_tokens: bool | None = None) -> Batch:
    """Left/right padding as the tokenizer is set. ``add_special_tokens=None``: add them unless the texts already
    start with the BOS token (chat templates write it themselves; adding it twice shifts every activation)."""
    if not texts:
        raise SteerscaleError("no texts to process")
    if any(not isinstance(t, str) or t == "" for t in texts):
        raise SteerscaleError("empty prompt", "every text must be a non-empty string")
    if add_special_tokens is None:
        bos = getattr(tokenizer, "bos_token", None)
        add_special_tokens = not (bos and all(t.startswith(bos) for t in texts))
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    return Batch(enc["input_ids"].to(device), enc["attention_mask"].to(device))


def _reduce(h: torch.Tensor, mask: torch.Tensor, readout: Readout, spans) -> torch.Tensor | list[torch.Tensor]:
    """h: (B, T, D); mask: (B, T) real-token mask. Spans are (start, end) in real-token indices."""
    h = h.float()
    if readout is Readout.ALL:
        return [h[b][mask[b].bool()].cpu() for b in range(h.shape[0])]
    if readout is Readout.LAST:
        # With left padding the last column is real; with right padding take the last real index.
        idx = mask.shape[1] - 1 - mask.flip(-1).long().argmax(-1)
        return h[torch.arange(h.shape[0]), idx].cpu()
    weights = mask.float()
    if spans is not None:
        real_idx = mask.long().cumsum(-1) - 1
        starts = torch.tensor([s for s, _ in spans], device=h.device)[:, None]
        ends = torch.tensor([e for _, e in spans], device=h.device)[:, None]
        weights = weights * ((real_idx >= starts) & (real_idx < ends)).float()
        if (weights.sum(-1) == 0).any():
            raise SteerscaleError("a capture span selects no tokens", "check the (start, end) spans against the texts")
    return ((h * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)).cpu()


@torch.no_grad()
def capture(
    model,
    tokenizer,
    layout: ModelLayout,
    texts: Sequence[str],
    sites: Sequence[Site],
    readout: Readout | str = Readout.LAST,
    spans: Sequence[tuple[int, int]] | None = None,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "capturing activations",
) -> dict[Site, torch.Tensor | list[torch.Tensor]]:
    """Activations at ``sites`` for each text: ``{site: (n_texts, dim)}`` (or lists of tensors for ``all``)."""
    readout = Readout(readout)
    sites = list(dict.fromkeys(sites))
    if not sites:
        raise SteerscaleError("no sites to capture")
    if spans is not None and len(spans) != len(texts):
        raise SteerscaleError(f"{len(spans)} spans for {len(texts)} texts", "give one (start, end) span per text")
    if any(s.kind is SiteKind.ROUTER for s in sites):
        raise SteerscaleError("router logits are not captured per token yet", "capture mlp_out or resid sites")
    device = next(model.parameters()).device
    results: dict[Site, list] = {s: [] for s in sites}
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = tokenize(tokenizer, list(texts[start : start + batch_size]), device)
        chunk_spans = spans[start : start + batch_size] if spans is not None else None
        for s, reduced in read_batch(model, layout, batch, sites, (readout,), chunk_spans)[readout].items():
            results[s].extend(reduced) if readout is Readout.ALL else results[s].append(reduced)
    return {s: (v if readout is Readout.ALL else torch.cat(v)) for s, v in results.items()}


@torch.no_grad()
def read_batch(model, layout: ModelLayout, batch: Batch, sites: Sequence[Site],
               readouts: Sequence[Readout] = (Readout.LAST,), spans: Sequence[tuple[int, int]] | None = None) -> dict[Readout, dict[Site, torch.Tensor]]:
    """One forward pass of an encoded ``batch`` that stops after the deepest site read: ``{readout: {site: rows}}``
    for each readout asked for (``capture`` for texts)."""
    raw = read_raw(model, layout, batch, sites)
    return {Readout(r): {s: reduce_rows(raw[s], batch.attention_mask, Readout(r), spans) for s in sites}
            for r in readouts}


@torch.no_grad()
def read_raw(model, layout: ModelLayout, batch: Batch, sites: Sequence[Site]) -> dict[Site, torch.Tensor]:
    """The ``(batch, seq, dim)`` activations at ``sites`` from one forward pass stopped after the deepest of them
    (``engine.prompt_rules`` reduces them per rule)."""
    if any(s.kind is SiteKind.ROUTER for s in sites):
        raise SteerscaleError("router logits are not read per token here", "read mlp_out or resid sites")
    refresh_threads(batch.input_ids.device)  # fewer threads while other jobs hold cores (models/threads.py)
    current: dict[Site, torch.Tensor] = {}
    with observe(layout, [Observer(s, partial(current.__setitem__, s)) for s in sites],
                 stop_after=max(s.layer for s in sites)):
        try:
            model(**batch.model_inputs(), use_cache=False)
        except StopForward:
            pass
    return current


reduce_rows = _reduce  # public name: one vector (or token list) per row of (batch, seq, dim) activations
