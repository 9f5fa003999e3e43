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
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

# the decoding core's types, re-exported: strategies and backends speak them (``engine/decoding.py`` defines them)
from ..engine.decoding import DEFAULT_STEP, FinishReason, SamplingParams, find_stop, step_end  # noqa: F401
from ..errors import SteerscaleError
from .budget import Budget


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
