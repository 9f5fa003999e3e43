"""Seeded arithmetic problems for scaling experiments.

``gym_problems(n, seed, terms, digits)`` draws them from reasoning-gym's ``basic_arithmetic`` (``+``/``-`` only,
no parentheses), ``make_problems(n, seed, difficulty)`` from a built-in generator (no extra dependency); both
return ``ArithProblem(expression, answer)``; the same arguments always
give the same problems. ``problem.question`` is a one-shot prompt whose worked example writes one
``a op b = c`` per line and ends with ``Answer: N`` (steps are lines, so use ``step="\\n"`` for search).

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

from ..errors import SteerscaleError

EXAMPLES = {
    1: "Question: Calculate 25 + 13.\n25 + 13 = 38\nAnswer: 38",
    2: "Question: Calculate 25 + 13 - 8.\n25 + 13 = 38\n38 - 8 = 30\nAnswer: 30",
}


@dataclass(frozen=True)
class ArithProblem:
    expression: str
    answer: str

    @property
    def n_ops(self) -> int:
        return sum(self.expression.count(op) for op in "+-*")

    @property
    def question(self) -> str:
        example = EXAMPLES[1 if self.n_ops == 1 else 2]
        return f"Example:\n{example}\n\nNow solve this in the same way.\nQuestion: Calculate {self.expression}."


def _expr(rng: random.Random, difficulty: int) -> str:
    if difficulty == 1:
        return f"{rng.randint(10, 99)} + {rng.randint(2, 9)}"
    if difficulty == 2:
        return f"{rng.randint(10, 99)} {rng.choice('+-')} {rng.randint(10, 99)}"
    if difficulty == 3:
        return f"{rng.randint(10, 99)} + {rng.randint(10, 99)} - {rng.randint(10, 99)}"
    return f"{rng.randint(2, 9)} * {rng.randint(11, 19)} + {rng.randint(10, 99)}"


def make_problems(n: int, seed: int = 0, difficulty: int = 1) -> list[ArithProblem]:
    if not isinstance(n, int) or n < 1:
        raise SteerscaleError(f"number of problems must be >= 1, got {n!r}")
    if difficulty not in (1, 2, 3, 4):
        raise SteerscaleError(f"arithmetic difficulty must be 1..4, got {difficulty!r}")
    rng = random.Random(f"arith-{seed}-{difficulty}")
    out = []
    for _ in range(n):
        expr = _expr(rng, difficulty)
        out.append(ArithProblem(expr, str(eval(expr, {"__builtins__": {}}))))  # our own digits-and-operators text
    return out


def gym_problems(n: int, seed: int = 0, terms: int = 2, digits: int = 2) -> list[ArithProblem]:
    """``n`` reasoning-gym ``basic_arithmetic`` problems (``terms`` numbers of 1..``digits`` digits, ``+``/``-``),
    in the same one-shot prompt as ``make_problems``; reasoning-gym's own answer is the reference."""
    if not isinstance(n, int) or n < 1:
        raise SteerscaleError(f"number of problems must be >= 1, got {n!r}")
    try:
        import reasoning_gym
    except ImportError:
        raise SteerscaleError("reasoning-gym is not installed", "pip install 'steerscale[data]'") from None
    ds = reasoning_gym.create_dataset("basic_arithmetic", min_terms=terms, max_terms=terms, min_digits=1,
                                      max_digits=digits, operators=("+", "-"), allow_parentheses=False,
                                      allow_negation=False, size=n, seed=seed)
    return [ArithProblem(e["metadata"]["expression"], str(e["answer"])) for e in ds]
