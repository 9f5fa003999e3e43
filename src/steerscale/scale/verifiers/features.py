"""Answer-feature scorers: no model, no reference, just the text of the answer.

* ``length``: prefers shorter answers (``exp(-L / scale)``) or, with ``target``, answers close to a target length
  (``exp(-|L - target| / scale)``); ``L`` is counted in ``words`` (default), ``chars`` or generated ``tokens``.
* ``hedging``: ``(1 - penalty) ** hits`` where ``hits`` counts hedging phrases ("I think", "maybe", "not sure",
  "might be", ...; longest match wins, so "I'm not sure" counts once).
* ``features``: a weighted mean of the two (weights normalised to sum 1), so the score stays in ``[0, 1]``.

They are cheap tie-breakers or priors to combine with a correctness verifier (e.g. inside ``weighted_vote``).
"""

from __future__ import annotations

import math
import re

from ...errors import SteerscaleError
from .base import Verifier, finite, parse_options, require_candidates

UNITS = ("words", "chars", "tokens")

HEDGES = ("i think", "i believe", "i guess", "i suppose", "i assume", "maybe", "perhaps", "possibly", "probably",
          "not sure", "i'm not sure", "i am not sure", "not certain", "unsure", "might be", "may be", "could be",
          "it seems", "seems like", "seems to be", "i'm not certain", "hard to say", "if i recall",
          "most likely", "i'd guess")


class _Feature(Verifier):
    """Scores one candidate at a time from its text; an empty batch is an error."""

    def score_batch(self, question, candidates, budget, partial=False):
        return super().score_batch(question, require_candidates(self.name, candidates), budget, partial)


def _units(text: str, candidate, unit: str) -> int:
    if unit == "chars":
        return len(text.strip())
    if unit == "words":
        return len(text.split())
    if not candidate.n_tokens and text.strip():  # a remote candidate counts its tokens by their log-probs
        raise ValueError("length unit 'tokens' needs generated tokens (this candidate has text only)")
    return candidate.n_tokens


class LengthScore(_Feature):
    """``exp(-L / scale)`` (shorter is better) or, with ``target``, ``exp(-|L - target| / scale)``."""

    name = "length"

    def __init__(self, reference=None, target: float | None = None, scale: float = 64.0, unit: str = "words"):
        super().__init__(reference)
        if unit not in UNITS:
            raise SteerscaleError(f"unknown length unit {unit!r}", f"use one of: {', '.join(UNITS)}")
        self.target = None if target is None else finite("length target", target, 0)
        self.scale = finite("length scale", scale, 1e-9)
        self.unit = unit

    def score(self, question, candidate, budget, partial=False):
        n = _units(candidate.text, candidate, self.unit)
        gap = n if self.target is None else abs(n - self.target)
        return math.exp(-gap / self.scale)


class HedgingScore(_Feature):
    """``(1 - penalty) ** hits``: each hedging phrase ("I think", "maybe", "not sure", "might be", ...) costs
    ``penalty``. ``phrases`` replaces the default list (a list, or comma-separated text)."""

    name = "hedging"

    def __init__(self, reference=None, penalty: float = 0.25, phrases=None):
        super().__init__(reference)
        self.penalty = finite("hedging penalty", penalty, 0.0, 1.0)
        if phrases is None:
            phrases = HEDGES
        elif isinstance(phrases, str):
            phrases = phrases.split(",")
        phrases = sorted({p.strip().lower().replace("\u2019", "'") for p in phrases if p and p.strip()},
                         key=len, reverse=True)
        if not phrases:
            raise SteerscaleError("hedging needs at least one phrase", "omit phrases= for the default list")
        self.phrases = tuple(phrases)
        self._re = re.compile(r"(?<![\w'])(?:" + "|".join(re.escape(p) for p in self.phrases) + r")(?![\w'])")

    def hits(self, text: str) -> int:
        """How many hedging phrases ``text`` contains (case-insensitive, whole words, non-overlapping)."""
        return len(self._re.findall(text.lower().replace("\u2019", "'")))

    def score(self, question, candidate, budget, partial=False):
        return (1.0 - self.penalty) ** self.hits(candidate.text)


class FeatureScore(_Feature):
    """Weighted mean of ``length`` and ``hedging`` (``weights`` dict or ``"length=0.3,hedging=0.7"``); the
    remaining options are passed to the two scorers."""

    name = "features"
    PARTS = {"length": LengthScore, "hedging": HedgingScore}

    def __init__(self, reference=None, weights="length=0.5,hedging=0.5", target: float | None = None,
                 scale: float = 64.0, unit: str = "words", penalty: float = 0.25, phrases=None):
        super().__init__(reference)
        w = parse_options(weights, "features weights")
        unknown = set(w) - set(self.PARTS)
        if unknown:
            raise SteerscaleError(f"unknown feature(s) in weights: {', '.join(sorted(unknown))}",
                                  f"use {', '.join(self.PARTS)}")
        w = {k: finite(f"weight of {k}", v, 0.0) for k, v in w.items()}
        total = sum(w.values())
        if total <= 0:
            raise SteerscaleError("features weights must have a positive sum", "e.g. weights=length=0.5,hedging=0.5")
        self.weights = {k: v / total for k, v in w.items() if v > 0}
        self.parts = {"length": LengthScore(reference, target=target, scale=scale, unit=unit),
                      "hedging": HedgingScore(reference, penalty=penalty, phrases=phrases)}

    def score(self, question, candidate, budget, partial=False):
        return sum(w * self.parts[k].score(question, candidate, budget, partial) for k, w in self.weights.items())
