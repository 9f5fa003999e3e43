"""Inference-time scaling: a batched search engine, verifiers, one enforced budget, and the strategies."""

from .backend import Backend, Branches, Candidate, SamplingParams, derive_seed
from .budget import Budget
from .local import LocalBackend
from .strategies import STRATEGIES, Result, get_strategy, run_strategy
from .verifiers import VERIFIERS, Verifier, get_verifier

__all__ = ["Backend", "Branches", "Budget", "Candidate", "LocalBackend", "Result", "SamplingParams", "STRATEGIES",
           "VERIFIERS", "Verifier", "derive_seed", "get_strategy", "get_verifier", "run_strategy"]
