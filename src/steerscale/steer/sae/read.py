"""Reading SAE features: which fire on each token of a prompt, the contexts that excite a feature most, which
features separate two sets of texts (contrastive pairs or two prompt files), what a feature does to the logits,
and how much of the model's loss the SAE keeps when spliced in.

All activations are read through the capture engine (observers; the forward pass stops after the SAE's block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ...engine.capture import Readout, capture, tokenize
from ...engine.runtime import Intervention, intervene
from ...errors import SteerscaleError
from ...models.loading import LoadedModel
from ..extract import pair_texts
from ..pairs import as_pairs
from .core import SAE
from .edits import Splice


def _tokens(tokenizer, text: str) -> list[str]:
    """The real tokens of ``text`` as strings, as ``capture`` tokenizes it."""
    batch = tokenize(tokenizer, [text], "cpu")
    ids = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    return [tokenizer.decode([i]) for i in ids]


@torch.no_grad()
def feature_acts(lm: LoadedModel, sae: SAE, texts: Sequence[str], batch_size: int = 16,
                 progress: bool = False) -> list[torch.Tensor]:
    """Per text, ``(n_tokens, d_sae)`` feature activations of its real tokens."""
    sae.check(lm.layout)
    rows = capture(lm.model, lm.tokenizer, lm.layout, list(texts), [sae.site], Readout.ALL, batch_size=batch_size,
                   progress=progress, desc="reading features")[sae.site]
    return [sae.encode(r) for r in rows]


def top_features(lm: LoadedModel, sae: SAE, text: str, k: int = 5) -> list[dict]:
    """For each token of ``text``: ``{"token", "features": [(index, activation), ...]}``, the ``k`` strongest."""
    acts = feature_acts(lm, sae, [text])[0]
    tokens = _tokens(lm.tokenizer, text)
    out = []
    for tok, row in zip(tokens, acts):
        values, idx = row.topk(min(k, row.shape[0]))
        out.append({"token": tok, "features": [(int(i), float(v)) for v, i in zip(values, idx) if v > 0]})
    return out


def max_activating(lm: LoadedModel, sae: SAE, feature: int, texts: Sequence[str], top: int = 10, window: int = 8,
                   batch_size: int = 16, progress: bool = True) -> list[dict]:
    """The ``top`` tokens over ``texts`` where ``feature`` is largest: ``{"activation", "text", "token",
    "left", "right"}`` with ``window`` tokens of context either side."""
    sae.check_feature(feature)
    acts = feature_acts(lm, sae, texts, batch_size, progress)
    best: list[tuple[float, int, int]] = []
    for t, a in enumerate(acts):
        col = a[:, feature]
        if col.numel():
            v, i = col.max(0)
            best.append((float(v), t, int(i)))
    best.sort(reverse=True)
    out = []
    for value, t, i in best[:top]:
        if value <= 0:
            break
        toks = _tokens(lm.tokenizer, texts[t])
        out.append({"activation": value, "text": t, "token": toks[i], "left": "".join(toks[max(0, i - window):i]),
                    "right": "".join(toks[i + 1:i + 1 + window])})
    return out


@dataclass
class FeatureScore:
    feature: int
    separation: float  # Cohen's d of the per-text mean activation, positive minus negative side
    mean_positive: float
    mean_negative: float
    fires_positive: float  # share of positive texts where it fires at all
    fires_negative: float


def _mean_over(acts: list[torch.Tensor], spans) -> torch.Tensor:
    rows = []
    for a, (s, e) in zip(acts, spans):
        seg = a[s:e] if e > s else a
        rows.append(seg.mean(0) if seg.shape[0] else torch.zeros(a.shape[-1]))
    return torch.stack(rows)


def _separation(pos: torch.Tensor, neg: torch.Tensor, pos_any: torch.Tensor, neg_any: torch.Tensor,
                top: int) -> list[FeatureScore]:
    diff = pos.mean(0) - neg.mean(0)
    pooled = ((pos.var(0, unbiased=True) + neg.var(0, unbiased=True)) / 2).sqrt()
    d = diff / (pooled + 1e-3 * (pooled.mean() + 1e-8))  # a feature silent on one side still ranks finite
    order = d.abs().argsort(descending=True)[:top]
    return [FeatureScore(int(i), float(d[i]), float(pos[:, i].mean()), float(neg[:, i].mean()),
                         float(pos_any[:, i].float().mean()), float(neg_any[:, i].float().mean())) for i in order]


def search_features(lm: LoadedModel, sae: SAE, pairs=None, positive: Sequence[str] | None = None,
                    negative: Sequence[str] | None = None, top: int = 10, chat: bool | None = None,
                    batch_size: int = 16, progress: bool = True) -> list[FeatureScore]:
    """Features that separate two sets of texts, ranked by |Cohen's d| of each text's mean activation: contrastive
    ``pairs`` (a JSONL path, dicts or ``ContrastPair`` list; the completions' tokens are read, not the prompt), or
    two text lists ``positive`` / ``negative`` (every token read). A positive ``separation`` fires more on the
    positive side."""
    if (pairs is None) == (positive is None or negative is None):
        raise SteerscaleError("search features by contrastive pairs or by two text sets, not both (or neither)",
                              "pass pairs=..., or positive=[...] and negative=[...]")
    if pairs is not None:
        texts = pair_texts(lm.tokenizer, as_pairs(pairs, "feature search"), chat)
        pos_t, neg_t, pos_s, neg_s = texts.positive, texts.negative, texts.positive_spans, texts.negative_spans
    else:
        pos_t, neg_t = list(positive), list(negative)
        if min(len(pos_t), len(neg_t)) < 2:
            raise SteerscaleError("feature search needs at least 2 texts on each side")
        pos_s = neg_s = None
    acts = feature_acts(lm, sae, pos_t + neg_t, batch_size, progress)
    pa, na = acts[:len(pos_t)], acts[len(pos_t):]
    pos_s = pos_s or [(0, a.shape[0]) for a in pa]
    neg_s = neg_s or [(0, a.shape[0]) for a in na]
    fires = lambda xs, spans: torch.stack([(a[s:e] > 0).any(0) for a, (s, e) in zip(xs, spans)])  # noqa: E731
    return _separation(_mean_over(pa, pos_s), _mean_over(na, neg_s), fires(pa, pos_s), fires(na, neg_s), top)


@torch.no_grad()
def logit_effect(lm: LoadedModel, sae: SAE, feature: int, top: int = 10) -> dict:
    """The tokens a feature's decoder direction promotes and suppresses most through the unembedding (the direct
    path, as Neuronpedia lists it; the final norm is not applied)."""
    direction = sae.output_direction(sae.check_feature(feature))
    unembed = lm.model.get_output_embeddings()
    if unembed is None:
        raise SteerscaleError("this model has no output embedding to read logit effects through")
    w = unembed.weight.detach().float()
    if w.shape[1] != direction.shape[0]:
        raise SteerscaleError(f"the unembedding reads {w.shape[1]}-wide vectors but the SAE writes {direction.shape[0]}",
                              "logit effects need an SAE on a residual-width site")
    logits = w @ direction
    up, down = logits.topk(top), (-logits).topk(top)
    word = lambda i: lm.tokenizer.decode([int(i)])  # noqa: E731
    return {"promoted": [(word(i), float(v)) for v, i in zip(*up)],
            "suppressed": [(word(i), -float(v)) for v, i in zip(*down)]}


@torch.no_grad()
def spliced_loss(lm: LoadedModel, sae: SAE, texts: Sequence[str], batch_size: int = 8, progress: bool = False) -> dict:
    """The model's next-token loss (nats/token) on ``texts`` as it is, with the SAE's reconstruction spliced in at
    its site, and with the site's activation replaced by its mean over the texts (the floor "loss recovered"
    is read against: ``(mean_ablated - spliced) / (mean_ablated - clean)``)."""
    sae.check(lm.layout)
    acts = capture(lm.model, lm.tokenizer, lm.layout, list(texts), [sae.site], Readout.MEAN,
                   batch_size=batch_size)[sae.site]
    mean = acts.mean(0)
    from ...engine.ops import Lambda

    mean_ablate = Lambda(lambda h: torch.zeros_like(h) + mean.to(h.dtype).to(h.device), sae.d_in)
    totals = {"clean": 0.0, "spliced": 0.0, "mean_ablated": 0.0}
    n_tok = 0
    for start in range(0, len(texts), batch_size):
        batch = tokenize(lm.tokenizer, list(texts[start:start + batch_size]), next(lm.model.parameters()).device)
        target = batch.input_ids[:, 1:]
        mask = batch.attention_mask[:, 1:].bool() & batch.attention_mask[:, :-1].bool()
        n_tok += int(mask.sum())
        for name, edit in (("clean", None), ("spliced", Splice(sae)), ("mean_ablated", mean_ablate)):
            with intervene(lm.layout, [Intervention(sae.site, edit)] if edit else []):
                logits = lm.model(**batch.model_inputs(), use_cache=False).logits[:, :-1].float()
            nll = -logits.log_softmax(-1).gather(-1, target[..., None])[..., 0]
            totals[name] += float(nll[mask].sum())
    out = {k: v / n_tok for k, v in totals.items()}
    gap = out["mean_ablated"] - out["clean"]
    out["loss_recovered"] = (out["mean_ablated"] - out["spliced"]) / gap if gap > 0 else math.nan
    out["n_tokens"] = n_tok
    return out
