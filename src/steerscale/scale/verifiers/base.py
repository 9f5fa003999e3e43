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
            if klass is object or "__init__" not in klass.__dict__:
                continue
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    names.add(p.name)
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


# -- option values given as text (CLI ``--verifier-opt KEY=VALUE``, ``weights="length=0.5,hedging=0.5"``) ------
def parse_value(text):
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"``/``"false"`` -> bool, ``"none"`` -> None, else the text itself.
    Non-strings are returned unchanged."""
    if not isinstance(text, str):
        return text
    t = text.strip()
    low = t.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(t)
        except ValueError:
            pass
    return t


def parse_options(spec, what: str = "options") -> dict:
    """A dict, or ``"k=v,k2=v2"`` text (``;`` also separates), as a dict with parsed values."""
    from ...errors import SteerscaleError

    if spec is None or spec == "":
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    if not isinstance(spec, str):
        raise SteerscaleError(f"{what} must be a dict or 'key=value,...' text, got {spec!r}")
    out = {}
    for part in spec.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise SteerscaleError(f"bad {what} item {part!r}", "write key=value, e.g. length=0.5,hedging=0.5")
        out[key.strip()] = parse_value(value)
    return out


def finite(name: str, value, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a finite float in ``[low, high]``, else a ``SteerscaleError`` naming the option."""
    import math

    from ...errors import SteerscaleError

    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SteerscaleError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise SteerscaleError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and v < low) or (high is not None and v > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise SteerscaleError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return v


def require_candidates(name: str, candidates) -> list:
    """``candidates`` as a list; an empty one is a ``SteerscaleError`` (a batch verifier has nothing to score)."""
    from ...errors import SteerscaleError

    cands = list(candidates)
    if not cands:
        raise SteerscaleError(f"verifier {name!r} got no candidates to score", "pass at least one candidate")
    return cands
