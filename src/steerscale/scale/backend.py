"""The backend interface every strategy talks to, and the data it returns.

A strategy never samples tokens itself. It asks a ``Backend`` to

* ``sample(prompt, n, params)``: draw ``n`` complete continuations of one prompt (with per-token log-probs),
  stopping each on EOS, a stop string or ``params.max_tokens``;
* ``start(prompt, n)`` then ``extend(branches, params)``: grow ``n`` partial sequences one *step* at a time
  (a step ends at ``params.step``, default a blank line), for beam search, particle filtering and A*;
* ``select(branches, indices)``: fork (an index repeated) and drop (an index left out) partial sequences,
  e.g. after resampling; ``merge([...])`` joins separately kept partial sequences into one batch;
* ``choice_logprobs(contexts, options)``: log-probability of each option's first token after each context
  (self-evaluation ``P(Yes)``), charged to the budget as verifier work;
* ``embed(texts)`` (optional): one float vector per text (``LocalBackend``: mean-pooled hidden states), charged
  as verifier work; used by the ``diverse`` verifier's representation-diversity bonus. The base class raises
  ``SteerscaleError`` ("this backend cannot embed"), so a backend without hidden states still fits.

``Branches`` holds the ``Candidate`` rows a strategy reads, plus an opaque ``handle`` that only the backend
understands (for ``LocalBackend``: a batched KV cache, one row per candidate; for an HTTP backend: nothing but
the texts, re-sent with server-side prefix caching). That is what keeps a second backend (an
OpenAI-compatible client for vLLM, SGLang or llama.cpp servers) free of changes to the strategies.

Steering is not part of this interface: a backend that can steer (``LocalBackend``) is built with its
interventions (and per-row multipliers for steering-diversified sampling); strategies never mention it.

Budget: a backend buys every unit of work from the ledger (``Budget.buy_*``) before doing it, so a limit is a
hard cap; see ``scale.budget``.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Sequence

from ..errors import SteerscaleError
from .budget import Budget

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


def derive_seed(seed: int | None, *keys) -> int | None:
    """The seed for one part of a seeded run (one example, one round, one prompt of a batch), sharing no random
    stream with the other parts; ``None`` stays ``None`` (unseeded).

    Why not pass one seed to every prompt: samplers draw tokens by inverse CDF, so prompts sampled from the same
    stream pick their tokens at the same quantiles. Sample ``i`` of every prompt is then correlated with sample
    ``i`` of every other, and averaging over prompts no longer averages out the sampling noise (a seeded
    benchmark's intervals come out too narrow, its per-sample accuracy off by the luck of one draw)."""
    if seed is None:
        return None
    digest = hashlib.blake2b(repr((int(seed),) + tuple(str(k) for k in keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


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
    # OpenAI/vLLM extras (``scale.logits``); each default is the identity, so default params sample as before
    top_k: int = 0  # keep the k most likely tokens; 0: off (no cut)
    min_p: float = 0.0  # keep tokens with prob >= min_p * the top prob; 0: off (every prob is >= 0)
    repetition_penalty: float = 1.0  # seen tokens' logits divided (>0) / multiplied (<0) by it; 1: off (x/1 = x)
    presence_penalty: float = 0.0  # subtracted once from each token already generated; 0: off
    frequency_penalty: float = 0.0  # subtracted per occurrence of each token already generated; 0: off
    min_tokens: int = 0  # no EOS and no stop string before this many generated tokens; 0: off (no minimum)
    ignore_eos: bool = False  # never sample EOS (run to max_tokens or a stop string); False: off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), sorted; (): off

    @property
    def has_processors(self) -> bool:
        """True when ``scale.logits.process_logits`` changes the logits (else it returns them untouched)."""
        return bool(self.logit_bias or self.min_tokens or self.ignore_eos or self.repetition_penalty != 1
                    or self.presence_penalty or self.frequency_penalty)

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

    def with_(self, **changes) -> "SamplingParams":
        return replace(self, **changes)


class FinishReason(StrEnum):
    """Why a candidate stopped growing (members compare equal to their text, and serialise as it)."""

    EOS = "eos"  # the model's end-of-sequence token
    STOP = "stop"  # a stop string (the text is cut before it)
    LENGTH = "length"  # max_tokens, or the context window
    BUDGET = "budget"  # the budget could pay for no more tokens
    CANCELLED = "cancelled"  # the request was cancelled (a server's client went away)


@dataclass
class Candidate:
    """One (partial or complete) continuation of the prompt."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # model log-prob (temperature 1) of each sampled token
    steps: list[str] = field(default_factory=list)  # text of each completed step
    finished: bool = False
    finish_reason: FinishReason | None = None
    score: float | None = None  # the verifier's score (None: not scored)
    step_scores: list[float] = field(default_factory=list)
    answer: str | None = None
    failed: bool = False  # the verifier raised or returned NaN on it
    meta: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        # Remote backends get no token ids from an OpenAI-compatible server, only one log-prob per token.
        return len(self.token_ids) or len(self.logprobs)

    @property
    def sum_logprob(self) -> float:
        return float(sum(self.logprobs))

    @property
    def mean_logprob(self) -> float:
        return self.sum_logprob / max(1, len(self.logprobs))

    def copy(self) -> "Candidate":
        return Candidate(self.text, list(self.token_ids), list(self.logprobs), list(self.steps), self.finished,
                         self.finish_reason, self.score, list(self.step_scores), self.answer, self.failed,
                         dict(self.meta))

    def to_dict(self) -> dict:
        return {"text": self.text, "answer": self.answer, "score": self.score, "n_tokens": self.n_tokens,
                "mean_logprob": round(self.mean_logprob, 4), "finished": self.finished,
                "finish_reason": self.finish_reason, "n_steps": len(self.steps), "failed": self.failed,
                **({"meta": self.meta} if self.meta else {})}


@dataclass
class Branches:
    """Partial sequences of one prompt that a search grows step by step. ``handle`` is backend-private."""

    prompt: str
    rows: list[Candidate]
    handle: Any = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def all_finished(self) -> bool:
        return all(c.finished for c in self.rows)


class Backend(ABC):
    """A generator a strategy can sample from. See the module docstring for the contract."""

    name: str = "backend"
    max_n: int = 256  # cap on rows per call; larger requests raise SteerscaleError

    @property
    def n_params(self) -> int:
        """Parameter count used for FLOP estimates (0 when unknown, e.g. a remote server)."""
        return 0

    def check_n(self, n: int) -> int:
        if not isinstance(n, int) or n < 1:
            raise SteerscaleError(f"number of samples must be a positive integer, got {n!r}")
        if n > self.max_n:
            raise SteerscaleError(f"{n} samples requested but this backend is capped at {self.max_n} per call",
                                  "lower n, or raise the backend's max_n if memory allows")
        return n

    def check_select(self, branches: "Branches", indices: Sequence[int]) -> list[int]:
        """The row indices of a ``select`` call, checked: at least one, each in range, at most ``max_n``."""
        idx = [int(i) for i in indices]
        if not idx:
            raise SteerscaleError("select() needs at least one row", "keep at least one partial sequence")
        if min(idx) < 0 or max(idx) >= len(branches.rows):
            raise SteerscaleError(f"select() index out of range for {len(branches.rows)} rows: {idx}")
        self.check_n(len(idx))
        return idx

    @staticmethod
    def check_merge(parts: Sequence["Branches"]) -> list["Branches"]:
        """The non-empty parts of a ``merge`` call, checked: at least one, all of one prompt."""
        parts = [p for p in parts if p.rows]
        if not parts:
            raise SteerscaleError("merge() needs at least one non-empty Branches")
        if len({p.prompt for p in parts}) != 1:
            raise SteerscaleError("merge() joins partial sequences of one prompt only")
        return parts

    @abstractmethod
    def sample(self, prompt: str, n: int, params: SamplingParams, budget: Budget, *,
               seed: int | None = None) -> list[Candidate]:
        """``n`` complete continuations of ``prompt`` (prompt encoded once)."""

    @abstractmethod
    def start(self, prompt: str, n: int, budget: Budget, *, seed: int | None = None) -> Branches:
        """``n`` empty partial sequences of ``prompt``, ready for ``extend``."""

    @abstractmethod
    def extend(self, branches: Branches, params: SamplingParams, budget: Budget) -> Branches:
        """Grow every unfinished row by one step (in place; returns ``branches``)."""

    @abstractmethod
    def select(self, branches: Branches, indices: Sequence[int]) -> Branches:
        """A new ``Branches`` with rows ``indices`` (repeats fork a row, omissions drop it)."""

    @abstractmethod
    def merge(self, parts: Sequence[Branches]) -> Branches:
        """Join partial sequences of the same prompt into one batch."""

    @abstractmethod
    def choice_logprobs(self, contexts: Sequence[str], options: Sequence[str], budget: Budget) -> list[list[float]]:
        """``[i][j]``: log-prob of ``options[j]``'s first token right after ``contexts[i]`` (chat-formatted)."""

    def embed(self, texts: Sequence[str], budget: Budget, *, layer: int = -1):
        """``(len(texts), d)`` float tensor: one vector per text (e.g. mean-pooled hidden states of ``layer``),
        charged to ``budget``. Optional: backends that cannot embed raise ``SteerscaleError``."""
        raise SteerscaleError(f"this backend ({self.name}) cannot embed texts",
                              "use a LocalBackend (mean-pooled hidden states), or a verifier that needs no "
                              "embeddings instead of 'diverse'")
