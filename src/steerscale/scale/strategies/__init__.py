"""Strategy registry. Each strategy is ``run(prompt, backend, verifier, budget, **knobs) -> Result``.

Shared knobs: ``n``, ``seed``, ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``step`` (step delimiter for
search strategies), ``answer_fn`` (text -> answer, default ``answers.extract_answer``) and ``steer_scales``
(one steering multiplier per sample: steering-diversified sampling). Strategies stop when the budget is spent
and report ``budget.report()`` in the result.
"""

from __future__ import annotations

from typing import Callable

from ...errors import SteerscaleError
from ..budget import Budget
from . import adaptive, extra, search, simple
from .base import Result

STRATEGIES: dict[str, Callable] = {
    "greedy": simple.run_greedy,
    "best_of_n": simple.run_best_of_n,
    "majority": simple.run_majority,
    "self_consistency": simple.run_majority,
    "weighted_vote": simple.run_weighted_vote,
    "adaptive_sc": adaptive.run,
    "beam_search": search.run_beam,
    "dvts": search.run_dvts,
    "particle_filter": search.run_particle_filter,
    "astar": search.run_astar,
    "entropic_pf": extra.run_entropic_pf,
    "early_pruning": extra.run_early_pruning,
    "refine": extra.run_refine,
}
# batch-level: run_compute_optimal(prompts, backend, verifier, budget, total=...) -> list[Result]
run_compute_optimal = extra.run_compute_optimal


def get_strategy(name: str) -> Callable:
    if name not in STRATEGIES:
        raise SteerscaleError(f"unknown strategy {name!r}", f"choose one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def run_strategy(name: str, prompt: str, backend, verifier=None, budget: Budget | None = None, **knobs) -> Result:
    if not isinstance(prompt, str) or not prompt.strip():
        raise SteerscaleError("empty prompt", "pass a non-empty prompt text")
    budget = budget if budget is not None else Budget()
    return get_strategy(name)(prompt, backend, verifier, budget, **knobs)


__all__ = ["STRATEGIES", "Result", "get_strategy", "run_compute_optimal", "run_strategy"]
