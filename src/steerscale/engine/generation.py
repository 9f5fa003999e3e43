"""Prompt formatting and batched generation under interventions."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import SteerscaleError
from ..models.layout import ModelLayout
from ..models.threads import refresh as refresh_threads
from .capture import tokenize
from .decoding import RowCall, SamplingParams, TokenRules, decode_rows, seeded_generator
from .kvcache import cache_of, with_cache
from .logit_contrast import LogitContrast, check_layout, contrast_rows, early_reader
from .provenance import SpanIndex
from .prompt_rules import PromptRule, prompt_interventions
from .runtime import Intervention, intervene


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, text: str, chat: bool | None = None, system: str | None = None) -> str:
    """Apply the chat template (when the model has one and ``chat`` is not False), with ``system`` as the system
    message; without a template the text is returned, after ``system`` and a blank line when one is given."""
    if not isinstance(text, str) or not text.strip():
        raise SteerscaleError("empty prompt", "pass a non-empty prompt text")
    if system is not None and (not isinstance(system, str) or not system.strip()):
        raise SteerscaleError("empty system prompt", "pass a non-empty system text, or none")
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    if not use_chat:
        return f"{system}\n\n{text}" if system else text
    if not has_chat_template(tokenizer):
        raise SteerscaleError("chat=True but this tokenizer has no chat template", "pass chat=False (or --no-chat)")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class Generation:
    prompt: str
    text: str
    token_ids: list[int]
    n_prompt_tokens: int
    extra: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    layout: ModelLayout,
    prompts: Sequence[str],
    interventions: Sequence[Intervention] = (),
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool | None = None,
    use_cache: bool = True,
    num_return_sequences: int = 1,
    rules: Sequence[PromptRule] = (),
    min_new_tokens: int = 0,
    system: str | None = None,
    logit_contrast: LogitContrast | str | None = None,
    block: SpanIndex | None = None,
) -> list[Generation]:
    """Generate for a batch of prompts (left-padded) with interventions active only during this call.

    ``min_new_tokens``: no row ends before that many tokens (EOS is suppressed until then; timing runs use it so
    every configuration generates the same number of tokens). ``system``: a system prompt for every prompt (the
    prompting baseline steering is read against). ``rules``: conditional steering decided per prompt (``PromptRule``: CAST conditions, steering controllers);
    each row's decision is in ``Generation.extra["rule_scales"]`` (edit site -> scale; empty: unsteered).
    Interventions with a token gate report in ``extra["gate_from"]`` the index of the first generated token
    produced under the gated edits (None: the gate never fired). ``logit_contrast``: decode from the early-layer
    contrast (DoLa / VISTA, ``engine.logit_contrast``; a ``LogitContrast`` or its CLI spec such as ``"dola:high"``)
    instead of the model's own next-token distribution. ``block``: provenance-aware decoding
    (``engine.provenance.SpanIndex``): no verbatim span of its corpus is generated."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if max_new_tokens < 1:
        raise SteerscaleError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    formatted = [format_prompt(tokenizer, p, chat, system) for p in prompts]
    device = next(model.parameters()).device
    refresh_threads(device)  # fewer threads while other jobs hold cores (models/threads.py)
    batch = tokenize(tokenizer, formatted, device)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                            top_p=top_p if do_sample else 1.0, min_tokens=min(int(min_new_tokens), max_new_tokens),
                            step=None, block=block)
    if seed is not None:
        torch.manual_seed(seed)
    generator = seeded_generator(seed)
    tokens = TokenRules(model, tokenizer)
    interventions = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    rule_edits, rule_scales = prompt_interventions(model, layout, rules, batch, num_return_sequences)
    gates = list({id(iv.gate): iv.gate for iv in interventions if iv.gate is not None}.values())
    spec = None
    if logit_contrast is not None:
        spec = LogitContrast.parse(logit_contrast)
        check_layout(layout, spec)
    early = early_reader(layout, model, [spec])
    # every return sequence is a row of its own from the start (transformers' expansion)
    ids = batch.input_ids.repeat_interleave(num_return_sequences, 0)
    mask = batch.attention_mask.repeat_interleave(num_return_sequences, 0)
    rows = ids.shape[0]
    width = ids.shape[1]
    calls = [RowCall() for _ in range(rows)]
    state = {"ids": ids, "mask": mask, "cache": None}

    def run(inp, attention, cache):
        pos = (attention.cumsum(-1) - 1).clamp(min=0)[:, -inp.shape[1]:]
        out = model(input_ids=inp, attention_mask=attention, position_ids=pos, use_cache=use_cache,
                    logits_to_keep=1, **(with_cache(model, cache) if cache is not None else {}))
        return contrast_rows(model, layout, out.logits[:, -1].float(), [spec] * rows, early), \
            (cache_of(out) if use_cache else None)

    def forward(inp: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
        # every row takes a column: a finished row a masked pad, so the others' positions stay as they were
        state["mask"] = torch.cat([state["mask"], fed.long()[:, None]], dim=1)
        state["ids"] = torch.cat([state["ids"], inp[:, None]], dim=1)
        if use_cache:
            logits, state["cache"] = run(inp[:, None], state["mask"], state["cache"])
        else:  # the whole sequence again: what a cached pass must reproduce
            logits, _ = run(state["ids"], state["mask"], None)
        return logits

    # one hook block over the whole generation: token gates latch per row across its passes; the early reader's
    # observers attach after the edits, so they read the steered states
    with intervene(layout, interventions + rule_edits, prompt_width=None) as handle, \
            early.reading() if early is not None else nullcontext():
        logits, state["cache"] = run(ids, mask, None)
        decode_rows(calls, logits, params, tokens, generator, forward, limit=tokens.limit(params, width),
                    steps=max_new_tokens, prompt_ids=[row[m.bool()].tolist() for row, m in zip(ids, mask)])
    results = []
    for row, call in enumerate(calls):
        out_ids = [t for t in call.ids if t not in tokens.eos_ids]  # the EOS that ended the row is not text
        src = row // num_return_sequences
        n_prompt = int(batch.attention_mask[src].sum())
        extra = {"rule_scales": rule_scales[row]} if rules else {}
        if gates:  # the gate fired on the hidden state at real index p, which predicts generated token p + 1 - n_prompt
            fired = [handle.gate_positions(g)[row] for g in gates]
            fired = [p + 1 - n_prompt for p in fired if p is not None]
            # a row that ended early is fed padding until the batch ends: a gate firing there steered nothing
            extra["gate_from"] = min(fired) if fired and min(fired) < len(out_ids) else None
        results.append(Generation(prompt=prompts[src], text=call.text, token_ids=out_ids, n_prompt_tokens=n_prompt,
                                  extra=extra))
    return results
