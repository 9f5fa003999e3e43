"""Programmatic checkers: exact, numeric, sympy equivalence, multiple choice, the arithmetic step PRM, and
reasoning-gym's own scorers."""

from __future__ import annotations

import ast
import json
import math
import operator
import re

from ...errors import SteerscaleError
from ...answers import answer_line, extract_answer, normalize
from ...gym import scorer as gym_scorer
from ..backend import Candidate
from .base import Verifier, require_candidates


class _Reference(Verifier):
    needs_reference = True

    def _ref(self) -> str:
        if self.reference is None:
            raise SteerscaleError(f"verifier {self.name!r} needs the reference answer",
                                  "pass reference=... (CLI: --reference), or use a reference-free verifier "
                                  "such as arith_prm, self_eval or logprob")
        return str(self.reference)

    def _answer(self, c: Candidate) -> str | None:
        return c.answer if c.answer is not None else extract_answer(c.text)


class ExactMatch(_Reference):
    """1 when the extracted answer equals the reference after normalisation (case-insensitive)."""

    name = "exact"

    def score(self, question, candidate, budget, partial=False):
        a = self._answer(candidate)
        return float(a is not None and a.lower() == (normalize(self._ref()) or "").lower())


def _to_float(text: str | None) -> float | None:
    if text is None:
        return None
    t = text.strip().replace(",", "").rstrip(".")
    try:
        if "/" in t:
            num, den = t.split("/", 1)
            return float(num) / float(den)
        return float(t.rstrip("%"))
    except (ValueError, ZeroDivisionError):
        return None


class NumericMatch(_Reference):
    """1 when the answer is a number within ``rel_tol``/``abs_tol`` of the reference."""

    name = "numeric"

    def __init__(self, reference=None, rel_tol: float = 1e-6, abs_tol: float = 1e-9):
        super().__init__(reference)
        self.rel_tol, self.abs_tol = float(rel_tol), float(abs_tol)

    def score(self, question, candidate, budget, partial=False):
        ref = _to_float(self._ref())
        if ref is None:
            raise SteerscaleError(f"numeric verifier: reference {self.reference!r} is not a number",
                                  "use the exact or math verifier for non-numeric answers")
        got = _to_float(self._answer(candidate))
        return float(got is not None and math.isclose(got, ref, rel_tol=self.rel_tol, abs_tol=self.abs_tol))


class MathEquivalence(_Reference):
    """1 when sympy finds answer - reference == 0 (falls back to numeric/exact when sympy is missing)."""

    name = "math"

    def score(self, question, candidate, budget, partial=False):
        a, ref = self._answer(candidate), self._ref()
        if a is None:
            return 0.0
        try:
            import sympy
        except ImportError:  # optional dependency
            x, y = _to_float(a), _to_float(ref)
            return float(x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6)) if x is not None else float(a == ref)
        try:
            diff = sympy.simplify(sympy.sympify(a.replace("^", "**")) - sympy.sympify(ref.replace("^", "**")))
            return float(diff == 0)
        except (sympy.SympifyError, TypeError, SyntaxError, ValueError):
            return float(normalize(a) == normalize(ref))


class MultipleChoice(_Reference):
    """1 when the chosen letter (``Answer: B``, ``(B)``, a lone letter) matches the reference letter."""

    name = "mc"

    def score(self, question, candidate, budget, partial=False):
        m = re.findall(r"(?:[Aa]nswer\s*(?:is|:)?\s*\(?|\()([A-Ea-e])\b", candidate.text) or \
            re.findall(r"\b([A-E])\b", candidate.text)
        return float(bool(m) and m[-1].upper() == self._ref().strip().strip("()").upper())


# -- the arithmetic process reward model ----------------------------------------------------------------------
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_NUM = r"-?\d+(?:\.\d+)?"
_EQ = re.compile(r"((?:" + _NUM + r"\s*[-+*/×x]\s*)+" + _NUM + r")\s*=\s*(" + _NUM + r")(?![\d.]*\s*[-+*/×x]\s*\d)")


def _safe_eval(expr: str) -> float:
    node = ast.parse(expr.replace("×", "*").replace("x", "*"), mode="eval").body

    def ev(n):
        if isinstance(n, ast.BinOp) and type(n.op) in _OPS:
            return _OPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return n.value
        raise ValueError(f"not arithmetic: {expr!r}")

    return float(ev(node))


def check_equations(text: str) -> tuple[int, int]:
    """``(correct, total)`` over every ``a op b [op c ...] = d`` written in ``text``."""
    correct = total = 0
    for lhs, rhs in _EQ.findall(text.replace(",", "")):
        try:
            value = _safe_eval(lhs)
        except (ValueError, SyntaxError, ZeroDivisionError):
            continue
        total += 1
        correct += math.isclose(value, float(rhs), rel_tol=1e-9, abs_tol=1e-9)
    return correct, total


class ArithmeticPRM(Verifier):
    """Process reward for arithmetic: each step scores 1 when every ``a op b = c`` in it is right, ``wrong``
    when any is wrong, ``neutral`` when it has none; an ``Answer: X`` step scores 1 only when X is the last
    computed result. A solution's score aggregates its steps (``min``, ``prod``,
    ``last`` or ``mean``). Steps are the candidate's ``steps`` (search strategies) or its lines."""

    name = "arith_prm"
    process = True

    def __init__(self, reference=None, aggregate: str = "min", neutral: float = 0.5, wrong: float = 0.05):
        super().__init__(reference)
        if aggregate not in ("min", "prod", "last", "mean"):
            raise SteerscaleError(f"unknown PRM aggregate {aggregate!r}", "use min, prod, last or mean")
        self.aggregate, self.neutral, self.wrong = aggregate, float(neutral), float(wrong)

    def step_score(self, step: str, before: str = "") -> float:
        """Score one step; ``before`` is the solution so far (an ``Answer: X`` step must repeat the last result)."""
        correct, total = check_equations(step)
        if total:
            return 1.0 if correct == total else self.wrong
        m = re.search(r"[Aa]nswer\s*(?:is|:)\s*(" + _NUM + ")", step.replace(",", ""))
        results = [rhs for _, rhs in _EQ.findall(before.replace(",", ""))]
        if m and results:
            return 1.0 if math.isclose(float(m.group(1)), float(results[-1])) else self.wrong
        return self.neutral

    def steps_of(self, c: Candidate) -> list[str]:
        # blank steps carry no work: a search step that ends just before a stop string is empty, and scoring it
        # neutral would cap a finished, correct solution at ``neutral`` under ``min``
        steps = [s for s in (c.steps if len(c.steps) > 1 else c.text.split("\n")) if s.strip()]
        return steps or [c.text]

    def score(self, question, candidate, budget, partial=False):
        steps = self.steps_of(candidate)
        scores = [self.step_score(s, "\n".join(steps[:i])) for i, s in enumerate(steps)]
        candidate.step_scores = scores
        if self.aggregate == "min":
            return min(scores)
        if self.aggregate == "prod":
            return math.prod(scores)
        if self.aggregate == "last":
            return scores[-1]
        return sum(scores) / len(scores)


# -- reasoning-gym ----------------------------------------------------------------------------------------------
class GymScore(_Reference):
    """reasoning-gym's own ``score_answer`` for a generated entry (a score in ``[0, 1]``, partial credit where
    the dataset gives it). The answer is what the ``gym:NAME`` tasks of ``steerscale.measure`` send to the same
    scorer: the text after the last ``Answer:`` (else the last non-empty line).

    ``reference`` is the entry dict (``{"question", "answer", "metadata"}`` as the dataset yields it; the dataset
    is ``metadata["source_dataset"]`` unless ``dataset=`` names it), its JSON text (CLI ``--reference``), or a
    ``(dataset, entry)`` pair."""

    name = "gym"

    def __init__(self, reference=None, dataset: str | None = None):
        super().__init__(reference)
        self.dataset = dataset
        if dataset is not None:
            gym_scorer(dataset)  # unknown names fail here, not on the first candidate

    def entry(self) -> tuple[str, dict]:
        """``(dataset name, entry dict)`` from the reference."""
        ref = self.reference
        if ref is None:
            self._ref()  # raises the "needs the reference" error
        if isinstance(ref, str):
            try:
                ref = json.loads(ref)
            except json.JSONDecodeError:
                raise SteerscaleError("gym verifier: the reference is text but not a JSON entry",
                                      "pass the reasoning-gym entry dict, or its JSON "
                                      '(e.g. {"question": ..., "answer": ..., "metadata": {...}})') from None
        name = self.dataset
        if isinstance(ref, (tuple, list)) and len(ref) == 2 and isinstance(ref[0], str):
            name, ref = ref
        if not isinstance(ref, dict):
            raise SteerscaleError(f"gym verifier: reference must be a reasoning-gym entry dict, got "
                                  f"{type(ref).__name__}", "pass the entry (dataset[i]) or (dataset_name, entry)")
        if name is None:
            name = (ref.get("metadata") or {}).get("source_dataset")
        if not name:
            raise SteerscaleError("gym verifier: cannot tell which reasoning-gym dataset the entry is from",
                                  "the entry has no metadata.source_dataset: pass dataset=NAME")
        return name, ref

    def score_batch(self, question, candidates, budget, partial=False):
        return super().score_batch(question, require_candidates(self.name, candidates), budget, partial)

    def score(self, question, candidate, budget, partial=False):
        name, entry = self.entry()
        value = float(gym_scorer(name)(answer_line(candidate.text), entry) or 0.0)
        return min(1.0, max(0.0, value)) if math.isfinite(value) else value
