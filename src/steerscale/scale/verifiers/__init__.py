"""Verifiers and scorers: a registry of ``Verifier`` objects that score candidates in ``[0, 1]``.

``get_verifier(name, reference=..., backend=..., **options)``; ``VERIFIERS`` lists the names. Programmatic
checkers (``exact``, ``numeric``, ``math``, ``mc``) need the reference answer and are outcome verifiers;
``arith_prm`` checks every ``a op b = c`` in each step (a process reward, no reference needed);
``self_eval`` (the model's P(Yes)), ``judge`` (LLM-as-judge, several samples averaged) and ``logprob``
(the generator's own confidence) need no reference either.

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
from .base import Verifier
from .model_based import LLMJudge, LogprobConfidence, SelfEval
from .programmatic import ArithmeticPRM, ExactMatch, MathEquivalence, MultipleChoice, NumericMatch

VERIFIERS: dict[str, type[Verifier]] = {
    cls.name: cls for cls in (ExactMatch, NumericMatch, MathEquivalence, MultipleChoice, ArithmeticPRM, SelfEval,
                              LLMJudge, LogprobConfidence)
}


def get_verifier(name: str | Verifier | None, **options) -> Verifier | None:
    """A verifier by registry name (``None`` stays ``None``; a ``Verifier`` instance is returned as is)."""
    if name is None or isinstance(name, Verifier):
        return name
    if name not in VERIFIERS:
        raise SteerscaleError(f"unknown verifier {name!r}", f"choose one of: {', '.join(VERIFIERS)}")
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


__all__ = ["VERIFIERS", "Verifier", "get_verifier", "score_candidates", "ArithmeticPRM", "ExactMatch", "LLMJudge",
           "LogprobConfidence", "MathEquivalence", "MultipleChoice", "NumericMatch", "SelfEval"]
