"""The decoding core: how every engine turns next-token logits into a row's tokens, text and finish reason.

One place for the token rules of ``engine.generation.generate`` (its EOS set), ``scale.local.LocalBackend``
(strategies), the server's scheduler (``serve.scheduler``) and the remote replay (``scale.remote.replay``, which
replays these rules client-side over a server's answer):

* ``SamplingParams``: OpenAI/vLLM sampling parameters, checked once where they are built;
* ``process_logits``: the processors that change logits before temperature, in vLLM's order:
  1. ``logit_bias``: ``bias`` added to each listed token's logit;
  2. EOS masks: EOS ids set to ``-inf`` for the whole generation (``ignore_eos``) or while a row has generated
     fewer than ``min_tokens`` tokens;
  3. penalties: ``repetition_penalty`` (HF/vLLM: a token seen in the prompt or the output so far has a positive
     logit divided by it, a negative one multiplied by it), then ``frequency_penalty`` and ``presence_penalty``
     (OpenAI, over the output so far: ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``);
  4. provenance veto (``block``, ``engine.provenance``): tokens that would complete a verbatim span of a given
     corpus after the prompt and the output so far get ``-inf``;
  with none active (``SamplingParams.has_processors`` false) the logits come back as the same tensor, untouched;
* ``sample_next``: processors, then greedy or temperature / top-k / min-p / top-p sampling from a per-call
  generator; the log-prob it returns is the model's own (temperature 1, raw logits);
* ``TokenRules``: a model's EOS set (the tokenizer's EOS and the generation config's), pad id, context window
  and how generated ids become text;
* ``RowCall.accept``: one sampled token appended to one row, and what it does, in one order every engine keeps:
  EOS, stop string (held back before ``min_tokens``), length, step delimiter;
* ``find_stop`` / ``step_end``: stop strings (also when one began in text kept from an earlier call) and the step
  delimiter of step-wise search.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from enum import StrEnum
from itertools import chain

import torch

from ..errors import SteerscaleError
from .logit_contrast import EarlyReader, contrast_hidden
from .provenance import SpanIndex, veto
from .runtime import intervene

DEFAULT_STEP = "\n\n"


def step_end(text: str, step: str) -> int:
    """Index just past the first ``step`` delimiter in ``text`` that follows non-whitespace text, or -1. A
    delimiter with only whitespace before it does not end a step: models often open a step with a newline, and
    an empty step would stall a search."""
    start = len(text) - len(text.lstrip())
    i = text.find(step, start + 1) if start < len(text) else -1
    return -1 if i < 0 else i + len(step)


def find_stop(prev: str, text: str, stops: Sequence[str], start: int = 0) -> int:
    """Where in ``text`` the earliest stop string begins, also when it began in ``prev`` (the text already kept
    from earlier steps): then 0. -1 when there is none. Only a stop string that ends past ``text[:start]``
    counts: the text before was checked already (or held back from the check, before ``min_tokens``)."""
    tail = prev[len(prev) - max(0, max((len(s) for s in stops), default=1) - 1):]
    joined = tail + text
    end = len(tail) + start  # a stop must end past joined[:end]
    hits = [i for s in stops if (i := joined.find(s, max(0, end - len(s) + 1))) >= 0]
    cut = min(hits, default=-1)
    return cut if cut < 0 else max(0, cut - len(tail))




def _logit_bias(value) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as sorted ``(token id, bias)`` pairs, from a mapping (OpenAI's JSON: ``{"50256": -100}``) or
    pairs; ids are non-negative integers (or their decimal text), biases finite numbers in [-100, 100]."""
    hint = 'a mapping of token id to bias, e.g. {"50256": -100} (OpenAI semantics: the bias is added to the logit)'
    try:
        pairs = list(value.items()) if hasattr(value, "items") else [tuple(p) for p in value]
    except TypeError:
        raise SteerscaleError(f"logit_bias must map token ids to biases, got {value!r}", hint) from None
    out = {}
    for pair in pairs:
        if len(pair) != 2:
            raise SteerscaleError(f"logit_bias entry {pair!r} is not a (token id, bias) pair", hint)
        key, bias = pair
        if isinstance(key, str) and key.strip().isdigit():
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise SteerscaleError(f"logit_bias token id must be a non-negative integer, got {key!r}", hint)
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias) \
                or not -100 <= bias <= 100:
            raise SteerscaleError(f"logit_bias for token {key} must be a number in [-100, 100], got {bias!r}", hint)
        out[key] = float(bias)
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256  # total generated tokens per sequence (over all steps)
    temperature: float = 0.7  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # stop strings: the sequence is finished and its text cut before the string
    step: str | None = DEFAULT_STEP  # step delimiter used by ``extend`` (kept in the step text)
    max_step_tokens: int = 128  # tokens per step before the step is cut
    # OpenAI/vLLM extras (``process_logits``); each default is the identity, so default params sample as before
    top_k: int = 0  # keep the k most likely tokens; 0: off (no cut)
    min_p: float = 0.0  # keep tokens with prob >= min_p * the top prob; 0: off (every prob is >= 0)
    repetition_penalty: float = 1.0  # seen tokens' logits divided (>0) / multiplied (<0) by it; 1: off (x/1 = x)
    presence_penalty: float = 0.0  # subtracted once from each token already generated; 0: off
    frequency_penalty: float = 0.0  # subtracted per occurrence of each token already generated; 0: off
    min_tokens: int = 0  # no EOS and no stop string before this many generated tokens; 0: off (no minimum)
    ignore_eos: bool = False  # never sample EOS (run to max_tokens or a stop string); False: off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), sorted; (): off
    # provenance-aware decoding: tokens that would complete a span of the index's corpus are vetoed; None: off
    block: SpanIndex | None = None

    @property
    def has_processors(self) -> bool:
        """True when ``process_logits`` changes the logits (else it returns them untouched)."""
        return bool(self.logit_bias or self.min_tokens or self.ignore_eos or self.repetition_penalty != 1
                    or self.presence_penalty or self.frequency_penalty or self.block is not None)

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SteerscaleError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise SteerscaleError(f"temperature must be >= 0, got {self.temperature!r}", "0 means greedy decoding")
        if not 0 < self.top_p <= 1:
            raise SteerscaleError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.max_step_tokens < 1:
            raise SteerscaleError(f"max_step_tokens must be >= 1, got {self.max_step_tokens!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not s for s in stop):
            raise SteerscaleError("empty stop string", "remove it; an empty string would stop at once")
        object.__setattr__(self, "stop", stop)
        if self.step == "":
            raise SteerscaleError("empty step delimiter", "use e.g. '\\n\\n' or '\\n', or None for no steps")
        self._check_extras()

    def _check_extras(self) -> None:
        def number(name, lo, hi, hint):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise SteerscaleError(f"{name} must be a number in [{lo}, {hi}], got {v!r}", hint)

        def integer(name, lo, hint):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise SteerscaleError(f"{name} must be an integer >= {lo}, got {v!r}", hint)

        integer("top_k", 0, "0 turns top-k off; k >= 1 keeps the k most likely tokens")
        number("min_p", 0, 1, "0 turns min-p off; e.g. 0.05 drops tokens under 5% of the top token's probability")
        rp = self.repetition_penalty
        if isinstance(rp, bool) or not isinstance(rp, (int, float)) or not math.isfinite(rp) or rp <= 0:
            raise SteerscaleError(f"repetition_penalty must be a finite number > 0, got {rp!r}",
                                  "1 turns it off; > 1 discourages repeats (e.g. 1.1), < 1 encourages them")
        number("presence_penalty", -2, 2, "0 turns it off (OpenAI range: -2 to 2)")
        number("frequency_penalty", -2, 2, "0 turns it off (OpenAI range: -2 to 2)")
        integer("min_tokens", 0, "0 turns it off")
        if self.min_tokens > self.max_tokens:
            raise SteerscaleError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})",
                                  "lower min_tokens or raise max_tokens")
        if not isinstance(self.ignore_eos, bool):
            raise SteerscaleError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        if self.block is not None and not isinstance(self.block, SpanIndex):
            raise SteerscaleError(f"block must be a SpanIndex, got {type(self.block).__name__}",
                                  "build one with engine.provenance.SpanIndex.from_dir(path, tokenizer)")

    def with_(self, **changes) -> "SamplingParams":
        return replace(self, **changes)


class FinishReason(StrEnum):
    """Why a candidate stopped growing (members compare equal to their text, and serialise as it)."""

    EOS = "eos"  # the model's end-of-sequence token
    STOP = "stop"  # a stop string (the text is cut before it)
    LENGTH = "length"  # max_tokens, or the context window
    BUDGET = "budget"  # the budget could pay for no more tokens
    CANCELLED = "cancelled"  # the request was cancelled (a server's client went away)


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
    if params.block is not None:  # last: no bias or penalty brings a vetoed token back
        prompts = prompt_ids if prompt_ids is not None else [()] * n_rows
        outputs = output_ids if output_ids is not None else [()] * n_rows
        out = veto(out, params.block, [list(p) + list(o) for p, o in zip(prompts, outputs)])
    return out


# temperatures below this sample greedily: dividing logits by a smaller one overflows to inf and NaN (vLLM's rule)
GREEDY_BELOW = 1e-5


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, *, eos_ids=(),
                prompt_ids: Sequence[Sequence[int]] | None = None,
                output_ids: Sequence[Sequence[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row of ``logits`` (B, V) and its log-prob.

    The logits first go through ``process_logits`` (logit bias, EOS masks for ``min_tokens`` and ``ignore_eos`` over
    ``eos_ids``, penalties over each row's ``prompt_ids``/``output_ids`` so far); then temperature 0 takes the
    argmax, any other divides by the temperature, keeps the ``top_k`` most likely tokens, those with probability >=
    ``min_p`` times the top one, then the ``top_p`` nucleus, and samples from ``generator``. Default params sample
    exactly as without these extras.

    The log-prob returned is the model's own: temperature 1 over the RAW ``logits``, before any processor or
    truncation (what strategies and verifiers score, and what a server reports)."""
    logp = torch.log_softmax(logits, dim=-1)
    x = process_logits(logits, params, eos_ids=eos_ids, prompt_ids=prompt_ids, output_ids=output_ids)
    if params.temperature < GREEDY_BELOW:
        tok = x.argmax(-1)
    else:
        x = x / params.temperature
        if 0 < params.top_k < x.shape[-1]:
            x = x.masked_fill(x < x.topk(params.top_k, dim=-1).values[:, -1:], -torch.inf)
        probs = torch.softmax(x, dim=-1)
        if params.min_p > 0:
            probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0)
            probs = probs / probs.sum(-1, keepdim=True)  # renormalised: top_p reads cumulative mass
        if params.top_p < 1:
            sp, si = probs.sort(-1, descending=True)
            keep = (sp.cumsum(-1) - sp) < params.top_p
            keep[:, 0] = True  # the most likely token always stays (a top_p that underflows float32 keeps it)
            sp = sp * keep
            probs = torch.zeros_like(probs).scatter(-1, si, sp)
        tok = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)
    return tok, logp.gather(-1, tok[:, None])[:, 0]


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one call's sampling: ``seed``, or a fresh draw from torch's global stream."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    return generator


def _ids(value) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, (list, tuple, set)):
        return {int(x) for x in value}
    return set()


class TokenRules:
    """A model's token facts every engine decodes by: ``eos_ids`` (the tokenizer's EOS and every id of the
    generation config's ``eos_token_id``: chat models end turns with a token the tokenizer may not call EOS),
    ``pad_id`` (the tokenizer's, else the smallest EOS id), ``context_window`` (``max_position_embeddings``; None
    when the config has none) and ``decode`` (generated ids to text, EOS and special tokens dropped)."""

    def __init__(self, model, tokenizer):
        self.tokenizer = tokenizer
        self.eos_ids = _ids(getattr(tokenizer, "eos_token_id", None)) | _ids(
            getattr(getattr(model, "generation_config", None), "eos_token_id", None))
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        cfg = getattr(model, "config", None)
        self.context_window = int(getattr(cfg, "max_position_embeddings", 0) or 0) or None

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.eos_ids], skip_special_tokens=True)

    def limit(self, params: SamplingParams, prompt_tokens: int) -> int:
        """Total tokens a row of a ``prompt_tokens``-token prompt may generate: ``max_tokens``, cut so that the
        sequence stays one short of the context window (at least 1)."""
        if not self.context_window:
            return params.max_tokens
        return max(1, min(params.max_tokens, self.context_window - prompt_tokens - 1))


class StepDone:
    """``RowCall.accept``'s answer when a step-wise call's step is complete (the row itself goes on)."""


STEP_DONE = StepDone()


@dataclass
class RowCall:
    """What one row generates in one call (a ``sample``, one step of a search, a server request): its ids,
    log-probs and text so far. ``before``: tokens the row generated in earlier calls; ``prev``: their text (a stop
    string may begin there); ``held``: the length of the text decoded before ``min_tokens`` was reached, which
    stop strings must end past."""

    before: int = 0
    prev: str = ""
    ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    text: str = ""
    held: int = 0

    @property
    def n_tokens(self) -> int:
        return self.before + len(self.ids)

    def accept(self, token: int, logprob: float, params: SamplingParams, rules: TokenRules, limit: int,
               stepwise: bool = False) -> "FinishReason | StepDone | None":
        """Append one sampled token. Returns the ``FinishReason`` that ends the row, ``STEP_DONE`` when a step-wise
        call's step is complete, or None when the row takes more tokens. The order of the checks is the contract
        every engine keeps and the remote replay mirrors: EOS, stop string, length (``limit`` tokens in all), step
        delimiter."""
        self.ids.append(token)
        self.logprobs.append(logprob)
        if token in rules.eos_ids:
            return FinishReason.EOS
        text = rules.decode(self.ids)
        if self.n_tokens < params.min_tokens:  # too early for a stop string to end the row
            self.held, cut = len(text), -1
        else:  # a stop string counts when it ends past the text held back (none without min_tokens)
            cut = find_stop(self.prev, text, params.stop, self.held)
        if cut >= 0:
            self.text = text[:cut]
            return FinishReason.STOP
        self.text = text
        if self.n_tokens >= limit:
            return FinishReason.LENGTH
        if stepwise and params.step and step_end(text, params.step) >= 0:
            return STEP_DONE
        return None


@torch.no_grad()
def score_tokens(model, layout, ids: Sequence[int], interventions=(), *, k: int = 0, prompt_width: int | None = None,
                 logit_contrast=None, hooks=None) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Teacher-forced log-prob of tokens 1.. of ``ids`` under ``interventions`` and the decoding distribution
    (the logit contrast's when given, as decoding samples from it), and the ``k`` most likely tokens ``(id,
    log-prob)`` at each of those positions, in one forward pass. ``prompt_width``: where the prompt ends, for the
    ``prompt``/``generated`` steering scopes. ``hooks``: an engine's ``StandingIntervener`` to run on (None: hooks
    for this pass). What a server's ``logprobs``/``echo`` report."""
    if not ids:
        raise SteerscaleError("scoring needs at least one token id")
    x = torch.tensor([list(ids)], device=next(model.parameters()).device)
    early = None if logit_contrast is None else EarlyReader(layout, logit_contrast, model=model)
    if hooks is not None:
        steered = hooks.running(list(interventions), early.observers() if early is not None else (), prompt_width)
    else:
        steered = _intervene_and_read(layout, list(interventions), prompt_width, early)
    with steered:
        logits = model(input_ids=x, use_cache=False).logits[0].float()
    if early is not None:
        logits = contrast_hidden(model, layout, early.spec, logits, [early.hidden[layer][0] for layer in early.layers])
    logp = torch.log_softmax(logits[:-1], -1)
    chosen = logp.gather(-1, x[0, 1:, None])[:, 0].tolist()
    if not k:
        return chosen, [[] for _ in chosen]
    vals, idx = logp.topk(min(k, logp.shape[-1]), -1)
    return chosen, [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]



@contextmanager
def _intervene_and_read(layout, interventions, prompt_width, early):
    with intervene(layout, interventions, prompt_width=prompt_width), \
            early.reading() if early is not None else nullcontext():
        yield


def decode_rows(calls: Sequence[RowCall], logits: torch.Tensor, params: SamplingParams, tokens: TokenRules,
                generator: torch.Generator, forward, *, limit: int, steps: int,
                prompt_ids: Sequence[Sequence[int]] | None = None, earlier: Sequence[Sequence[int]] | None = None,
                done: Sequence[bool] | None = None, stepwise: bool = False, grant=None,
                feed_last: bool = False) -> tuple[list, torch.Tensor]:
    """The local decoding loop (``generate`` and ``LocalBackend`` run it): up to ``steps`` times, sample every row's
    next token from ``logits`` (``sample_next``), let ``grant(live) -> k`` pay for the first ``k`` live rows (a
    budget; None: all), append each paid token to its row (``RowCall.accept``) and feed the sampled tokens,
    ``forward(tokens, fed) -> logits`` (``fed``: (B,) bool, the rows that took a token; the others get a pad and
    keep their distribution), while a row still takes tokens (or, with ``feed_last``, also after the last one:
    a search keeps the state of a finished step).

    ``prompt_ids``/``earlier``: per row, the prompt's ids and the ids generated in earlier calls (what the logits
    processors read); ``done``: rows that take no tokens. Returns each row's ``FinishReason`` (``BUDGET`` for rows
    the grant refused; None: the row goes on, its step ended or ``steps`` ran out) and the last logits."""
    n = len(calls)
    ends: list = [None] * n
    active = [not d for d in done] if done is not None else [True] * n
    earlier = earlier if earlier is not None else [()] * n
    for _ in range(steps):
        if not any(active):
            break
        history = {}
        if params.has_processors:  # what the logits processors read: each row's prompt and output so far
            history = {"eos_ids": tokens.eos_ids, "prompt_ids": prompt_ids,
                       "output_ids": [list(e) + c.ids for e, c in zip(earlier, calls)]}
        tok, lp = sample_next(logits, params, generator, **history)
        live = [b for b in range(n) if active[b]]
        granted = grant(len(live)) if grant is not None else len(live)
        for b in live[granted:]:  # nothing pays for more tokens: these rows end here
            active[b], ends[b] = False, FinishReason.BUDGET
        fed = torch.zeros(n, dtype=torch.bool, device=logits.device)
        tok_list, lp_list = tok.tolist(), lp.tolist()
        for b in live[:granted]:
            fed[b] = True
            outcome = calls[b].accept(tok_list[b], lp_list[b], params, tokens, limit, stepwise)
            if isinstance(outcome, FinishReason):
                ends[b] = outcome
            active[b] = outcome is None
        if not granted or (not any(active) and not feed_last):
            break
        inp = torch.where(fed, tok, torch.full_like(tok, tokens.pad_id))
        logits = torch.where(fed[:, None], forward(inp, fed), logits)  # idle rows keep their distribution
    return ends, logits
