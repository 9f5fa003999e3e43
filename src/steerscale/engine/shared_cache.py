"""Shared-cache decoding (Hogwild!): several workers generate at once over ONE KV cache, each seeing the others'
tokens as they are written.

Layout: one sequence (batch 1) and one ``DynamicCache``. Its columns are, in order of writing,

* the shared prompt ``shared`` (the token prefix every worker's prompt has in common), encoded once;
* each worker's private prompt suffix ``private[w]`` (e.g. "You are worker 2."), encoded in the same first pass;
* then, at every decoding step, one column per worker still generating: the token it sampled at that step.

A custom 4-D attention mask decides who reads what. A query of worker ``w`` attends to the shared prompt, its own
private suffix and its own tokens (causally), and -- with ``see_others`` -- to every token the other workers wrote
at earlier steps (never their private suffixes, never a token of the same step). Each worker has its own position
ids, ``len(shared) + len(private[w]) + t`` for its ``t``-th token: its own text is positioned exactly as in plain
generation, so one worker (or workers that do not see each other) decodes exactly as plain generation does, and the
others' tokens sit at the relative distances at which they were written. (Hogwild!'s "contiguous block" layout,
which shows each worker the others' text as contiguous blocks before its own, needs the keys of every block
rotated to a different offset for every reader: a custom attention kernel, not built here.)

Sliding-window layers get the same mask cut to keys within the window of the query's position (the cache keeps
every column: it is built without a config, so no layer drops old columns); models with mixed layers (Gemma 2/3)
get the ``{"full_attention", "sliding_attention"}`` mapping, as ``engine.choices`` packs them.

Token choice and acceptance are the decoding core's (``decode_rows``: ``sample_next``, ``RowCall.accept``);
``grant(live) -> k`` pays for the first ``k`` live workers of each step (a budget). ``on_model(fn)`` runs each
forward pass where the model lives (a server's engine thread); identity by default. No hooks are attached here:
steering is not applied to shared-cache decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import SteerscaleError
from ..models.threads import refresh as refresh_threads
from .choices import sliding_window
from .decoding import RowCall, SamplingParams, TokenRules, decode_rows
from .kvcache import cache_of, with_cache

SHARED = -1  # owner of the shared prompt's columns


@dataclass
class SharedResult:
    """Per worker: its ``RowCall`` (ids, log-probs, text), its ``FinishReason`` (None: it ran out of steps), and the
    decoding's totals."""

    calls: list[RowCall]
    ends: list
    steps: int  # forward passes after the prompt
    columns: int  # the shared cache's final length


class _Layout:
    """Who owns each cache column, at which step it was written, and at which position."""

    def __init__(self, model, dtype, device):
        self.owner: list[int] = []
        self.step: list[int] = []  # -1 for prompt columns
        self.pos: list[int] = []
        self.dtype, self.device = dtype, device
        self.window, self.mixed = sliding_window(model)

    def add(self, owner: int, step: int, pos: int) -> None:
        self.owner.append(owner)
        self.step.append(step)
        self.pos.append(pos)

    def mask(self, first: int, see_others: bool):
        """The additive mask ``(1, 1, q, k)`` of the queries at columns ``first..`` over every column so far."""
        owner = torch.tensor(self.owner)
        step = torch.tensor(self.step)
        pos = torch.tensor(self.pos)
        qo, qs, qp = owner[first:, None], step[first:, None], pos[first:, None]
        ko, ks, kp = owner[None], step[None], pos[None]
        col_q = torch.arange(first, len(self.owner))[:, None]
        col_k = torch.arange(len(self.owner))[None]
        causal = col_k <= col_q
        mine = (ko == qo) | (ko == SHARED)
        allowed = causal & mine
        if see_others:
            allowed |= (ks >= 0) & (qs >= 0) & (ks < qs)  # others' generated tokens of earlier steps
        full = self._additive(allowed)
        if not self.window:
            return full
        windowed = self._additive(allowed & ((qp - kp) < self.window))
        return {"full_attention": full, "sliding_attention": windowed} if self.mixed else windowed

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        m = torch.zeros(allowed.shape, dtype=self.dtype)
        return m.masked_fill_(~allowed, torch.finfo(self.dtype).min)[None, None].to(self.device)


def _new_cache():
    from transformers import DynamicCache

    return DynamicCache()  # no config: every layer keeps every column (the mask applies sliding windows)


def check_workers(shared: Sequence[int], private: Sequence[Sequence[int]]) -> None:
    if not private:
        raise SteerscaleError("shared-cache decoding needs at least one worker", "pass one private prompt per worker "
                              "(an empty list for none)")
    if not shared and any(not p for p in private):
        raise SteerscaleError("a worker has no prompt tokens at all (empty shared prompt and empty private suffix)",
                              "pass a non-empty prompt")


@torch.no_grad()
def shared_decode(model, tokens: TokenRules, shared: Sequence[int], private: Sequence[Sequence[int]],
                  params: SamplingParams, generator: torch.Generator, *, see_others: bool = True,
                  grant: Callable[[int], int] | None = None,
                  on_model: Callable | None = None) -> SharedResult:
    """Decode ``len(private)`` workers over one shared KV cache (see the module docstring). ``shared``: the prompt
    ids every worker reads; ``private[w]``: worker ``w``'s own prompt suffix (may be empty). Returns every worker's
    tokens and finish reason; the prompt is not charged here (the caller buys it before calling)."""
    check_workers(shared, private)
    run = on_model or (lambda fn: fn())
    n = len(private)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    lay = _Layout(model, dtype if dtype.is_floating_point else torch.float32, device)
    S = len(shared)
    ids = list(shared)
    for i in range(S):
        lay.add(SHARED, -1, i)
    last = []  # column of each worker's last prompt token
    for w, suffix in enumerate(private):
        for j, tok in enumerate(suffix):
            ids.append(int(tok))
            lay.add(w, -1, S + j)
        last.append(len(ids) - 1 if suffix else S - 1)
    next_pos = [S + len(p) for p in private]
    limit = tokens.limit(params, S + max(len(p) for p in private))
    state = {"cache": _new_cache(), "steps": 0}

    def forward(x: torch.Tensor, first: int, keep) -> torch.Tensor:
        refresh_threads(device)
        mask = lay.mask(first, see_others)
        pos = torch.tensor([lay.pos[first:]], device=device)

        def call():
            out = model(input_ids=x[None].to(device), attention_mask=mask, position_ids=pos,
                        **with_cache(model, state["cache"]), use_cache=True,
                        logits_to_keep=torch.tensor(keep, device=device))
            return out.logits[0].float(), cache_of(out)

        logits, state["cache"] = run(call)
        return logits

    logits = forward(torch.tensor(ids), 0, last)
    calls = [RowCall() for _ in range(n)]

    def step(inp: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
        """One forward pass over the tokens of the workers that took one (``fed``); the others' rows are
        placeholders that ``decode_rows`` replaces with their kept distributions."""
        state["steps"] += 1
        first = len(lay.owner)
        workers = [w for w in range(n) if bool(fed[w])]
        for w in workers:
            lay.add(w, state["steps"], next_pos[w])
            next_pos[w] += 1
        new = forward(inp[workers], first, list(range(len(workers))))
        out = new.new_zeros(n, new.shape[-1])
        out[workers] = new
        return out

    ends, _ = decode_rows(calls, logits, params, tokens, generator, step, limit=limit, steps=limit,
                          prompt_ids=[list(shared) + list(p) for p in private], grant=grant)
    return SharedResult(calls, ends, state["steps"], len(lay.owner))


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all of ``seqs`` share."""
    if not seqs:
        return 0
    k = min(len(s) for s in seqs)
    for i in range(k):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return k


__all__ = ["SharedResult", "check_workers", "common_prefix", "shared_decode"]
