"""What every strategy shares: the ``Result``, sampling knobs, voting and candidate ranking."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ...errors import SteerscaleError
from ..answers import extract_answer
from ..backend import DEFAULT_STEP, Candidate, SamplingParams
from ..budget import Budget
from ..verifiers import score_candidates


@dataclass
class Result:
    strategy: str
    answer: str | None
    best: Candidate | None
    candidates: list[Candidate]
    budget: dict  # Budget.report() at the end of the run
    failures: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def generated_tokens(self) -> int:
        return int(self.budget["spent"]["generated_tokens"])

    def to_dict(self, with_candidates: bool = True) -> dict:
        d = {"strategy": self.strategy, "answer": self.answer, "text": self.best.text if self.best else None,
             "budget": self.budget, "failures": self.failures, "info": self.info}
        if with_candidates:
            d["candidates"] = [c.to_dict() for c in self.candidates]
        return d


def sampling_params(max_tokens: int = 256, temperature: float = 0.7, top_p: float = 1.0, stop=(),
                    step: str | None = DEFAULT_STEP, max_step_tokens: int = 128, **_) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop or ()),
                          step=step, max_step_tokens=max_step_tokens)


def check_positive(name: str, value, cap: int | None = None) -> int:
    if not isinstance(value, int) or value < 1:
        raise SteerscaleError(f"{name} must be a positive integer, got {value!r}")
    if cap is not None and value > cap:
        raise SteerscaleError(f"{name}={value} exceeds the cap of {cap}", f"use {name} <= {cap}")
    return value


def annotate(cands: Sequence[Candidate], answer_fn: Callable[[str], str | None] | None) -> None:
    fn = answer_fn or extract_answer
    for c in cands:
        c.answer = fn(c.text)


def rank_key(c: Candidate):
    """Scored beats failed/unscored; then higher score; then higher mean log-prob."""
    return (0 if c.failed or c.score is None else 1, c.score if c.score is not None else -math.inf, c.mean_logprob)


def best_of(cands: Sequence[Candidate]) -> Candidate | None:
    return max(cands, key=rank_key) if cands else None


def vote(cands: Sequence[Candidate], weights: Sequence[float] | None = None) -> tuple[str | None, dict]:
    """Answer with the largest (weighted) count; ties go to the answer whose best member has the higher
    mean log-prob. Candidates without an answer do not vote."""
    tally: dict[str, float] = defaultdict(float)
    tie: dict[str, float] = defaultdict(lambda: -math.inf)
    for i, c in enumerate(cands):
        if c.answer is None:
            continue
        w = 1.0 if weights is None else float(weights[i])
        if not math.isfinite(w):
            continue
        tally[c.answer] += w
        tie[c.answer] = max(tie[c.answer], c.mean_logprob)
    if not tally:
        return None, {}
    winner = max(tally, key=lambda a: (tally[a], tie[a]))
    return winner, dict(tally)


def representative(cands: Sequence[Candidate], answer: str | None) -> Candidate | None:
    members = [c for c in cands if c.answer == answer and answer is not None]
    return best_of(members) if members else best_of(cands)


def finish(name: str, answer, best, cands, budget: Budget, failures, **info) -> Result:
    counts = Counter(c.answer for c in cands if c.answer is not None)
    info.setdefault("n_candidates", len(cands))
    info.setdefault("n_distinct_answers", len(counts))
    return Result(name, answer, best, list(cands), budget.report(), list(failures), info)


def score(verifier, prompt, cands, budget, partial=False) -> list[str]:
    return score_candidates(verifier, prompt, cands, budget, partial=partial)
