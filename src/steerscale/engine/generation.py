"""Prompt formatting and batched generation under interventions."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..errors import SteerscaleError
from ..models.layout import ModelLayout
from ..models.threads import refresh as refresh_threads
from .capture import tokenize
from .decoding import TokenRules
from .logit_contrast import EarlyReader, LogitContrast, check_layout, contrast_hidden
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


class _ContrastProcessor(LogitsProcessor):
    """The early-layer contrast as a transformers logits processor: it runs after generate's own processors (EOS
    masks, repetition penalty) and before temperature and top-p, on the states the reader kept this step."""

    def __init__(self, early: EarlyReader):
        self.early = early

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        e = self.early
        return contrast_hidden(e.model, e.layout, e.spec, scores, e.at()).to(scores.dtype)


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
) -> list[Generation]:
    """Generate for a batch of prompts (left-padded) with interventions active only during this call.

    ``min_new_tokens``: no row ends before that many tokens (EOS is suppressed until then; timing runs use it so
    every configuration generates the same number of tokens). ``system``: a system prompt for every prompt (the
    prompting baseline steering is read against). ``rules``: conditional steering decided per prompt (``PromptRule``: CAST conditions, steering controllers);
    each row's decision is in ``Generation.extra["rule_scales"]`` (edit site -> scale; empty: unsteered).
    Interventions with a token gate report in ``extra["gate_from"]`` the index of the first generated token
    produced under the gated edits (None: the gate never fired). ``logit_contrast``: decode from the early-layer
    contrast (DoLa / VISTA, ``engine.logit_contrast``; a ``LogitContrast`` or its CLI spec such as ``"dola:high"``)
    instead of the model's own next-token distribution."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if max_new_tokens < 1:
        raise SteerscaleError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    formatted = [format_prompt(tokenizer, p, chat, system) for p in prompts]
    device = next(model.parameters()).device
    refresh_threads(device)  # fewer threads while other jobs hold cores (models/threads.py)
    batch = tokenize(tokenizer, formatted, device)
    if seed is not None:
        torch.manual_seed(seed)
    tokens = TokenRules(model, tokenizer)  # the decoding core's EOS set: every engine ends a row on the same tokens
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=use_cache,
                  pad_token_id=tokens.pad_id, num_return_sequences=num_return_sequences)
    if tokens.eos_ids:
        kwargs["eos_token_id"] = sorted(tokens.eos_ids)
    if min_new_tokens:
        kwargs["min_new_tokens"] = min(int(min_new_tokens), max_new_tokens)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    interventions = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    rule_edits, rule_scales = prompt_interventions(model, layout, rules, batch, num_return_sequences)
    gates = list({id(iv.gate): iv.gate for iv in interventions if iv.gate is not None}.values())
    early = None
    if logit_contrast is not None:
        spec = LogitContrast.parse(logit_contrast)
        check_layout(layout, spec)
        early = EarlyReader(layout, spec, model=model, last_only=True)
        kwargs["logits_processor"] = LogitsProcessorList([_ContrastProcessor(early)])
    # the reader's observers attach after the edits, so they read the steered states
    with intervene(layout, interventions + rule_edits, prompt_width=None) as handle, \
            early.reading() if early is not None else nullcontext():
        out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
    width = batch.input_ids.shape[1]
    results = []
    eos = tokens.eos_ids | {tokens.pad_id}
    for row in range(out.shape[0]):
        ids = out[row, width:].tolist()
        while ids and ids[-1] in eos:  # trailing padding after an early stop
            ids.pop()
        src = row // num_return_sequences
        n_prompt = int(batch.attention_mask[src].sum())
        extra = {"rule_scales": rule_scales[row]} if rules else {}
        if gates:  # the gate fired on the hidden state at real index p, which predicts generated token p + 1 - n_prompt
            fired = [handle.gate_positions(g)[row] for g in gates]
            fired = [p + 1 - n_prompt for p in fired if p is not None]
            # a row that ended early is fed padding until the batch ends: a gate firing there steered nothing
            extra["gate_from"] = min(fired) if fired and min(fired) < len(ids) else None
        results.append(Generation(prompt=prompts[src], text=tokenizer.decode(ids, skip_special_tokens=True),
                                  token_ids=ids, n_prompt_tokens=n_prompt, extra=extra))
    return results
