"""More strategies on the same engine: entropic particle filtering, early pruning by mid-generation
self-evaluation, verifier-guided iterative refinement, and compute-optimal allocation over a batch of prompts."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from ...errors import SteerscaleError
from ..budget import Budget
from ..verifiers import LogprobConfidence
from .base import annotate, best_of, check_positive, finish, representative, sampling_params, score, vote
from .search import run_particle_filter


def tempered(weights, target_ess: float) -> tuple[np.ndarray, float]:
    """Anneal ``weights`` to ``w ** beta`` with the largest beta in (0, 1] whose effective sample size is at
    least ``target_ess`` x n (entropy-triggered flattening: a collapsing population is kept diverse)."""
    w = np.asarray(weights, dtype=float)
    w = np.where(np.isfinite(w) & (w > 0), w, 1e-12)
    n = len(w)

    def ess(beta):
        x = w ** beta
        return x.sum() ** 2 / (x ** 2).sum() / n

    if ess(1.0) >= target_ess:
        return w, 1.0
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ess(mid) >= target_ess else (lo, mid)
    return w ** lo, lo


def run_entropic_pf(prompt, backend, verifier, budget, *, target_ess=0.5, **knobs):
    """Particle filtering whose resampling weights are annealed (w ** beta) whenever their effective sample
    size drops below ``target_ess`` x n."""
    if not 0 < target_ess <= 1:
        raise SteerscaleError(f"target_ess must be in (0, 1], got {target_ess}")
    r = run_particle_filter(prompt, backend, verifier, budget, weight_transform=lambda w: tempered(w, target_ess)[0],
                            **knobs)
    r.strategy = "entropic_pf"
    r.info["target_ess"] = target_ess
    return r


def run_early_pruning(prompt, backend, verifier, budget, *, n=8, keep=0.5, prune_after=1, seed=0, select="vote",
                      answer_fn=None, steer_scales=None, max_steps=16, **knobs):
    """Grow n solutions ``prune_after`` steps, score the partial solutions (e.g. ``self_eval``), drop all but the
    best ``keep`` fraction, and finish the survivors."""
    check_positive("n", n, getattr(backend, "max_n", None))
    if not 0 < keep <= 1:
        raise SteerscaleError(f"keep must be in (0, 1], got {keep}")
    params = sampling_params(**knobs)
    verifier = verifier or LogprobConfidence()
    br = backend.start(prompt, n, budget, seed=seed, steer_scales=steer_scales)
    failures, steps = [], 0
    while not br.all_finished and steps < max_steps and not budget.exhausted:
        backend.extend(br, params, budget)
        steps += 1
        if steps == prune_after:
            annotate(br.rows, answer_fn)
            failures += score(verifier, prompt, br.rows, budget, partial=True)
            order = sorted(range(len(br)), key=lambda i: (not br.rows[i].failed, br.rows[i].score or 0.0), reverse=True)
            br = backend.select(br, sorted(order[: max(1, math.ceil(keep * n))]))
    annotate(br.rows, answer_fn)
    answer, tally = vote(br.rows) if select == "vote" else ((best_of(br.rows) or br.rows[0]).answer, {})
    return finish("early_pruning", answer, representative(br.rows, answer), br.rows, budget, failures, tally=tally,
                  kept=len(br), steps=steps)


REFINE_TEMPLATE = ("{prompt}\n\nA previous attempt (verifier score {score:.2f} out of 1):\n{attempt}\n\n"
                   "Write an improved, correct solution.")


def run_refine(prompt, backend, verifier, budget, *, rounds=3, n=2, seed=0, answer_fn=None, **knobs):
    """Verifier-guided iterative refinement: each round samples ``n`` solutions to the prompt plus the best
    attempt so far and its score; the best-scored candidate over all rounds is kept."""
    check_positive("rounds", rounds)
    check_positive("n", n, getattr(backend, "max_n", None))
    params = sampling_params(**{**knobs, "step": None})
    verifier = verifier or LogprobConfidence()
    best, pool, failures = None, [], []
    for r in range(rounds):
        if budget.exhausted:
            break
        text = prompt if best is None else REFINE_TEMPLATE.format(prompt=prompt, score=best.score or 0.0,
                                                                  attempt=best.text.strip())
        cands = backend.sample(text, n, params, budget, seed=seed * 100 + r)
        annotate(cands, answer_fn)
        failures += score(verifier, prompt, cands, budget)
        for c in cands:
            c.meta["round"] = r
        pool += cands
        best = best_of(pool)
        if best is not None and best.score is not None and best.score >= 1.0:
            break
    return finish("refine", best.answer if best else None, best, pool, budget, failures, rounds=r + 1)


def run_compute_optimal(prompts, backend, verifier, budget, *, total=32, probe=2, cap=16, seed=0, answer_fn=None,
                        **knobs):
    """Compute-optimal allocation over a batch of prompts: ``probe`` samples each, difficulty = 1 - share of
    the leading answer, then the rest of ``total`` samples goes to prompts in proportion to difficulty (at
    most ``cap`` each). Returns one majority-vote ``Result`` per prompt, all charged to one budget."""
    from .base import Result  # noqa: F401  (documented return type)

    if isinstance(prompts, str):
        prompts = [prompts]
    check_positive("total", total)
    if total < probe * len(prompts):
        raise SteerscaleError(f"total={total} samples cannot cover {probe} probe samples for {len(prompts)} prompts",
                              "raise total or lower probe")
    params = sampling_params(**knobs)
    pools, difficulty = [], []
    for i, p in enumerate(prompts):
        c = backend.sample(p, probe, params, budget, seed=seed * 1000 + i)
        annotate(c, answer_fn)
        pools.append(c)
        top = Counter(x.answer for x in c if x.answer is not None).most_common(1)
        difficulty.append(1.0 - (top[0][1] / len(c) if top else 0.0))
    left = total - probe * len(prompts)
    d = np.asarray(difficulty) + 1e-9
    alloc = np.minimum(np.floor(left * d / d.sum()).astype(int), cap - probe)
    results = []
    for i, p in enumerate(prompts):
        if alloc[i] > 0 and not budget.exhausted:
            extra = backend.sample(p, int(alloc[i]), params, budget, seed=seed * 1000 + 500 + i)
            annotate(extra, answer_fn)
            pools[i] += extra
        answer, tally = vote(pools[i])
        results.append(finish("compute_optimal", answer, representative(pools[i], answer), pools[i], budget, [],
                              tally=tally, difficulty=round(difficulty[i], 3), samples=len(pools[i])))
    return results
