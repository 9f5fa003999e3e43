"""The ``Verifier`` base class."""

from __future__ import annotations

import inspect
from typing import Sequence

from ..backend import Candidate
from ..budget import Budget


class Verifier:
    """Scores a candidate answer to a question in ``[0, 1]`` (higher is better).

    Subclasses set ``name``, and override ``score`` (one candidate) or ``score_batch`` (several at once, e.g.
    one batched forward pass). ``process=True`` marks verifiers that can score partial solutions step by step
    (``partial=True``); outcome verifiers score a partial solution as if it were complete.
    """

    name: str = "verifier"
    process: bool = False
    needs_reference: bool = False

    def __init__(self, reference: str | None = None):
        self.reference = reference

    @classmethod
    def options(cls) -> set[str]:
        names = set()
        for klass in cls.__mro__:
            if "__init__" in klass.__dict__:
                names |= set(inspect.signature(klass.__init__).parameters) - {"self"}
        return names

    def with_reference(self, reference: str | None) -> "Verifier":
        import copy

        new = copy.copy(self)
        new.reference = reference
        return new

    def score(self, question: str, candidate: Candidate, budget: Budget, partial: bool = False) -> float:
        raise NotImplementedError

    def score_batch(self, question: str, candidates: Sequence[Candidate], budget: Budget,
                    partial: bool = False) -> list[float | BaseException]:
        out: list[float | BaseException] = []
        for c in candidates:
            try:
                out.append(self.score(question, c, budget, partial))
            except Exception as exc:  # reported per candidate by score_candidates
                from ...errors import SteerscaleError

                if isinstance(exc, SteerscaleError):
                    raise
                out.append(exc)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reference={self.reference!r})"
