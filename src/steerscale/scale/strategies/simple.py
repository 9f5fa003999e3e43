"""Strategies that sample complete solutions in one batch: greedy, best-of-N, majority and weighted vote."""

from __future__ import annotations

from .base import annotate, best_of, check_positive, finish, representative, sampling_params, score, vote


def run_greedy(prompt, backend, verifier, budget, *, seed=0, answer_fn=None, **knobs):
    params = sampling_params(**{**knobs, "temperature": 0.0})
    cands = backend.sample(prompt, 1, params, budget, seed=seed)
    annotate(cands, answer_fn)
    failures = score(verifier, prompt, cands, budget)
    return finish("greedy", cands[0].answer, cands[0], cands, budget, failures)


def _sample(prompt, backend, budget, n, seed, knobs):
    check_positive("n", n, getattr(backend, "max_n", None))
    return backend.sample(prompt, n, sampling_params(**knobs), budget, seed=seed)


def _score_with_default(verifier, prompt, cands, budget):
    """Score candidates; without a verifier, by the generator's own log-prob confidence."""
    if verifier is None:
        from ..verifiers import LogprobConfidence

        verifier = LogprobConfidence()
    return verifier, score(verifier, prompt, cands, budget)


def run_best_of_n(prompt, backend, verifier, budget, *, n=8, seed=0, answer_fn=None, **knobs):
    cands = _sample(prompt, backend, budget, n, seed, knobs)
    annotate(cands, answer_fn)
    verifier, failures = _score_with_default(verifier, prompt, cands, budget)
    best = best_of(cands)
    return finish("best_of_n", best.answer, best, cands, budget, failures, verifier=verifier.name)


def run_majority(prompt, backend, verifier, budget, *, n=8, seed=0, answer_fn=None, **knobs):
    cands = _sample(prompt, backend, budget, n, seed, knobs)
    annotate(cands, answer_fn)
    answer, tally = vote(cands)
    return finish("majority", answer, representative(cands, answer), cands, budget, [], tally=tally)


def run_weighted_vote(prompt, backend, verifier, budget, *, n=8, seed=0, answer_fn=None, **knobs):
    cands = _sample(prompt, backend, budget, n, seed, knobs)
    annotate(cands, answer_fn)
    verifier, failures = _score_with_default(verifier, prompt, cands, budget)
    answer, tally = vote(cands, [0.0 if c.failed or c.score is None else c.score for c in cands])
    return finish("weighted_vote", answer, representative(cands, answer), cands, budget, failures, tally=tally,
                  verifier=verifier.name)
