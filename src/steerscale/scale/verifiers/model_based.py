"""Model-based scorers: self-evaluation P(Yes), LLM-as-judge (pointwise, votes), log-prob confidence."""

from __future__ import annotations

import math
import re

from ...errors import SteerscaleError
from ..backend import Backend, SamplingParams
from .base import Verifier

SELF_EVAL_TEMPLATE = ("Question: {question}\nProposed solution: {solution}\n\n"
                      "Is the proposed solution correct? Answer Yes or No.")
JUDGE_TEMPLATE = ("Rate how correct and helpful this answer is on a scale from 1 to 10.\n\nQuestion: {question}\n"
                  "Answer: {solution}\n\nReply with only the number (1-10).")


class _ModelVerifier(Verifier):
    def __init__(self, reference=None, backend: Backend | None = None):
        super().__init__(reference)
        if backend is None:
            raise SteerscaleError(f"verifier {self.name!r} needs a model backend",
                                  "pass backend=... (the generator's own LocalBackend works)")
        self.backend = backend


class SelfEval(_ModelVerifier):
    """``P(Yes) / (P(Yes) + P(No))`` when the model is asked whether the (partial) solution is correct.
    One batched forward pass for all candidates, charged to the budget as verifier passes and tokens."""

    name = "self_eval"
    process = True

    def __init__(self, reference=None, backend=None, template: str = SELF_EVAL_TEMPLATE):
        super().__init__(reference, backend)
        self.template = template

    def score_batch(self, question, candidates, budget, partial=False):
        contexts = [self.template.format(question=question, solution=c.text.strip() or "(empty)") for c in candidates]
        lp = self.backend.choice_logprobs(contexts, ["Yes", "No"], budget)
        return [1.0 / (1.0 + math.exp(n - y)) for y, n in lp]


class LLMJudge(_ModelVerifier):
    """Pointwise LLM-as-judge: ``votes`` judge samples, each parsed for a 1-10 rating; the mean / 10.
    Unparseable samples are dropped; when none parses the candidate fails (NaN)."""

    name = "judge"

    def __init__(self, reference=None, backend=None, votes: int = 3, temperature: float = 0.7, seed: int = 0,
                 template: str = JUDGE_TEMPLATE):
        super().__init__(reference, backend)
        if votes < 1:
            raise SteerscaleError(f"judge votes must be >= 1, got {votes}")
        self.votes, self.temperature, self.seed, self.template = votes, temperature, seed, template

    def score(self, question, candidate, budget, partial=False):
        prompt = self.template.format(question=question, solution=candidate.text.strip() or "(empty)")
        params = SamplingParams(max_tokens=8, temperature=self.temperature if self.votes > 1 else 0.0, step=None)
        outs = self.backend.sample(prompt, self.votes, params, budget, seed=self.seed)
        budget.charge(judge_calls=self.votes)
        ratings = []
        for o in outs:
            m = re.search(r"\b(10|[1-9])\b", o.text)
            if m:
                ratings.append(int(m.group(1)))
        return sum(ratings) / (10.0 * len(ratings)) if ratings else float("nan")


class LogprobConfidence(Verifier):
    """The generator's own confidence: ``exp(mean token log-prob)`` of the candidate (no extra compute)."""

    name = "logprob"
    process = True

    def score(self, question, candidate, budget, partial=False):
        if not candidate.logprobs:
            return 0.0
        return math.exp(candidate.mean_logprob)
