"""Seeded arithmetic problems for scaling experiments.

``gym_problems(n, seed, terms, digits)`` draws them from reasoning-gym's ``basic_arithmetic`` (``+``/``-`` only,
no parentheses), ``make_problems(n, seed, difficulty)`` from a built-in generator (no extra dependency); both
return ``ArithProblem(expression, answer)``; the same arguments always
give the same problems. ``problem.question`` is a one-shot prompt whose worked example writes one
``a op b = c`` per line and ends with ``Answer: N`` (steps are lines, so use ``step="\\n"`` for search).

``shots=k`` instead gives every problem a plain-text k-shot prompt (``Question: Calculate ...`` followed by
its worked steps, k times, then the problem's own ``Question:`` line): meant for a raw completion
(``LocalBackend(..., chat=False)``). The examples are problems of the same kind drawn from a separate seed,
none equal to a test problem. SmolLM2-135M-Instruct on 3-term 1-digit ``+``/``-`` sums: greedy 0.20 (seed 1,
20 problems) and 0.14 (seed 0, 36 problems) with 3 shots, written step by step; the one-shot chat prompt solved
none of the first 8 seed-0 problems (greedy wrote ``0 - 4 - 8 = 8`` on one line for the first).

==========  ==============================  =========  SmolLM2-135M-Instruct greedy (16 problems, seed 0)
difficulty  expression                      example
==========  ==============================  =========  ======================================================
1           NN + N                          ``59 + 8``  44%
2           NN +/- NN                       ``52 + 16`` 19%
3           NN + NN - NN                    ``96 + 91 - 80``  6%
4           N * NN + NN                     ``7 * 12 + 30``
==========  ==============================  =========  ======================================================
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ...errors import SteerscaleError

EXAMPLES = {
    1: "Question: Calculate 25 + 13.\n25 + 13 = 38\nAnswer: 38",
    2: "Question: Calculate 25 + 13 - 8.\n25 + 13 = 38\n38 - 8 = 30\nAnswer: 30",
}


@dataclass(frozen=True)
class ArithProblem:
    expression: str
    answer: str
    examples: tuple[str, ...] = ()  # expressions of worked few-shot examples; empty: the one-shot chat prompt

    @property
    def n_ops(self) -> int:
        return sum(self.expression.count(op) for op in "+-*")

    @property
    def question(self) -> str:
        if self.examples:
            shots = "".join(f"Question: Calculate {e}.\n{worked_solution(e)}\n\n" for e in self.examples)
            return f"{shots}Question: Calculate {self.expression}.\n"
        example = EXAMPLES[1 if self.n_ops == 1 else 2]
        return f"Example:\n{example}\n\nNow solve this in the same way.\nQuestion: Calculate {self.expression}."


def worked_solution(expression: str) -> str:
    """``a op b = c`` per line, left to right, then ``Answer: N`` (the generators never put ``*`` after ``+``/``-``,
    so left to right is the right order)."""
    tokens = expression.split()
    value, lines = int(tokens[0]), []
    for op, b in zip(tokens[1::2], tokens[2::2]):
        new = {"+": value + int(b), "-": value - int(b), "*": value * int(b)}[op]
        lines.append(f"{value} {op} {b} = {new}")
        value = new
    return "\n".join(lines + [f"Answer: {value}"])


def _check_counts(n, shots) -> None:
    if not isinstance(n, int) or n < 1:
        raise SteerscaleError(f"number of problems must be >= 1, got {n!r}")
    if not isinstance(shots, int) or shots < 0:
        raise SteerscaleError(f"shots must be an integer >= 0, got {shots!r}")


def _with_shots(problems: list[ArithProblem], examples: list[ArithProblem], shots: int) -> list[ArithProblem]:
    test = {p.expression for p in problems}
    chosen = tuple(e.expression for e in examples if e.expression not in test)[:shots]
    if len(chosen) < shots:
        raise SteerscaleError(f"could not draw {shots} few-shot examples distinct from the test problems",
                              "use fewer shots")
    return [ArithProblem(p.expression, p.answer, chosen) for p in problems]


def _expr(rng: random.Random, difficulty: int) -> str:
    if difficulty == 1:
        return f"{rng.randint(10, 99)} + {rng.randint(2, 9)}"
    if difficulty == 2:
        return f"{rng.randint(10, 99)} {rng.choice('+-')} {rng.randint(10, 99)}"
    if difficulty == 3:
        return f"{rng.randint(10, 99)} + {rng.randint(10, 99)} - {rng.randint(10, 99)}"
    return f"{rng.randint(2, 9)} * {rng.randint(11, 19)} + {rng.randint(10, 99)}"


def make_problems(n: int, seed: int = 0, difficulty: int = 1, shots: int = 0) -> list[ArithProblem]:
    _check_counts(n, shots)
    if difficulty not in (1, 2, 3, 4):
        raise SteerscaleError(f"arithmetic difficulty must be 1..4, got {difficulty!r}")
    rng = random.Random(f"arith-{seed}-{difficulty}")
    out = []
    for _ in range(n):
        expr = _expr(rng, difficulty)
        out.append(ArithProblem(expr, str(eval(expr, {"__builtins__": {}}))))  # our own digits-and-operators text
    if shots:
        return _with_shots(out, make_problems(shots + n, seed + 7919, difficulty), shots)
    return out


def gym_problems(n: int, seed: int = 0, terms: int = 2, digits: int = 2, shots: int = 0) -> list[ArithProblem]:
    """``n`` reasoning-gym ``basic_arithmetic`` problems (``terms`` numbers of 1..``digits`` digits, ``+``/``-``),
    in the same prompts as ``make_problems``; reasoning-gym's own answer is the reference."""
    _check_counts(n, shots)
    try:
        import reasoning_gym
    except ImportError:
        raise SteerscaleError("reasoning-gym is not installed", "pip install 'steerscale[data]'") from None
    ds = reasoning_gym.create_dataset("basic_arithmetic", min_terms=terms, max_terms=terms, min_digits=1,
                                      max_digits=digits, operators=("+", "-"), allow_parentheses=False,
                                      allow_negation=False, size=n, seed=seed)
    problems = [ArithProblem(e["metadata"]["expression"], str(e["answer"])) for e in ds]
    if shots:
        return _with_shots(problems, gym_problems(shots + n, seed + 7919, terms, digits), shots)
    return problems


def three_number_sums(n: int, seed: int = 0, shots: int = 3) -> list:
    """``n`` seeded sums of three one-digit numbers (``a +/- b +/- c``; the answer may be negative), each asked in a
    ``shots``-shot plain-text prompt (``ArithProblem.question``: worked examples with one ``a op b = c`` per line,
    then ``Answer: N``) to be completed without the chat template. The task and prompt of docs/scaling.md's
    three-number run (which draws its problems from reasoning-gym, an optional dependency; these need none; the demo
    uses them); the examples come from
    a random stream of their own and are none of the test problems."""
    def draw(rng: random.Random) -> str:
        a, b, c = (rng.randint(0, 9) for _ in range(3))
        return f"{a} {rng.choice('+-')} {b} {rng.choice('+-')} {c}"

    rng, shot_rng = random.Random(f"demo-sums-{seed}"), random.Random(f"demo-sums-shots-{seed}")
    tests = [draw(rng) for _ in range(n)]
    examples = list(dict.fromkeys(e for e in (draw(shot_rng) for _ in range(200)) if e not in tests))[:shots]
    if len(examples) < shots:
        raise SteerscaleError(f"could not draw {shots} examples distinct from {n} test problems",
                              "ask for fewer problems")
    return [ArithProblem(e, worked_solution(e).rsplit("Answer: ", 1)[1], tuple(examples)) for e in tests]
