"""Step-level search over partial solutions kept in the backend's KV cache: beam search, DVTS, particle
filtering (systematic / multinomial resampling) and A*-decoding. Every step is one ``backend.extend``; forks
and drops are ``backend.select``; nothing is re-encoded."""

from __future__ import annotations

import heapq
import itertools
import math

import numpy as np

from ...errors import SteerscaleError
from ..verifiers import LogprobConfidence
from .base import (Resampling, Selection, annotate, best_of, check_positive, finish, rank_key, representative,
                   sampling_params, score, vote)


def _scorer(verifier):
    return verifier if verifier is not None else LogprobConfidence()


def check_select(select) -> Selection:
    """Every search strategy calls this before sampling (and ``_final`` again), so a typo costs no tokens."""
    return Selection.parse(select)


def _final(name, cands, select, budget, failures, **info):
    if check_select(select) is Selection.BEST:
        best = best_of(cands)
        answer = best.answer if best else None
    else:
        weights = None if select == Selection.VOTE else [0.0 if c.failed or c.score is None else c.score for c in cands]
        answer, tally = vote(cands, weights)
        info["tally"] = tally
        best = representative(cands, answer)
    return finish(name, answer, best, cands, budget, failures, **info)


# -- beam search and DVTS ----------------------------------------------------------------------------------
def _tree(name, prompt, backend, verifier, budget, *, n, width, groups, seed, max_steps, select, answer_fn,
          knobs):
    check_positive("n", n, getattr(backend, "max_n", None))
    check_positive("width", width)
    check_select(select)
    if n % width:
        raise SteerscaleError(f"n={n} must be a multiple of width={width}", "e.g. n=8 width=4")
    params = sampling_params(**knobs)
    verifier = _scorer(verifier)
    branches = backend.start(prompt, n, budget, seed=seed)
    group = [i * groups // n for i in range(n)]  # subtree of each row (DVTS); 1 group: plain beam search
    done, failures, steps = [], [], 0
    while len(branches) and steps < max_steps and not budget.exhausted:
        backend.extend(branches, params, budget)
        steps += 1
        annotate(branches.rows, answer_fn)
        failures += score(verifier, prompt, branches.rows, budget, partial=True)
        keep = []
        for i, c in enumerate(branches.rows):
            if c.finished:
                done.append(c)
            else:
                keep.append(i)
        if not keep or len(done) >= n:
            break
        # keep the best n/width unfinished rows (per subtree for DVTS) and fork each `width` times
        chosen = []
        per_group = max(1, (n // width) // groups)
        for g in sorted(set(group[i] for i in keep)):
            members = sorted((i for i in keep if group[i] == g), key=lambda i: rank_key(branches.rows[i]), reverse=True)
            chosen += members[:per_group]
        idx = [i for i in chosen for _ in range(width)]
        group = [group[i] for i in idx]
        branches = backend.select(branches, idx)
    pool = done or [c for c in branches.rows]  # nothing finished (budget/steps): judge the partial ones
    return _final(name, pool, select, budget, failures, steps=steps, completed=len(done))


def run_beam(prompt, backend, verifier, budget, *, n=8, width=4, seed=0, max_steps=16, select=Selection.BEST,
             answer_fn=None, **knobs):
    return _tree("beam_search", prompt, backend, verifier, budget, n=n, width=width, groups=1, seed=seed,
                 max_steps=max_steps, select=select, answer_fn=answer_fn, knobs=knobs)


def run_dvts(prompt, backend, verifier, budget, *, n=8, width=2, seed=0, max_steps=16, select=Selection.WEIGHTED,
             answer_fn=None, **knobs):
    """Diverse verifier tree search: n/width independent subtrees, each keeping its single best beam."""
    return _tree("dvts", prompt, backend, verifier, budget, n=n, width=width, groups=max(1, n // width), seed=seed,
                 max_steps=max_steps, select=select, answer_fn=answer_fn, knobs=knobs)


# -- particle filtering -------------------------------------------------------------------------------------
def resample(weights, rng: np.random.Generator, method: Resampling | str = Resampling.SYSTEMATIC) -> list[int]:
    """Indices drawn in proportion to ``weights`` (systematic: one uniform offset, low variance)."""
    w = np.asarray(weights, dtype=float)
    w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    n = len(w)
    if w.sum() <= 0:
        w = np.ones(n)
    p = w / w.sum()
    if Resampling.parse(method) is Resampling.MULTINOMIAL:
        return sorted(rng.choice(n, size=n, p=p).tolist())
    positions = (rng.random() + np.arange(n)) / n
    return np.minimum(np.searchsorted(np.cumsum(p), positions), n - 1).tolist()


def filter_particles(prompt, backend, verifier, budget, *, n, seed, max_steps, resampling, weight_temperature,
                     answer_fn, reweight=None, **knobs):
    """The particle-filtering loop shared by ``particle_filter`` and ``entropic_pf``: extend every particle one
    step, weight it by the verifier's score of its partial solution (``score ** (1 / weight_temperature)``; the
    ``temperature`` knob stays the sampling temperature), let
    ``reweight(weights, branches, failures)`` adjust the weights, resample. Returns (branches, failures, steps,
    resamples)."""
    check_positive("n", n, getattr(backend, "max_n", None))
    if not weight_temperature > 0:
        raise SteerscaleError(f"particle-filter weight_temperature must be > 0, got {weight_temperature}")
    params = sampling_params(**knobs)
    verifier = _scorer(verifier)
    rng = np.random.default_rng(seed)
    branches = backend.start(prompt, n, budget, seed=seed)
    failures, steps, resamples = [], 0, 0
    while not branches.all_finished and steps < max_steps and not budget.exhausted:
        backend.extend(branches, params, budget)
        steps += 1
        annotate(branches.rows, answer_fn)
        failures += score(verifier, prompt, branches.rows, budget, partial=True)
        if branches.all_finished:
            break
        w = [0.0 if c.failed or c.score is None else max(c.score, 1e-12) ** (1.0 / weight_temperature)
             for c in branches.rows]
        if reweight is not None:
            w = reweight(w, branches, failures)
        idx = resample(w, rng, resampling)
        branches = backend.select(branches, idx)
        resamples += 1
    return branches, failures, steps, resamples


def run_particle_filter(prompt, backend, verifier, budget, *, n=8, seed=0, max_steps=16, resampling=Resampling.SYSTEMATIC,
                        weight_temperature=1.0, select=Selection.WEIGHTED, answer_fn=None, **knobs):
    """Particle filtering (Puri et al., 2025): extend every particle one step, weight it by the (process)
    verifier's score of its partial solution, resample. Finished particles stay in the pool with their weight."""
    check_select(select)
    branches, failures, steps, resamples = filter_particles(
        prompt, backend, verifier, budget, n=n, seed=seed, max_steps=max_steps, resampling=resampling,
        weight_temperature=weight_temperature, answer_fn=answer_fn, **knobs)
    return _final("particle_filter", branches.rows, select, budget, failures, steps=steps, resamples=resamples)


# -- A*-decoding ----------------------------------------------------------------------------------------------
def run_astar(prompt, backend, verifier, budget, *, n=4, expand=2, seed=0, max_expansions=32, h_weight=0.5,
              solutions=1, select=Selection.BEST, answer_fn=None, **knobs):
    """A*-decoding: a priority queue of partial solutions ordered by f = g + h, g = -log(verifier score of the
    partial solution) and h = h_weight * (-mean token log-prob). Each round pops the ``expand`` cheapest
    unfinished nodes, forks each into ``n`` children that grow one step, and pushes them back. The search stops
    when ``solutions`` finished nodes have been popped (the cheapest-first goal test of A*)."""
    check_positive("n", n, getattr(backend, "max_n", None))
    check_positive("expand", expand)
    check_select(select)
    params = sampling_params(**knobs)
    verifier = _scorer(verifier)
    tick = itertools.count()
    root = backend.start(prompt, 1, budget, seed=seed)
    heap = [(0.0, next(tick), root)]
    goals, failures, expansions, seen = [], [], 0, []

    def cost(c):
        s = 0.0 if c.failed or c.score is None else c.score
        return -math.log(max(s, 1e-9)) + h_weight * (-c.mean_logprob if c.logprobs else 0.0)

    while heap and len(goals) < solutions and expansions < max_expansions and not budget.exhausted:
        popped = []
        while heap and len(popped) < expand:
            f, _, node = heapq.heappop(heap)
            if node.rows[0].finished:
                goals.append(node.rows[0])
                if len(goals) >= solutions:
                    break
                continue
            popped.append(node)
        if not popped or len(goals) >= solutions:
            break
        batch = backend.merge(popped)
        children = backend.select(batch, [i for i in range(len(popped)) for _ in range(n)])
        backend.extend(children, params, budget)
        expansions += 1
        annotate(children.rows, answer_fn)
        failures += score(verifier, prompt, children.rows, budget, partial=True)
        for i, c in enumerate(children.rows):
            seen.append(c)
            heapq.heappush(heap, (cost(c), next(tick), backend.select(children, [i])))
    if not goals:  # budget or expansion cap: fall back to the best finished, else best partial node seen
        finished = [c for c in seen if c.finished]
        goals = finished or seen or list(root.rows)
        goals = sorted(goals, key=cost)[: max(1, solutions)]
    return _final("astar", goals, select, budget, failures, expansions=expansions, nodes=len(seen))
