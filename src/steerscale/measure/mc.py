"""Fast log-likelihood scoring of multiple-choice continuations.

The model-level scorer lives in the engine (``engine.choices``): the question is encoded once and all its
choices ride in the same row behind it ("shared prompt" packing, with a block attention mask and position ids
that restart after the prompt), so every choice is scored exactly as if it followed the prompt alone. This
module batches questions for it (several questions per forward pass, rows sorted by length to limit padding)
and turns the sums into per-question results. Its names (``Item``, ``encode``, ``build_items``,
``choice_logprob_sums``, ``sliding_window``) are re-exported here for existing callers.

``method="padded"`` is the conventional layout (one left-padded row per choice, position ids from the
attention mask); ``batch_rows=1`` with it is the one-sequence-at-a-time baseline used by ``bench/eval_speed.py``.

Steering: pass ``interventions`` (or wrap the call in ``steerscale.intervene``). The runtime sees one forward
per batch and treats the whole input as "prompt", so use token scope ``all`` (the default) when scoring.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..engine.choices import (  # noqa: F401 (re-exported: callers import the scorer's names from here)
    Item, build_items, choice_logprob_sums, encode, head_is_separable, padded_logprob_sums, sliding_window,
)
from ..engine.runtime import intervene
from ..errors import SteerscaleError

_head_is_separable = head_is_separable  # the name before the scorer moved to engine.choices


def _batches(items: Sequence[Item], method: str, max_tokens: int, max_rows: int):
    """Index groups, sorted by length so a batch holds similar widths; bounded by padded tokens and rows."""
    size = (lambda it: it.packed_len) if method == "shared" else (lambda it: len(it.prompt) + max(map(len, it.choices)))
    nrows = (lambda it: 1) if method == "shared" else (lambda it: len(it.choices))
    order = sorted(range(len(items)), key=lambda i: size(items[i]))
    group, width, rows = [], 0, 0
    for i in order:
        w, r = max(width, size(items[i])), rows + nrows(items[i])
        if group and (w * r > max_tokens or r > max_rows):
            yield group
            group, w, r = [], size(items[i]), nrows(items[i])
        group.append(i)
        width, rows = w, r
    if group:
        yield group


@torch.no_grad()
def score_items(model, items: Sequence[Item], method: str = "shared", max_tokens: int = 4096, max_rows: int = 64,
                pad_id: int = 0, progress: bool = False, logit_contrast=None, layout=None) -> list[dict]:
    """Per question: ``logprobs`` (sum over the choice's tokens), ``mean_logprobs`` and ``n_tokens``. With
    ``logit_contrast`` (and ``layout``) each token is scored by the early-layer contrast (DoLa / VISTA)."""
    if method not in ("shared", "padded"):
        raise SteerscaleError(f"unknown scoring method {method!r}", "use 'shared' or 'padded'")
    results: list[dict | None] = [None] * len(items)
    groups = list(_batches(items, method, max_tokens, max_rows))
    # padded: a plain forward per (question, choice), the reference the packed path is tested against
    sums_of = choice_logprob_sums if method == "shared" else padded_logprob_sums
    for group in tqdm(groups, desc=f"scoring choices ({method})", disable=not progress, unit="batch"):
        chunk = [items[i] for i in group]
        sums = sums_of(model, chunk, pad_id, logit_contrast, layout).tolist()
        for b, i in enumerate(group):
            n_tok = [len(c) for c in items[i].choices]
            per = sums[b][: len(n_tok)]
            results[i] = {"logprobs": per, "mean_logprobs": [s / n for s, n in zip(per, n_tok)],
                          "n_tokens": n_tok, "prompt_tokens": len(items[i].prompt)}
    return results


def score_choices(model, tokenizer, questions: Sequence[str], choices: Sequence[Sequence[str]], interventions=(),
                  layout=None, chat: bool | None = None, method: str = "shared", max_tokens: int = 4096,
                  max_rows: int = 64, progress: bool = False, system: str | None = None,
                  logit_contrast=None) -> list[dict]:
    """Log-likelihood of each choice given its (chat-templated) question, under optional interventions, an
    optional system prompt and an optional early-layer logit contrast (``engine.logit_contrast``)."""
    items = build_items(tokenizer, questions, choices, chat, system)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    interventions = list(interventions)
    if (interventions or logit_contrast is not None) and layout is None:
        raise SteerscaleError("interventions and logit contrast need the model layout", "pass layout=lm.layout")
    with intervene(layout, interventions):  # nothing attached when there are none
        return score_items(model, items, method, max_tokens, max_rows, pad, progress, logit_contrast, layout)


def score_choices_remote(backend, questions: Sequence[str], choices: Sequence[Sequence[str]],
                         budget=None) -> list[dict]:
    """``score_choices`` through a server: the same per-question dicts (``logprobs``, ``mean_logprobs``,
    ``n_tokens``, ``prompt_tokens``) from ``backend.loglikelihood`` (an ``OpenAIBackend``), so the task's metrics
    (``acc`` on the sums, ``acc_norm`` on the per-token means, ``acc_per_char``, ``mc2``) are computed as for a
    local run. The context is formatted client-side as ``build_items`` formats it (``backend.format``: the chat
    template when the backend applies one) and each choice follows it as locally: right after a chat template, or
    after a space unless the prompt ends in whitespace. The server tokenizes context + choice in one piece, so
    ``n_tokens`` are its token counts (equal to the local ones when no token spans the boundary)."""
    if not hasattr(backend, "loglikelihood"):
        raise SteerscaleError(f"{type(backend).__name__} cannot score log-likelihoods",
                              "pass an OpenAIBackend of a server, or score with the local model")
    requests, spans = [], []
    for q, chs in zip(questions, choices, strict=True):
        if not chs:
            raise SteerscaleError(f"question {q[:60]!r} has no choices")
        context = backend.format(q)
        sep = "" if backend.templated or context.endswith((" ", "\n")) else " "
        start = len(requests)
        for c in chs:
            if not str(c):
                raise SteerscaleError(f"question {q[:60]!r} has an empty choice", "choices must be non-empty text")
            requests.append((context, sep + str(c)))
        spans.append((start, len(requests)))
    got = backend.loglikelihood(requests, budget)
    out = []
    for start, stop in spans:
        per = [g.logprob for g in got[start:stop]]
        n_tok = [g.n_tokens for g in got[start:stop]]
        out.append({"logprobs": per, "mean_logprobs": [s / n for s, n in zip(per, n_tok)], "n_tokens": n_tok,
                    "prompt_tokens": got[start].n_context})
    return out
