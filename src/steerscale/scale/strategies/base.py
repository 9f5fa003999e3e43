"""What every strategy shares: the ``Result``, sampling knobs, voting and candidate ranking."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Callable, Sequence

from ...errors import SteerscaleError
from ...answers import extract_answer
from ..backend import Candidate, SamplingParams
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


# -- knobs with a fixed set of values -------------------------------------------------------------------------
class Choice(StrEnum):
    """A knob with a fixed set of values. ``parse`` turns text (JSON, CLI) into a member, or a ``SteerscaleError``
    naming the knob and listing the values; members compare equal to their text."""

    @classmethod
    def parse(cls, value) -> "Choice":
        try:
            return cls(value)
        except ValueError:
            raise SteerscaleError(f"unknown {cls.label()} {value!r}", "use " + ", ".join(m.value for m in cls)) from None

    @classmethod
    def label(cls) -> str:
        first = cls.__doc__.strip().splitlines()[0] if cls.__doc__ else cls.__name__
        return first.split(":")[0].rstrip(".").lower()  # "Final selection: how ..." -> "final selection"


class Selection(Choice):
    """Final selection: how a search picks its answer from its finished candidates."""

    BEST = "best"  # the highest-scored candidate
    VOTE = "vote"  # majority over answers
    WEIGHTED = "weighted"  # vote weighted by the verifier's scores


class Resampling(Choice):
    """Resampling method of particle filtering."""

    SYSTEMATIC = "systematic"  # one uniform offset: low variance
    MULTINOMIAL = "multinomial"


class Criterion(Choice):
    """Stopping criterion of adaptive self-consistency."""

    BETA = "beta"  # Beta-posterior test that the leading answer is the majority
    SUPERMAJORITY = "supermajority"  # the leading answer's share reaches a threshold


SAMPLING_KNOBS = tuple(f.name for f in fields(SamplingParams))  # max_tokens, temperature, top_p, stop, step, ...


def sampling_params(**knobs) -> SamplingParams:
    """``SamplingParams`` from a strategy's sampling knobs; any other key is a typo and a ``SteerscaleError``."""
    unknown = sorted(set(knobs) - set(SAMPLING_KNOBS))
    if unknown:
        raise SteerscaleError(f"unknown knob {', '.join(map(repr, unknown))}",
                              f"sampling knobs: {', '.join(SAMPLING_KNOBS)}; see StrategySpec for each strategy's own")
    if "stop" in knobs:
        knobs["stop"] = tuple(knobs["stop"] or ())
    return SamplingParams(**knobs)


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
