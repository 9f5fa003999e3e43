"""Trace-quality features of a chain of thought: steps, abandoned branches, the failed-step fraction.

"What characterizes effective reasoning" (Feng et al., 2025) finds that the share of a chain of thought spent in
branches the model later abandons -- the *failed-step fraction* (FSF) -- predicts a wrong answer better than the
trace's length or its share of review, and that ranking sampled solutions by it (lower first) raises accuracy.

How a trace is read here (markers only; no model):

* **Steps**: the text is cut at line breaks and at sentence ends (``.``, ``!``, ``?`` followed by a space), so
  "x = 5. Wait, that is wrong." is two steps. Empty pieces are dropped.
* **Branches**: a step that *opens* with a backtrack marker ("wait", "alternatively", "let me try again",
  "actually", "on second thought", "that's wrong", "I made a mistake", "let me start over", ...) starts a new
  branch, and every step of the branch it leaves is *abandoned*. The last branch is the one the answer comes
  from and is never abandoned. A marker must open the step (after optional "hmm," / "no,"/ "oh,"): "it is actually
  5" in mid-sentence is no backtrack. A run of marker steps ("Wait, that is wrong." "Let me redo it.") opens one
  branch.
* **Review** steps open with a checking phrase ("let me check", "let's verify", "double-check", "to confirm",
  "checking") -- reviewing without abandoning anything. ``review_ratio`` is their share of the steps.

``trace_features(text)`` returns the numbers; the ``fsf`` verifier scores ``1 - FSF`` (higher is better, like
every verifier; the FSF itself, the review ratio and the step counts go into ``candidate.meta["trace"]``), so it
ranks candidates in ``best_of_n``, weights ``weighted_vote`` and guides every other strategy. It needs no
reference and no model and charges nothing to the budget. A trace with no steps (empty text) has FSF 0.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass

from ...errors import SteerscaleError
from .base import Verifier, require_candidates

BACKTRACK_MARKERS = ("wait", "alternatively", "let me try again", "let's try again", "let me try another",
                     "let's try another", "let me try a different", "let's try a different", "try again",
                     "actually", "on second thought", "let me start over", "let's start over", "let me redo",
                     "let's redo", "let me reconsider", "let's reconsider", "let me rethink", "that's wrong",
                     "that is wrong", "that's not right", "that is not right", "that's incorrect", "that is incorrect",
                     "i made a mistake", "i made an error", "oops", "scratch that", "no wait", "but wait",
                     "hold on", "another approach", "a different approach", "instead")
REVIEW_MARKERS = ("let me check", "let's check", "let me verify", "let's verify", "let me double-check",
                  "let's double-check", "double-check", "double check", "to verify", "to confirm", "let me confirm",
                  "let's confirm", "checking", "check:", "verify:", "verification")
_LEAD = r"^(?:(?:hmm+|no|oh|ok|okay|so|but|and|well)\s*[,.!:]?\s+)*"  # fillers allowed before a marker


@functools.lru_cache(maxsize=64)
def _opener(markers: tuple[str, ...]) -> re.Pattern:
    alts = "|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True))
    return re.compile(_LEAD + r"(?:" + alts + r")(?![\w'])", re.IGNORECASE)


_STEP_SPLIT = re.compile(r"\n+|(?<=[.!?])\s+(?=\S)")


@dataclass(frozen=True)
class TraceFeatures:
    """What ``trace_features`` reads from one chain of thought."""

    n_steps: int
    n_branches: int  # 1 + the number of backtracks
    abandoned_steps: int
    review_steps: int
    n_words: int
    fsf: float  # abandoned_steps / n_steps (0 for an empty trace)
    review_ratio: float  # review_steps / n_steps

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def split_steps(text: str) -> list[str]:
    """The steps of a trace: its lines and sentences, stripped, empty ones dropped."""
    return [s.strip() for s in _STEP_SPLIT.split(text or "") if s and s.strip()]


def segment(steps, backtrack=BACKTRACK_MARKERS) -> list[int]:
    """The branch index of each step: a step that opens with a backtrack marker starts a new branch (step 0 is
    always branch 0, even when it opens with a marker: there is nothing before it to abandon). A run of marker steps
    ("Wait, that is wrong." "Let me redo it.") opens one branch, not one per step."""
    opens = _opener(tuple(backtrack))
    branch, out, after_marker = 0, [], False
    for i, step in enumerate(steps):
        marker = bool(opens.match(step))
        if i and marker and not after_marker:
            branch += 1
        out.append(branch)
        after_marker = marker
    return out


def trace_features(text: str, backtrack=BACKTRACK_MARKERS, review=REVIEW_MARKERS) -> TraceFeatures:
    """Steps, branches, the failed-step fraction and the review ratio of one chain of thought."""
    steps = split_steps(text)
    branches = segment(steps, backtrack)
    last = branches[-1] if branches else 0
    abandoned = sum(1 for b in branches if b != last)
    checks = _opener(tuple(review))
    reviews = sum(1 for s in steps if checks.match(s))
    n = len(steps)
    return TraceFeatures(n_steps=n, n_branches=last + 1 if n else 0, abandoned_steps=abandoned, review_steps=reviews,
                         n_words=len((text or "").split()), fsf=abandoned / n if n else 0.0,
                         review_ratio=reviews / n if n else 0.0)


def _phrases(value, default, what: str) -> tuple[str, ...]:
    if value is None:
        return default
    items = value.split(",") if isinstance(value, str) else list(value)
    items = tuple(p.strip().lower() for p in items if isinstance(p, str) and p.strip())
    if not items:
        raise SteerscaleError(f"fsf {what} is empty", f"give comma-separated phrases, or omit {what} for the default")
    return items


class FailedStepFraction(Verifier):
    """``1 - failed-step fraction`` of the candidate's chain of thought (lower FSF ranks higher); see the module
    docstring. ``markers`` / ``review`` replace the backtrack / review phrase lists (a list or comma-separated
    text). Each scored candidate gets ``meta["trace"]`` (``TraceFeatures.to_dict()``)."""

    name = "fsf"
    process = True  # a partial trace has an FSF too

    def __init__(self, reference=None, markers=None, review=None):
        super().__init__(reference)
        self.markers = _phrases(markers, BACKTRACK_MARKERS, "markers")
        self.review = _phrases(review, REVIEW_MARKERS, "review")

    def score_batch(self, question, candidates, budget, partial=False):
        out = []
        for c in require_candidates(self.name, candidates):
            feats = trace_features(c.text, self.markers, self.review)
            c.meta["trace"] = feats.to_dict()
            out.append(1.0 - feats.fsf)
        return out
