"""The cost side of an intervention, measured beside every effect.

* KL divergence ``KL(P_base || P_steered)`` of the next-token distributions at every real token of neutral
  texts: how much the intervention disturbs the model where it should not matter.
* Perplexity of the same neutral texts with and without the intervention.

Both come from two forward passes per batch (unsteered, steered). The neutral set ships with the package
(``steerscale/data/neutral_prompts.jsonl``: 30 plain statements and 10 ordinary requests).
"""

from __future__ import annotations

import json
import math
from importlib import resources
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..engine.capture import tokenize
from ..engine.generation import format_prompt
from ..engine.logit_contrast import MASKED, EarlyReader, LogitContrast, check_layout, contrast_hidden
from ..engine.prompt_rules import prompt_interventions
from ..engine.runtime import intervene
from ..errors import SteerscaleError
from .stats import bootstrap_ci


def neutral_prompts() -> list[str]:
    """The shipped neutral texts."""
    text = resources.files("steerscale").joinpath("data/neutral_prompts.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]


@torch.no_grad()
def _logprobs(model, batch, early: EarlyReader | None = None) -> torch.Tensor:
    if early is None:
        return model(**batch.model_inputs(), use_cache=False).logits.float().log_softmax(-1)
    with early.reading():
        logits = model(**batch.model_inputs(), use_cache=False).logits
    flat = logits.reshape(-1, logits.shape[-1])
    scores = contrast_hidden(model, early.layout, early.spec, flat, [h.reshape(flat.shape[0], -1) for h in early.at()])
    return scores.view(logits.shape)


def _exp(x: float) -> float:
    """``e ** x``, or inf past float range: a logit contrast's plausibility mask gives the tokens it masks a
    log-prob near -1e4, so a neutral text that uses one has an astronomically large perplexity under it."""
    return math.exp(x) if x < 700 else float("inf")


@torch.no_grad()
def steering_cost(model, tokenizer, layout, interventions, texts: Sequence[str] | None = None, batch_size: int = 8,
                  progress: bool = False, seed: int = 0, rules: Sequence = (), prompt_width: int | None = None,
                  chat: bool = False, logit_contrast=None) -> dict:
    """KL and perplexity change on neutral ``texts`` (default: the shipped set), per text and with intervals.

    Returns ``{"kl": Estimate-dict (mean per-token KL in nats, averaged per text), "ppl_base", "ppl_steered",
    "ppl_ratio", "nll_delta": Estimate-dict, "n_texts", "n_tokens"}``. Plain text (no chat template): the
    question is how the model's language modelling changes, not one reply. ``rules``: conditional steering
    (``engine.prompt_rules``) decided per text, as generation decides it per prompt. ``prompt_width``: where the
    "prompt" of each text ends for scoped and token-gated edits (1: every later token counts as generated).
    ``chat``: send each text as a user message (chat template applied), as a conditional rule fitted on chat
    prompts sees requests; the KL then covers the template's tokens too. ``logit_contrast``: the steered
    distribution is the early-layer contrast (``engine.logit_contrast``), with the interventions (if any) active.
    ``kl_reverse`` is KL(P_steered || P_base). DoLa's plausibility mask gives the tokens it drops a log-prob near
    ``MASKED`` (-1e4), so under a contrast with ``alpha > 0`` ``kl`` and the perplexity are dominated by the mask
    (``masked_share``: the share of the texts' next tokens it drops); ``kl_reverse`` stays finite and comparable.
    """
    texts = list(texts) if texts is not None else neutral_prompts()
    if not texts:
        raise SteerscaleError("no neutral texts for the cost measurement")
    if chat:
        texts = [format_prompt(tokenizer, t, chat=True) for t in texts]
    interventions = list(interventions)
    early = None
    if logit_contrast is not None:
        early = EarlyReader(layout, LogitContrast.parse(logit_contrast), model=model)
        check_layout(layout, early.spec)
    device = next(model.parameters()).device
    kl_per_text, rkl_per_text, nll_base, nll_steer, n_tok, n_masked = [], [], [], [], 0, 0
    starts = range(0, len(texts), batch_size)
    for s in tqdm(starts, desc="cost (KL, perplexity)", disable=not progress, unit="batch"):
        batch = tokenize(tokenizer, texts[s : s + batch_size], device)
        base = _logprobs(model, batch)
        decided, _ = prompt_interventions(model, layout, rules, batch)
        with intervene(layout, list(interventions) + decided, prompt_width=prompt_width):
            steer = _logprobs(model, batch, early)
        mask = batch.attention_mask.bool()
        valid = mask[:, :-1] & mask[:, 1:]  # positions that predict a real next token
        kl = (base.exp() * (base - steer)).sum(-1)[:, :-1]  # (B, T-1)
        rkl = (steer.exp() * (steer - base)).nan_to_num(0.0).sum(-1)[:, :-1]  # finite where the steered side masks
        tgt = batch.input_ids[:, 1:, None]
        nb = -base[:, :-1].gather(-1, tgt)[..., 0]
        ns = -steer[:, :-1].gather(-1, tgt)[..., 0]
        for r in range(kl.shape[0]):
            v = valid[r]
            if not v.any():
                continue
            kl_per_text.append(float(kl[r][v].mean()))
            rkl_per_text.append(float(rkl[r][v].mean()))
            n_masked += int((ns[r][v] > -MASKED / 2).sum())
            nll_base.append(float(nb[r][v].mean()))
            nll_steer.append(float(ns[r][v].mean()))
            n_tok += int(v.sum())
    if not kl_per_text:
        raise SteerscaleError("the neutral texts are all one token long", "use longer texts")
    mb, ms = sum(nll_base) / len(nll_base), sum(nll_steer) / len(nll_steer)
    return {
        "kl": bootstrap_ci(kl_per_text, seed=seed).to_dict(),
        "kl_reverse": bootstrap_ci(rkl_per_text, seed=seed).to_dict(),
        **({"masked_share": n_masked / max(n_tok, 1)} if early is not None else {}),
        "nll_delta": bootstrap_ci([s - b for s, b in zip(nll_steer, nll_base)], seed=seed).to_dict(),
        "ppl_base": _exp(mb), "ppl_steered": _exp(ms), "ppl_ratio": _exp(ms - mb),
        "n_texts": len(kl_per_text), "n_tokens": n_tok,
    }
