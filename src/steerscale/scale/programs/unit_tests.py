"""Archon's unit-test stages: a generator writes checks a correct answer must pass, an evaluator runs them on every
candidate and ranks or filters by the share passed.

* ``unit_tests`` (works on the question, needs no candidates): the model (the stage's ``model``) writes up to ``n``
  checks, one a line, and/or the config gives fixed ones (``tests``). A line of the form ``assert <expression>`` about
  ``answer`` is an **executable check**; any other line is a **natural-language test** (kept when ``natural``).
* ``run_tests`` (candidates): each executable check runs on each candidate's answer in a restricted evaluator
  (below); each natural-language test is judged by the model (the stage's ``model``): P(Yes) to "does the answer
  pass this test?", one verifier pass per candidate and test. A candidate's score is the share of tests it passed;
  the candidates are sorted by it, and ``top_k`` (0: all) and ``min_pass`` (the best stays if none passes) cut them.

**No model output is executed.** An executable check is parsed with ``ast`` and evaluated by walking a whitelist:
numbers, strings, booleans and the one name ``answer`` (the candidate's answer: a number when it reads as one, text
otherwise); ``+ - * / // % **``, comparisons, ``and``/``or``/``not`` and the calls ``abs``, ``round``, ``min``,
``max``, ``int``, ``float``, ``len``, ``str``. Anything else -- attributes, subscripts, other names or calls,
lambdas, comprehensions -- is refused when the check is read; sizes are bounded (an exponent above 64, a number above
1e18 in magnitude, a string repeated or longer than 1000 characters, a check longer than 300 characters or nested
more than 32 deep), so a check cannot run long or grow memory.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...errors import SteerscaleError
from ..backend import Candidate, derive_seed
from .stages import Context, Stage, _register, _shorten, ask, keep_passing, yes_probability

TESTS_TEMPLATE = ("Question: {question}\n\nWrite {n} short checks that a correct final answer to this question must "
                  "pass, one per line. When the answer is a number, write each check as a Python assertion about "
                  "`answer`, e.g. `assert answer > 0` or `assert answer % 2 == 0`. Write only the checks.")
JUDGE_TEST_TEMPLATE = ("Question: {question}\n\nProposed answer: {answer}\n\nTest: {test}\n\nDoes the proposed answer "
                       "pass this test? Answer Yes or No.")
MAX_CHARS, MAX_DEPTH, MAX_EXPONENT, MAX_NUMBER, MAX_STRING = 300, 32, 64, 1e18, 1000

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_CALLS = {"abs": abs, "round": round, "min": min, "max": max, "int": int, "float": float, "len": len, "str": str}


class CheckError(SteerscaleError):
    """A check the restricted evaluator refuses (when read) or cannot evaluate (on one answer)."""


@dataclass(frozen=True)
class Check:
    """An executable check: ``assert <expression>`` about ``answer``, read and checked against the whitelist."""

    text: str
    tree: Any = field(compare=False, repr=False)

    @classmethod
    def parse(cls, line: str) -> "Check":
        text = line.strip().strip("`").strip()
        if not text.startswith("assert "):
            raise CheckError(f"not an assertion: {text!r}")
        if len(text) > MAX_CHARS:
            raise CheckError(f"check longer than {MAX_CHARS} characters")
        try:
            body = ast.parse(text, mode="exec").body
        except (SyntaxError, ValueError) as exc:
            raise CheckError(f"check {text!r} does not parse: {exc}") from None
        if len(body) != 1 or not isinstance(body[0], ast.Assert):
            raise CheckError(f"not one assertion: {text!r}")
        tree = body[0].test  # an assertion's message is never evaluated
        expr = ast.unparse(tree)
        _vet(tree, 0)
        return cls(f"assert {expr}", tree)

    def passes(self, answer) -> bool:
        """Whether ``answer`` passes (an error evaluating it, e.g. arithmetic on a text answer, is a failure)."""
        try:
            return bool(_eval(self.tree, answer))
        except (CheckError, ArithmeticError, TypeError, ValueError):
            return False


def _vet(node, depth: int) -> None:
    """Refuse any node outside the whitelist (before anything is evaluated)."""
    if depth > MAX_DEPTH:
        raise CheckError(f"check nested deeper than {MAX_DEPTH}")
    ok = (isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool))
          or isinstance(node, ast.Name) and node.id == "answer"
          or isinstance(node, ast.BinOp) and type(node.op) in _BINARY
          or isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY
          or isinstance(node, ast.BoolOp)
          or isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops)
          or isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS
          and not node.keywords)
    if not ok:
        raise CheckError(f"check uses {ast.dump(node)[:60]!r}, which the restricted evaluator refuses",
                         "checks may use numbers, strings, `answer`, arithmetic, comparisons, and/or/not and "
                         + ", ".join(_CALLS))
    children = node.args if isinstance(node, ast.Call) else list(ast.iter_child_nodes(node))
    for child in children:
        if not isinstance(child, (ast.operator, ast.cmpop, ast.unaryop, ast.boolop, ast.expr_context)):
            _vet(child, depth + 1)


def _bounded(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and (abs(value) > MAX_NUMBER or isinstance(value, float) and math.isnan(value)):
        raise CheckError("a number out of bounds")
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise CheckError("a string out of bounds")
    return value


def _eval(node, answer):
    if isinstance(node, ast.Constant):
        return _bounded(node.value)
    if isinstance(node, ast.Name):
        return answer
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_eval(node.operand, answer))
    if isinstance(node, ast.BoolOp):
        values = (_eval(v, answer) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare):
        left = _eval(node.left, answer)
        for op, right_node in zip(node.ops, node.comparators):
            right = _eval(right_node, answer)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, answer), _eval(node.right, answer)
        if isinstance(left, str) or isinstance(right, str):
            if not isinstance(node.op, ast.Add):  # no repetition, no % formatting
                raise CheckError("only + joins strings")
        if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or abs(left) > MAX_NUMBER):
            raise CheckError("an exponent out of bounds")
        return _bounded(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Call):
        return _bounded(_CALLS[node.func.id](*[_eval(a, answer) for a in node.args]))
    raise CheckError("unreachable: the node was vetted")  # pragma: no cover


_NUMBER = re.compile(r"^[-+]?\$?\s*\d[\d,]*(\.\d+)?$|^[-+]?\.\d+$")


def answer_value(answer: str | None):
    """A candidate's answer as the checks see it: a number when it reads as one (``1,234`` too), else the text."""
    if answer is None:
        return None
    text = str(answer).strip().rstrip(".")
    if _NUMBER.match(text):
        number = float(text.replace(",", "").replace("$", "").replace(" ", ""))
        return int(number) if number.is_integer() and abs(number) < MAX_NUMBER else number
    return text


def read_tests(lines, natural: bool = True) -> tuple[list[Check], list[str]]:
    """Executable checks and natural-language tests from lines (numbering and bullets dropped; an ``assert`` line
    the evaluator refuses is dropped too)."""
    checks, tests = [], []
    for line in lines:
        text = re.sub(r"^\s*(\d+[.)]|[-*])\s*", "", line).strip().strip("`").strip()
        if not text:
            continue
        if text.startswith("assert "):
            try:
                checks.append(Check.parse(text))
            except CheckError:
                pass
        elif natural and len(text) >= 8:
            tests.append(text)
    return checks, tests


@_register
@dataclass
class UnitTestsStage(Stage):
    """Checks a correct answer must pass, written by the model or given (Archon's unit-test generator)."""

    type: ClassVar[str] = "unit_tests"
    kind: ClassVar[str] = "query"
    n: int = 3
    tests: list = field(default_factory=list)
    generate: bool = True
    natural: bool = True
    max_tokens: int = 96
    temperature: float = 0.0
    model: str = ""
    BOUNDS: ClassVar[dict] = {"n": (1, 16), "max_tokens": (1, 1024), "temperature": (0.0, None)}

    def check(self) -> None:
        for t in self.tests:  # a fixed check the evaluator would refuse fails at load
            if t.strip().startswith("assert "):
                Check.parse(t)
        if not self.generate and not self.tests:
            raise SteerscaleError("a unit_tests stage with \"generate\": false needs fixed \"tests\"",
                                  "e.g. \"tests\": [\"assert answer > 0\"]")

    def run(self, ctx: Context, cands: list[Candidate]) -> list[Candidate]:
        lines = list(self.tests)
        if self.generate and not ctx.budget.exhausted:
            out = ask(ctx.backend_for(self.model), TESTS_TEMPLATE.format(question=ctx.question, n=self.n), ctx.budget,
                      max_tokens=self.max_tokens, temperature=self.temperature,
                      seed=derive_seed(ctx.seed, "unit_tests"))
            written = out[0].splitlines() if out else []
            checks, tests = read_tests(written, self.natural)
            lines += [c.text for c in checks] + tests
            lines = list(dict.fromkeys(lines))[: len(self.tests) + self.n]
        checks, tests = read_tests(lines, self.natural)
        ctx.notes["unit_tests"] = [c.text for c in checks] + tests
        ctx.notes["_checks"] = (checks, tests)
        return cands


@_register
@dataclass
class RunTestsStage(Stage):
    """Run the unit tests on every candidate and rank them by the share passed (Archon's unit-test evaluator).

    Checks run in the restricted evaluator, natural-language tests are judged by the model; ``top_k`` (0: all) and
    ``min_pass`` cut the ranked list."""

    type: ClassVar[str] = "run_tests"
    top_k: int = 0
    min_pass: float = 0.0
    max_chars: int = 600
    model: str = ""
    BOUNDS: ClassVar[dict] = {"top_k": (0, None), "min_pass": (0.0, 1.0), "max_chars": (20, None)}

    def run(self, ctx: Context, cands: list[Candidate]) -> list[Candidate]:
        checks, tests = ctx.notes.get("_checks", ([], []))
        if not cands or not (checks or tests):
            return cands
        judged = [[] for _ in cands]
        if tests:
            contexts = [JUDGE_TEST_TEMPLATE.format(question=ctx.question, answer=_shorten(c.text, self.max_chars),
                                                   test=t) for c in cands for t in tests]
            p_yes = yes_probability(ctx.backend_for(self.model), contexts, ctx.budget)
            for j, p in enumerate(p_yes):
                if p == p:  # NaN: the budget could not pay for that judgement, which then does not count
                    judged[j // len(tests)].append(p > 0.5)
        for c, verdicts in zip(cands, judged):
            value = answer_value(c.answer)
            verdicts = [ch.passes(value) for ch in checks] + verdicts
            c.score = sum(verdicts) / len(verdicts) if verdicts else None
            c.meta["tests_passed"] = f"{sum(verdicts)}/{len(verdicts)}"
        ranked = sorted(cands, key=lambda c: -1.0 if c.score is None else c.score, reverse=True)
        ranked = ranked[: self.top_k] if self.top_k else ranked
        return keep_passing(ranked, self.min_pass) if self.min_pass > 0 else ranked


__all__ = ["Check", "CheckError", "RunTestsStage", "UnitTestsStage", "answer_value", "read_tests"]
