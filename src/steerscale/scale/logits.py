"""OpenAI/vLLM sampling extras as logits processors, shared by ``LocalBackend`` and the server's scheduler.

``process_logits`` applies, in vLLM's order, the processors that change logits before temperature:

1. ``logit_bias``: ``bias`` added to each listed token's logit;
2. EOS masks: EOS ids set to ``-inf`` for the whole generation (``ignore_eos``) or while a row has generated fewer
   than ``min_tokens`` tokens;
3. penalties: ``repetition_penalty`` (HF/vLLM: a token seen in the prompt or the output so far has a positive
   logit divided by it, a negative one multiplied by it), then ``frequency_penalty`` and ``presence_penalty``
   (OpenAI, over the output so far: ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``).

The truncations ``top_k`` and ``min_p`` act on the tempered distribution at sampling time
(``LocalBackend.choose``). With none of the processors active (``SamplingParams.has_processors`` false) the
logits come back as the same tensor, untouched, so the common path costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import chain

import torch

from ..errors import SteerscaleError
from .backend import SamplingParams


def _rows_index(ids: Sequence[Sequence[int]], vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row, token)`` index tensors of every id in the per-row lists ``ids`` (ids outside the vocab dropped)."""
    tokens = torch.tensor(list(chain.from_iterable(ids)), dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor([len(r) for r in ids], dtype=torch.long))
    keep = (tokens >= 0) & (tokens < vocab)
    return rows[keep].to(device), tokens[keep].to(device)


def _counts(ids: Sequence[Sequence[int]], shape, device) -> torch.Tensor:
    """``(rows, vocab)`` float count of each token id in each row's list."""
    rows, tokens = _rows_index(ids, shape[1], device)
    counts = torch.zeros(shape, dtype=torch.float32, device=device)
    return counts.index_put_((rows, tokens), torch.ones(len(tokens), device=device), accumulate=True)


def _check_rows(name: str, ids, n_rows: int) -> None:
    if ids is not None and len(ids) != n_rows:
        raise SteerscaleError(f"process_logits: {name} has {len(ids)} rows but the logits have {n_rows}",
                              "pass one list of token ids per row of logits")


def process_logits(logits: torch.Tensor, params: SamplingParams, *, eos_ids: Iterable[int] = (),
                   prompt_ids: Sequence[Sequence[int]] | None = None,
                   output_ids: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """``logits`` (rows, vocab) after ``params``' logit bias, EOS masks and penalties (see the module docstring).

    ``eos_ids``: the ids ``min_tokens``/``ignore_eos`` mask. ``prompt_ids`` / ``output_ids``: per row, the prompt's
    token ids and the ids generated so far (all of them, over every step); ``None`` means none (an empty prompt
    for the repetition penalty, no generated tokens for the penalties and ``min_tokens``). Returns ``logits``
    itself when no processor is active, else a new tensor (the input is never modified)."""
    if not params.has_processors:
        return logits
    n_rows, vocab = logits.shape
    _check_rows("prompt_ids", prompt_ids, n_rows)
    _check_rows("output_ids", output_ids, n_rows)
    device = logits.device
    out = logits.clone()
    if params.logit_bias:
        ids = [i for i, _ in params.logit_bias]
        if ids[-1] >= vocab:  # sorted by id
            raise SteerscaleError(f"logit_bias names token {ids[-1]}, but the model's vocabulary has {vocab} tokens",
                                  f"use token ids in 0..{vocab - 1}")
        bias = torch.tensor([b for _, b in params.logit_bias], dtype=out.dtype, device=device)
        out[:, torch.tensor(ids, device=device)] += bias
    eos = [i for i in eos_ids if 0 <= i < vocab]
    if eos and (params.ignore_eos or params.min_tokens):
        if params.ignore_eos:
            rows = torch.ones(n_rows, dtype=torch.bool, device=device)
        else:
            done = [len(o) for o in output_ids] if output_ids is not None else [0] * n_rows
            rows = torch.tensor([d < params.min_tokens for d in done], device=device)
        eos_t = torch.tensor(eos, device=device)
        out[:, eos_t] = out[:, eos_t].masked_fill(rows[:, None], -torch.inf)
    penalties = params.repetition_penalty != 1 or params.frequency_penalty or params.presence_penalty
    counts = _counts(output_ids, out.shape, device) if penalties and output_ids is not None else None
    if params.repetition_penalty != 1:
        seen = torch.zeros(out.shape, dtype=torch.bool, device=device) if counts is None else counts > 0
        if prompt_ids is not None:
            seen |= _counts(prompt_ids, out.shape, device) > 0
        penalised = torch.where(out > 0, out / params.repetition_penalty, out * params.repetition_penalty)
        out = torch.where(seen, penalised, out)
    if counts is not None and (params.frequency_penalty or params.presence_penalty):
        counts = counts.to(out.dtype)
        out = out - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(out.dtype)
    return out
