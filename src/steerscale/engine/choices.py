"""Per-choice log-probabilities of multiple-choice continuations: the model-level scorer under multiple-choice
evaluation (``measure.mc``) and learned steering (``steer.lofit``).

Shared-prompt packing: the question is encoded once and all its choices ride in the same row behind it. Each row
is ``[prompt, choice_1, choice_2, ...]`` with a block attention mask: prompt tokens are causal, each choice sees the
prompt and its own earlier tokens only, and each choice's position ids restart where the prompt ends, so every
choice is scored exactly as if it followed the prompt alone. A 4-D additive mask is passed straight through by
transformers (custom masks are returned as-is by ``masking_utils``). ``padded_logprob_sums`` is the conventional
layout (one left-padded row per choice, position ids from the attention mask), the reference the packed path is
tested against.

Nothing here batches, shows progress or attaches hooks: callers choose the batches, and steering applies through
``engine.runtime.intervene`` around the call. The runtime sees one forward per batch and treats the whole input
as "prompt", so use token scope ``all`` (the default) when scoring.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..errors import SteerscaleError
from ..models.threads import refresh as refresh_threads
from .generation import format_prompt, has_chat_template
from .logit_contrast import EarlyReader, LogitContrast, contrast_hidden, lm_head


@dataclass
class Item:
    """One question's token ids: the prompt and one continuation per choice."""

    prompt: list[int]
    choices: list[list[int]]

    @property
    def packed_len(self) -> int:
        return len(self.prompt) + sum(map(len, self.choices))


def encode(tokenizer, text: str, special: bool) -> list[int]:
    """Token ids of one text without padding; works for HF tokenizers and the tests' tiny tokenizer."""
    enc = tokenizer([text], return_tensors="pt", padding=True, add_special_tokens=special)
    ids, mask = enc["input_ids"][0], enc["attention_mask"][0]
    return ids[mask.bool()].tolist()


def build_items(tokenizer, questions: Sequence[str], choices: Sequence[Sequence[str]], chat: bool | None = None,
                system: str | None = None) -> list[Item]:
    """Encode prompt and continuations separately and concatenate ids, so a choice never merges with the
    prompt's last token. With a chat template the choice is the assistant's reply (no leading space); without
    one it follows the question after a space, as in lm-eval's log-likelihood requests."""
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    items = []
    for q, chs in zip(questions, choices, strict=True):
        if not chs:
            raise SteerscaleError(f"question {q[:60]!r} has no choices")
        prompt = format_prompt(tokenizer, q, chat=use_chat, system=system)
        # Chat templates carry their own BOS; plain prompts get the tokenizer's special tokens.
        p_ids = encode(tokenizer, prompt, special=not use_chat)
        sep = "" if use_chat or prompt.endswith((" ", "\n")) else " "
        c_ids = []
        for c in chs:
            ids = encode(tokenizer, sep + str(c), special=False)
            if not ids:
                raise SteerscaleError(f"choice {c!r} encodes to no tokens", "choices must be non-empty text")
            c_ids.append(ids)
        if not p_ids:
            raise SteerscaleError(f"question {q[:60]!r} encodes to no tokens")
        items.append(Item(p_ids, c_ids))
    return items


def _pack(items: Sequence[Item], pad_id: int, dtype, device, window: int | None = None, mixed: bool = False):
    """Shared-prompt rows: input ids, 4-D additive mask, position ids, and for every choice token the
    (row, source column, target id, choice key) needed to gather its log-prob."""
    width = max(it.packed_len for it in items)
    B = len(items)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    pos = torch.zeros((B, width), dtype=torch.long)
    seg = torch.full((B, width), -1, dtype=torch.long)  # 0 prompt, k+1 choice k, -1 padding
    rows, srcs, tgts, keys = [], [], [], []
    for b, it in enumerate(items):
        L = len(it.prompt)
        ids[b, :L] = torch.tensor(it.prompt)
        pos[b, :L] = torch.arange(L)
        seg[b, :L] = 0
        col = L
        for k, c in enumerate(it.choices):
            n = len(c)
            ids[b, col : col + n] = torch.tensor(c)
            pos[b, col : col + n] = torch.arange(L, L + n)
            seg[b, col : col + n] = k + 1
            src = [L - 1] + list(range(col, col + n - 1))  # token t is predicted at the column before it
            rows += [b] * n
            srcs += src
            tgts += c
            keys += [(b, k)] * n
            col += n
    q = torch.arange(width)
    causal = q[None, :] <= q[:, None]  # (T_q, T_k)
    sq, sk = seg[:, :, None], seg[:, None, :]
    allowed = causal[None] & ((sk == 0) | (sk == sq)) & (sq >= 0)
    allowed |= torch.eye(width, dtype=torch.bool)[None] & (sq < 0)  # padding attends to itself: no NaN rows
    mask = _additive(allowed, dtype).to(device)
    if window:  # sliding-window layers: the same blocks, limited to tokens within `window` positions
        near = (pos[:, :, None] - pos[:, None, :]) < window
        windowed = _additive(allowed & (near | (sq < 0)), dtype).to(device)
        mask = {"full_attention": mask, "sliding_attention": windowed} if mixed else windowed
    return ids.to(device), mask, pos.to(device), (rows, srcs, tgts, keys)


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    mask = torch.zeros((allowed.shape[0], 1, *allowed.shape[1:]), dtype=dtype)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def sliding_window(model) -> tuple[int | None, bool]:
    """(window, mixed): the model's sliding window, and whether only some layers use it. Models with mixed
    layers (Gemma 2/3, ...) accept a ``{"full_attention", "sliding_attention"}`` mask mapping."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or []
    if not window or (types and "sliding_attention" not in types):
        return None, False
    return int(window), bool(types) and "full_attention" in types


def _pad_rows(items: Sequence[Item], pad_id: int, device):
    """Conventional layout: one left-padded row per (question, choice)."""
    seqs, meta = [], []
    for b, it in enumerate(items):
        for k, c in enumerate(it.choices):
            seqs.append(it.prompt + c)
            meta.append((b, k, len(it.prompt), c))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, srcs, tgts, keys = [], [], [], []
    for r, (s, (b, k, L, c)) in enumerate(zip(seqs, meta)):
        off = width - len(s)
        ids[r, off:] = torch.tensor(s)
        att[r, off:] = 1
        n = len(c)
        rows += [r] * n
        srcs += list(range(off + L - 1, off + L - 1 + n))
        tgts += c
        keys += [(b, k)] * n
    pos = (att.cumsum(-1) - 1).clamp_min(0)
    return ids.to(device), att.to(device), pos.to(device), (rows, srcs, tgts, keys)


def _logprobs_at(logits: torch.Tensor, tgts, early: EarlyReader | None, rows=None, srcs=None) -> torch.Tensor:
    """Log-probs of the target tokens from the logits at the target positions (log-softmax only there: the vocab
    is large), or from their early-layer contrast when ``early`` read the candidate blocks."""
    tgt = torch.tensor(tgts, device=logits.device)[:, None]
    if early is None:
        return logits.float().log_softmax(-1).gather(-1, tgt)[:, 0].cpu()
    where = [torch.tensor(x, device=logits.device) for x in (rows, srcs)]
    scores = contrast_hidden(early.model, early.layout, early.spec, logits, early.at(*where))
    return scores.gather(-1, tgt)[:, 0].cpu()


_HEAD_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def head_is_separable(model) -> bool:
    """Whether ``model``'s logits are ``lm_head(backbone hidden states)``. Checked once per model on 4 tokens: the
    LM head is a sixth of a small model's work, and applying it only where a choice token is predicted saves
    it everywhere else; a model whose forward does more (a logit scale, a custom head) keeps the full forward."""
    if model not in _HEAD_CHECKED:
        try:
            device = next(model.parameters()).device
            ids = torch.arange(1, 5, device=device)[None] % model.config.get_text_config().vocab_size
            full = model(input_ids=ids, use_cache=False).logits
            fast = lm_head(model, model.base_model(input_ids=ids, use_cache=False).last_hidden_state)
        except Exception:  # e.g. run under a caller's per-row edits sized for another batch: ask again next time
            return False
        _HEAD_CHECKED[model] = fast.shape == full.shape and torch.allclose(fast, full, atol=1e-4, rtol=1e-4)
    return _HEAD_CHECKED[model]


def _target_logprobs(model, ids, mask, pos, rows, srcs, tgts, head_at_targets: bool,
                     early: EarlyReader | None = None) -> torch.Tensor:
    """Log-prob of each target token; the LM head runs only at the target positions when ``head_at_targets``."""
    refresh_threads(ids.device)  # fewer threads while other jobs hold cores (models/threads.py)
    where = (torch.tensor(rows, device=ids.device), torch.tensor(srcs, device=ids.device))
    with early.reading() if early is not None else nullcontext():
        if head_at_targets and head_is_separable(model):
            hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                      use_cache=False).last_hidden_state
            logits = lm_head(model, hidden[where])
        else:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[where]
    return _logprobs_at(logits, tgts, early, rows, srcs)


def _per_choice(lps: torch.Tensor, keys, items: Sequence[Item]) -> torch.Tensor:
    """Token log-probs summed per ``(item, choice)`` key: ``(n_items, max_choices)``, zero where an item has fewer
    choices. A scatter-add in float64 (long answers sum many terms), so gradients flow to whatever produced ``lps``."""
    width = max(len(it.choices) for it in items)
    flat = torch.tensor([b * width + k for b, k in keys], device=lps.device)
    sums = torch.zeros(len(items) * width, dtype=torch.float64, device=lps.device).index_add(0, flat, lps.double())
    return sums.view(len(items), width)


def _reader(model, layout, logit_contrast) -> EarlyReader | None:
    if logit_contrast is None:
        return None
    if layout is None:
        raise SteerscaleError("logit contrast needs the model layout", "pass layout=lm.layout")
    return EarlyReader(layout, LogitContrast.parse(logit_contrast), model=model)


def choice_logprob_sums(model, items: Sequence[Item], pad_id: int = 0, logit_contrast=None,
                        layout=None) -> torch.Tensor:
    """Summed log-prob of every choice of ``items`` in one shared-prompt forward, as ``(n_items, max_choices)``.
    ``logit_contrast`` (a ``LogitContrast``, with ``layout``): score each token by the early-layer contrast
    (``engine.logit_contrast``) instead of the model's own distribution (not differentiable through the early
    states, which are read detached).

    Differentiable (no ``no_grad`` here): learned steering (``steer.lofit``) trains its offsets through the same
    packed scoring that TruthfulQA-style evaluation uses, so what is optimised is what is measured."""
    param = next(model.parameters())
    ids, mask, pos, (rows, srcs, tgts, keys) = _pack(items, pad_id, param.dtype, param.device, *sliding_window(model))
    lps = _target_logprobs(model, ids, mask, pos, rows, srcs, tgts, True, _reader(model, layout, logit_contrast))
    return _per_choice(lps, keys, items)


def padded_logprob_sums(model, items: Sequence[Item], pad_id: int = 0, logit_contrast=None,
                        layout=None) -> torch.Tensor:
    """``choice_logprob_sums`` in the conventional layout: a plain forward per (item, choice), left-padded, with
    the full LM head. The reference the packed path is tested against."""
    param = next(model.parameters())
    ids, mask, pos, (rows, srcs, tgts, keys) = _pad_rows(items, pad_id, param.device)
    lps = _target_logprobs(model, ids, mask, pos, rows, srcs, tgts, False, _reader(model, layout, logit_contrast))
    return _per_choice(lps, keys, items)
