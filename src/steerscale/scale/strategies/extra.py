"""More strategies on the same engine: entropic particle filtering (annealing + look-ahead modulation), early
pruning by mid-generation self-evaluation, verifier-guided iterative refinement, and compute-optimal allocation
over a batch of prompts."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from ...errors import SteerscaleError
from ..backend import derive_seed
from ..verifiers import LogprobConfidence
from .base import (Resampling, Selection, annotate, best_of, check_positive, finish, representative, sampling_params,
                   score, vote)
from .search import _final, _scorer, check_select, filter_particles


def tempered(weights, target_ess: float) -> tuple[np.ndarray, float]:
    """Anneal ``weights`` to ``w ** beta`` with the largest beta in (0, 1] whose effective sample size is at
    least ``target_ess`` x n (entropy-triggered flattening: a collapsing population is kept diverse)."""
    w = np.asarray(weights, dtype=float)
    w = np.where(np.isfinite(w) & (w > 0), w, 0.0)  # failed particles stay at zero under any beta
    n = len(w)
    if not w.any():
        return w, 1.0

    alive = w > 0

    def power(beta):  # w ** beta on the live particles only (0 ** 0 would revive a failed one)
        return np.where(alive, w, 1.0) ** beta * alive

    def ess(beta):
        x = power(beta)
        return x.sum() ** 2 / (x ** 2).sum() / n

    if ess(1.0) >= target_ess:
        return w, 1.0
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ess(mid) >= target_ess else (lo, mid)
    return power(lo), lo


def modulate(weights, scores, ahead, strength: float) -> np.ndarray:
    """Look-ahead modulation: ``w * exp(strength * (ahead - score))`` -- a particle whose look-ahead step scores
    higher than its current step gains weight, one heading downhill loses it. Where either score is missing
    (finished particle, failed verifier) the weight is left as it is."""
    w = np.asarray(weights, dtype=float)
    s, a = np.asarray(scores, dtype=float), np.asarray(ahead, dtype=float)
    delta = np.where(np.isfinite(s) & np.isfinite(a), a - s, 0.0)
    return w * np.exp(strength * delta)


def run_entropic_pf(prompt, backend, verifier, budget, *, target_ess=0.5, lookahead=0, lookahead_weight=1.0,
                    lookahead_temperature=0.0, n=8, seed=0, max_steps=16, resampling=Resampling.SYSTEMATIC,
                    weight_temperature=1.0, select=Selection.WEIGHTED, answer_fn=None, **knobs):
    """Entropic particle filtering (ePF; Red Hat AI Innovation's its_hub / "Entropic Particle Filtering", 2025):
    particle filtering with its two guards against premature exploitation.

    * Entropic annealing: whenever the resampling weights' effective sample size drops below ``target_ess`` x n,
      they are flattened to ``w ** beta`` with the largest ``beta`` that restores it (``tempered``).
    * Look-ahead modulation (``lookahead`` > 0 steps; 0, the default, turns it off): after each step, every
      unfinished particle is forked into a throw-away probe (a KV-cache ``select``, nothing re-encoded) that
      grows ``lookahead`` more steps at ``lookahead_temperature`` (0: greedy); the verifier scores the probe's
      partial solution and the particle's weight becomes ``w * exp(lookahead_weight * (probe score - score))``
      before annealing. Probes are dropped after scoring; their tokens and verifier passes are charged to the
      budget (``info["lookahead_tokens"]``). The paper describes look-ahead modulation as judging a state by its
      successors; its_hub only scaffolds the flag (``does_lookahead_modulation``), so this exponential
      modulation by the score change is our reading of it.

    With ``lookahead=0`` this is exactly ``particle_filter`` with annealed weights."""
    if not 0 < target_ess <= 1:
        raise SteerscaleError(f"target_ess must be in (0, 1], got {target_ess}")
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
        raise SteerscaleError(f"lookahead must be a non-negative integer number of steps, got {lookahead!r}",
                              "0 turns look-ahead modulation off")
    if not (isinstance(lookahead_weight, (int, float)) and math.isfinite(lookahead_weight) and lookahead_weight >= 0):
        raise SteerscaleError(f"lookahead_weight must be a finite number >= 0, got {lookahead_weight!r}")
    probe_params = sampling_params(**knobs).with_(temperature=float(lookahead_temperature))
    scorer = _scorer(verifier)
    betas, ahead_tokens = [], [0]

    def reweight(w, branches, failures):
        if lookahead and lookahead_weight > 0 and not budget.exhausted:
            live = [i for i, c in enumerate(branches.rows) if not c.finished and not c.failed and c.score is not None]
            ahead = [math.nan] * len(branches)
            if live:
                probe = backend.select(branches, live)
                before = sum(c.n_tokens for c in probe.rows)
                for _ in range(lookahead):
                    if probe.all_finished or budget.exhausted:
                        break
                    backend.extend(probe, probe_params, budget)
                ahead_tokens[0] += sum(c.n_tokens for c in probe.rows) - before
                annotate(probe.rows, answer_fn)
                failures += [f"look-ahead: {f}" for f in score(scorer, prompt, probe.rows, budget, partial=True)]
                for i, c in zip(live, probe.rows):
                    if not c.failed and c.score is not None:
                        ahead[i] = c.score
                        branches.rows[i].meta["lookahead_score"] = c.score
            current = [math.nan if c.failed or c.score is None else c.score for c in branches.rows]
            w = modulate(w, current, ahead, lookahead_weight)
        w, beta = tempered(w, target_ess)
        betas.append(round(float(beta), 6))
        return w

    check_select(select)
    branches, failures, steps, resamples = filter_particles(
        prompt, backend, verifier, budget, n=n, seed=seed, max_steps=max_steps, resampling=resampling,
        weight_temperature=weight_temperature, answer_fn=answer_fn, reweight=reweight,
        **knobs)
    return _final("entropic_pf", branches.rows, select, budget, failures, steps=steps, resamples=resamples,
                  target_ess=target_ess, betas=betas, lookahead=lookahead, lookahead_weight=lookahead_weight,
                  lookahead_tokens=ahead_tokens[0])


def run_early_pruning(prompt, backend, verifier, budget, *, n=8, keep=0.5, prune_after=1, seed=0, select=Selection.VOTE,
                      answer_fn=None, max_steps=16, **knobs):
    """Grow n solutions ``prune_after`` steps, score the partial solutions (e.g. ``self_eval``), drop all but the
    best ``keep`` fraction, and finish the survivors."""
    check_positive("n", n, getattr(backend, "max_n", None))
    if not 0 < keep <= 1:
        raise SteerscaleError(f"keep must be in (0, 1], got {keep}")
    check_select(select)
    params = sampling_params(**knobs)
    verifier = verifier or LogprobConfidence()
    br = backend.start(prompt, n, budget, seed=seed)
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
    if select != Selection.VOTE:  # the pruning scores saw only the first steps: judge the finished survivors again
        failures += score(verifier, prompt, br.rows, budget)
    return _final("early_pruning", br.rows, select, budget, failures, kept=len(br), steps=steps)


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
        cands = backend.sample(text, n, params, budget, seed=derive_seed(seed, "round", r))
        annotate(cands, answer_fn)
        failures += score(verifier, prompt, cands, budget)
        for c in cands:
            c.meta["round"] = r
        pool += cands
        best = best_of(pool)
        if best is not None and best.score is not None and best.score >= 1.0:
            break
    return finish("refine", best.answer if best else None, best, pool, budget, failures, rounds=r + 1)


def allocate(samples: int, difficulty, room: int) -> np.ndarray:
    """Split ``samples`` over prompts in proportion to ``difficulty``, at most ``room`` each; every sample is
    placed while some prompt has room (floors first, then one each by largest remainder, harder prompts first)."""
    d = np.asarray(difficulty, dtype=float) + 1e-9
    alloc = np.zeros(len(d), dtype=int)
    room = max(int(room), 0)
    left = min(int(samples), room * len(d))
    while left > 0:  # each round places every sample or fills a prompt to ``room``; the overflow goes round again
        share = np.where(alloc < room, d, 0.0)
        exact = left * share / share.sum()
        add = np.floor(exact + 1e-9).astype(int)
        by_remainder = sorted(np.flatnonzero(alloc < room), key=lambda i: (exact[i] - add[i], d[i]), reverse=True)
        add[by_remainder[: left - int(add.sum())]] += 1
        add = np.minimum(add, room - alloc)
        alloc += add
        left -= int(add.sum())
    return alloc


def run_compute_optimal(prompts, backend, verifier, budget, *, total=32, probe=2, cap=16, seed=0, answer_fn=None,
                        **knobs):
    """Compute-optimal allocation over a batch of prompts: ``probe`` samples each, difficulty = 1 - share of
    the leading answer, then the rest of ``total`` samples goes to prompts in proportion to difficulty (at
    most ``cap`` each). Returns one majority-vote ``Result`` per prompt, all charged to one budget."""
    if isinstance(prompts, str):
        prompts = [prompts]
    check_positive("total", total)
    if total < probe * len(prompts):
        raise SteerscaleError(f"total={total} samples cannot cover {probe} probe samples for {len(prompts)} prompts",
                              "raise total or lower probe")
    params = sampling_params(**knobs)
    pools, difficulty = [], []
    for i, p in enumerate(prompts):
        c = backend.sample(p, probe, params, budget, seed=derive_seed(seed, "probe", i))
        annotate(c, answer_fn)
        pools.append(c)
        top = Counter(x.answer for x in c if x.answer is not None).most_common(1)
        difficulty.append(1.0 - (top[0][1] / len(c) if top else 0.0))
    alloc = allocate(total - probe * len(prompts), difficulty, cap - probe)
    results = []
    for i, p in enumerate(prompts):
        if alloc[i] > 0 and not budget.exhausted:
            extra = backend.sample(p, int(alloc[i]), params, budget, seed=derive_seed(seed, "extra", i))
            annotate(extra, answer_fn)
            pools[i] += extra
        answer, tally = vote(pools[i])
        results.append(finish("compute_optimal", answer, representative(pools[i], answer), pools[i], budget, [],
                              tally=tally, difficulty=round(difficulty[i], 3), samples=len(pools[i])))
    return results


def run_compute_optimal_one(prompt, backend, verifier, budget, *, total=16, probe=2, cap=16, seed=0, answer_fn=None,
                            **knobs):
    """Compute-optimal allocation for one prompt (the registry's form): ``probe`` samples, then up to ``cap`` in
    all while ``total`` allows. Over a batch of prompts, ``run_compute_optimal`` shares ``total`` between them."""
    return run_compute_optimal([prompt], backend, verifier, budget, total=total, probe=probe, cap=cap, seed=seed,
                               answer_fn=answer_fn, **knobs)[0]
