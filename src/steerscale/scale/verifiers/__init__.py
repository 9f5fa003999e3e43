"""Verifiers and scorers: a registry of ``Verifier`` objects that score candidates in ``[0, 1]``.

``get_verifier(name, reference=..., backend=..., **options)``; ``VERIFIERS`` lists the names. Programmatic
checkers (``exact``, ``numeric``, ``math``, ``mc``) need the reference answer and are outcome verifiers;
``arith_prm`` checks every ``a op b = c`` in each step (a process reward, no reference needed);
``self_eval`` (the model's P(Yes)), ``judge`` (LLM-as-judge, several samples averaged), ``pairwise`` (the judge
picks the better of two answers, both orders; round-robin win rates), ``logprob`` (the generator's own
confidence) and the answer-feature scorers ``length``, ``hedging`` and ``features`` need no reference either;
``gym`` scores with reasoning-gym's own checker (the reference is the generated entry); ``diverse`` wraps another
verifier and adds a representation-diversity bonus (``backend.embed``). ``genjudge`` (principles, critique,
score; voted; meta-filtered by a hidden-state probe) and ``pairwise_consistent`` (swapped-order consistency) are the
generative judges (``verifiers/judges.py``); ``fsf`` ranks by the failed-step fraction of the chain of thought
(``verifiers/trace_quality.py``).

The registry (``VERIFIERS``, a ``steerscale.registry.Registry`` of classes by ``.name``) and ``get_verifier`` live
in ``verifiers/registry.py``; this module fills it. ``get_verifier`` passes ``reference`` and ``backend`` to the verifiers that take them (and drops them for the
others); any other option must be one the verifier accepts, or it is a ``SteerscaleError``.

``score_candidates`` is how strategies call a verifier: a verifier that raises or returns NaN/inf on one
candidate marks that candidate ``failed`` (score None, never chosen over a scored one), and the search goes on;
the failures are returned so the ``Result`` can report them.
"""

from __future__ import annotations

import math
from typing import Sequence

from ...errors import SteerscaleError
from ..backend import Candidate
from ..budget import Budget
from .base import Verifier, parse_options, parse_value
from .registry import CONTEXT_OPTIONS, VERIFIERS, check_options, get_verifier
from .features import FeatureScore, HedgingScore, LengthScore
from .model_based import DiversityBonus, LLMJudge, LogprobConfidence, PairwiseJudge, SelfEval
from .programmatic import ArithmeticPRM, ExactMatch, GymScore, MathEquivalence, MultipleChoice, NumericMatch
from .judges import ConsistentPairwise, GenerativeJudge
from .trace_quality import FailedStepFraction

for _cls in (ExactMatch, NumericMatch, MathEquivalence, MultipleChoice, ArithmeticPRM, GymScore, SelfEval, LLMJudge,
             PairwiseJudge, LogprobConfidence, LengthScore, HedgingScore, FeatureScore, DiversityBonus,
             GenerativeJudge, ConsistentPairwise, FailedStepFraction):
    VERIFIERS.add(_cls.name, _cls)


def score_candidates(verifier: Verifier | None, question: str, cands: Sequence[Candidate], budget: Budget,
                     partial: bool = False) -> list[str]:
    """Score ``cands`` in place (``score``; ``step_scores`` for process verifiers). Returns failure messages."""
    if verifier is None or not cands:
        return []
    failures = []
    try:
        scores = verifier.score_batch(question, list(cands), budget, partial=partial)
    except SteerscaleError:
        raise
    except Exception as exc:  # a broken batch: fall back to one by one so only the bad candidate fails
        scores = []
        for c in cands:
            try:
                scores.append(verifier.score_batch(question, [c], budget, partial=partial)[0])
            except SteerscaleError:
                raise
            except Exception as one:
                scores.append(one)
        if not any(isinstance(s, float) for s in scores):
            failures.append(f"{verifier.name}: {type(exc).__name__}: {exc}")
    for c, s in zip(cands, scores):
        if isinstance(s, BaseException) or s is None or not isinstance(s, (int, float)) or not math.isfinite(s):
            c.failed, c.score = True, None
            why = f"{type(s).__name__}: {s}" if isinstance(s, BaseException) else f"returned {s!r}"
            failures.append(f"{verifier.name} failed on a candidate ({why}); candidate marked failed")
        else:
            c.score = float(s)
            c.failed = False
    return failures


__all__ = ["CONTEXT_OPTIONS", "VERIFIERS", "Verifier", "check_options", "get_verifier", "parse_options", "parse_value",
           "score_candidates", "ArithmeticPRM", "ConsistentPairwise", "DiversityBonus", "ExactMatch",
           "FailedStepFraction", "FeatureScore", "GenerativeJudge", "GymScore",
           "HedgingScore", "LLMJudge", "LengthScore", "LogprobConfidence", "MathEquivalence", "MultipleChoice",
           "NumericMatch", "PairwiseJudge", "SelfEval"]
