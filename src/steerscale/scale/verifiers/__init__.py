"""Verifiers and scorers: a registry of ``Verifier`` objects that score candidates in ``[0, 1]``.

``get_verifier(name, reference=..., backend=..., **options)``; ``VERIFIERS`` lists the names. Programmatic
checkers (``exact``, ``numeric``, ``math``, ``mc``) need the reference answer and are outcome verifiers;
``arith_prm`` checks every ``a op b = c`` in each step (a process reward, no reference needed);
``self_eval`` (the model's P(Yes)), ``judge`` (LLM-as-judge, several samples averaged), ``pairwise`` (the judge
picks the better of two answers, both orders; round-robin win rates), ``logprob`` (the generator's own
confidence) and the answer-feature scorers ``length``, ``hedging`` and ``features`` need no reference either;
``gym`` scores with reasoning-gym's own checker (the reference is the generated entry); ``diverse`` wraps another
verifier and adds a representation-diversity bonus (``backend.embed``).

``get_verifier`` passes ``reference`` and ``backend`` to the verifiers that take them (and drops them for the
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
from .features import FeatureScore, HedgingScore, LengthScore
from .model_based import DiversityBonus, LLMJudge, LogprobConfidence, PairwiseJudge, SelfEval
from .programmatic import ArithmeticPRM, ExactMatch, GymScore, MathEquivalence, MultipleChoice, NumericMatch

VERIFIERS: dict[str, type[Verifier]] = {
    cls.name: cls for cls in (ExactMatch, NumericMatch, MathEquivalence, MultipleChoice, ArithmeticPRM, GymScore,
                              SelfEval, LLMJudge, PairwiseJudge, LogprobConfidence, LengthScore, HedgingScore,
                              FeatureScore, DiversityBonus)
}
CONTEXT_OPTIONS = ("reference", "backend")  # given to every verifier by callers; dropped where not accepted


def check_options(name: str, options: dict) -> None:
    """Raise ``SteerscaleError`` for an unknown verifier name or an option it does not accept (cheap: call it
    before loading a model)."""
    if name not in VERIFIERS:
        raise SteerscaleError(f"unknown verifier {name!r}", f"choose one of: {', '.join(VERIFIERS)}")
    accepted = VERIFIERS[name].options()
    unknown = sorted(k for k in options if k not in accepted and k not in CONTEXT_OPTIONS)
    if unknown:
        opts = sorted(accepted - set(CONTEXT_OPTIONS))
        raise SteerscaleError(f"verifier {name!r} has no option {', '.join(map(repr, unknown))}",
                              f"its options: {', '.join(opts) or '(none)'}")


def get_verifier(name: str | Verifier | None, **options) -> Verifier | None:
    """A verifier by registry name (``None`` stays ``None``; a ``Verifier`` instance is returned as is)."""
    if name is None or isinstance(name, Verifier):
        return name
    check_options(name, options)
    cls = VERIFIERS[name]
    accepted = cls.options()
    kwargs = {k: v for k, v in options.items() if k in accepted and v is not None}
    return cls(**kwargs)


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


__all__ = ["VERIFIERS", "Verifier", "check_options", "get_verifier", "parse_options", "parse_value",
           "score_candidates", "ArithmeticPRM", "DiversityBonus", "ExactMatch", "FeatureScore", "GymScore",
           "HedgingScore", "LLMJudge", "LengthScore", "LogprobConfidence", "MathEquivalence", "MultipleChoice",
           "NumericMatch", "PairwiseJudge", "SelfEval"]
