"""Inference-time scaling: a batched search engine, verifiers, one enforced budget, and the strategies."""

from .backend import Backend, Branches, Candidate, SamplingParams, derive_seed
from .budget import Budget
from .local import LocalBackend
from .spec import StrategySpec, run_strategy
from .strategies import STRATEGIES, Result, get_strategy
from .verifiers import VERIFIERS, Verifier, get_verifier
from . import programs  # noqa: E402,F401  (registers the "program" strategy: composed inference pipelines)
from . import navigator  # noqa: E402,F401  (registers the "navigator" strategy: RL of Thoughts)

__all__ = ["Backend", "Branches", "Budget", "Candidate", "LocalBackend", "Result", "SamplingParams", "STRATEGIES", "StrategySpec",
           "VERIFIERS", "Verifier", "derive_seed", "get_strategy", "get_verifier", "run_strategy"]
