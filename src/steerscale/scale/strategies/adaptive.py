"""Adaptive self-consistency: draw samples in small batches from the once-encoded prompt and stop as soon as
the vote is settled, either by a supermajority or by a Beta-posterior test (Aggarwal et al., 2023)."""

from __future__ import annotations

import math
from collections import Counter

from ..backend import derive_seed
from .base import Criterion, annotate, check_positive, finish, representative, sampling_params, vote


def prob_leader_better(lead: int, second: int) -> float:
    """P(p_lead > p_second) under Beta(lead+1, second+1) on the two leading answers' share, i.e.
    P(X > 1/2) for X ~ Beta(a, b) with integer a, b, computed exactly: P(Binomial(a+b-1, 1/2) <= a-1)."""
    a, b = lead + 1, second + 1
    n = a + b - 1
    return sum(math.comb(n, k) for k in range(a)) / 2 ** n


def settled(answers, *, criterion=Criterion.BETA, confidence=0.95, threshold=0.7, min_samples=4) -> bool:
    """The stopping rule: whether the vote over ``answers`` so far (``None`` = no answer) is decided."""
    criterion = Criterion.parse(criterion)
    counts = Counter(a for a in answers if a is not None).most_common(2)
    if not counts or len(answers) < min_samples:
        return False
    lead = counts[0][1]
    second = counts[1][1] if len(counts) > 1 else 0
    if criterion is Criterion.BETA:
        return prob_leader_better(lead, second) >= confidence
    return lead / len(answers) >= threshold


def samples_needed(answers, *, batch=4, **rule) -> int:
    """How many of an already drawn sequence of ``answers`` adaptive SC would have used with this ``batch`` and
    stopping ``rule`` (``settled``'s knobs): replaying the rule on prefixes of one pool gives the accuracy/samples
    trade-off of every setting without drawing again."""
    check_positive("batch", batch)
    k = 0
    while k < len(answers):
        k = min(k + batch, len(answers))
        if settled(answers[:k], **rule):
            break
    return k


def run(prompt, backend, verifier, budget, *, n=16, batch=4, seed=0, criterion=Criterion.BETA, confidence=0.95,
        threshold=0.7, min_samples=4, answer_fn=None, **knobs):
    check_positive("n", n, getattr(backend, "max_n", None))
    check_positive("batch", batch)
    rule = dict(criterion=criterion, confidence=confidence, threshold=threshold, min_samples=min_samples)
    settled([], **rule)  # a bad criterion fails before any sampling
    params = sampling_params(**knobs)
    cands = []
    stopped_early = False
    rnd = 0
    while len(cands) < n and not budget.exhausted:
        k = min(batch, n - len(cands))
        new = backend.sample(prompt, k, params, budget, seed=derive_seed(seed, "round", rnd))
        annotate(new, answer_fn)
        cands.extend(new)
        rnd += 1
        if settled([c.answer for c in cands], **rule):
            stopped_early = len(cands) < n
            break
    answer, tally = vote(cands)
    return finish("adaptive_sc", answer, representative(cands, answer), cands, budget, [], tally=tally,
                  samples_used=len(cands), stopped_early=stopped_early, criterion=criterion)
