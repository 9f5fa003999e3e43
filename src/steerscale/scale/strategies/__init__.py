"""The strategy registry: each entry is ``run(prompt, backend, verifier, budget, **knobs) -> Result``.

Shared knobs: ``seed``, the sampling knobs ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``step`` (step
delimiter for search strategies) and ``max_step_tokens``, and ``answer_fn`` (text -> answer, default
``steerscale.answers.extract_answer``; code, so never a JSON/CLI knob). Each strategy adds its own (``n``, ``width``,
``select``, ...). Strategies stop when the budget is spent and report ``budget.report()`` in the result. Steering
is not a knob: it belongs to the backend (``LocalBackend(steering=..., row_scales=...)``).

Where a strategy request is built and checked: ``steerscale.scale.spec.StrategySpec`` (from JSON, CLI arguments or
Python keywords); the CLI, the server and ``evaluate`` all run strategies through it. ``spec.run_strategy`` is the
same check for a Python caller holding a verifier object and a ``Budget``.
"""

from __future__ import annotations

from typing import Callable

from ...registry import Registry
from . import adaptive, extra, hogwild, search, simple
from .base import Result

STRATEGIES: Registry[Callable] = Registry("strategy")
STRATEGIES.add("greedy", simple.run_greedy, "one greedy sample (temperature 0; sampling knobs other than the "
                                            "length and stops do not apply)")
STRATEGIES.add("best_of_n", simple.run_best_of_n, "n samples, the verifier's best (default verifier: log-prob)")
STRATEGIES.add("majority", simple.run_majority, "self-consistency: n samples, majority vote over their answers",
               aliases=("self_consistency",))
STRATEGIES.add("weighted_vote", simple.run_weighted_vote, "n samples, vote weighted by the verifier's scores")
STRATEGIES.add("adaptive_sc", adaptive.run, "self-consistency that stops sampling once the vote is settled")
STRATEGIES.add("beam_search", search.run_beam, "step-level beam search guided by a (process) verifier")
STRATEGIES.add("dvts", search.run_dvts, "diverse verifier tree search: independent subtrees of beam search")
STRATEGIES.add("particle_filter", search.run_particle_filter, "particle filtering over steps, weighted by the "
                                                              "verifier")
STRATEGIES.add("astar", search.run_astar, "A*-decoding: cheapest-first expansion of partial solutions")
STRATEGIES.add("entropic_pf", extra.run_entropic_pf, "particle filtering with entropic annealing and look-ahead")
STRATEGIES.add("early_pruning", extra.run_early_pruning, "score partial solutions early, finish the best share")
STRATEGIES.add("refine", extra.run_refine, "verifier-guided iterative refinement of the best attempt")
STRATEGIES.add("compute_optimal", extra.run_compute_optimal_one,
               "probe, then spend more samples where the vote is less settled (a batch: run_compute_optimal)")
STRATEGIES.add("hogwild", hogwild.run, "n workers generating at once over one shared KV cache, each seeing the "
                                        "others' tokens (local models only)")
# "program" (an inference program: composed stages) registers itself from scale/programs/entry.py, which builds on
# this registry (a program's generate stages run the strategies above)
# batch-level form: run_compute_optimal(prompts, backend, verifier, budget, total=...) -> list[Result]
run_compute_optimal = extra.run_compute_optimal


def get_strategy(name: str) -> Callable:
    return STRATEGIES[name]


__all__ = ["STRATEGIES", "Result", "get_strategy", "run_compute_optimal"]
