"""Task and example types shared by every loader.

A ``Task`` is three things: a loader (``load``), a prompt format (``format``) and a scorer (``score``).
Multiple-choice tasks (``kind == "mc"``) expose ``choices`` and a ``gold`` index per example, are scored from
per-choice log-likelihoods by default, and can also be scored generate-then-parse (``format_generate``, the
chosen letter read by ``answers.choice_letter``). Generation tasks (``kind == "gen"``) are scored from the
generated text.

Every task reads the answer it scores with ``read_answer(text, example)`` (a reader from ``steerscale.answers``);
evaluation gives that same reader to a scaling strategy as its ``answer_fn``, so the strategy's vote and the
task's score never read two different answers from one text.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from ...answers import LETTERS, choice_letter, extract_answer
from ...errors import SteerscaleError


@dataclass
class Example:
    """One evaluation item. ``labels`` marks every true choice (TruthfulQA MC2 has several)."""

    id: str
    question: str
    choices: list[str] | None = None
    gold: int | None = None
    labels: list[int] | None = None
    answer: str | None = None
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, {}, [])}


def subset(examples: Sequence[Example], limit: int | None, seed: int | None, name: str) -> list[Example]:
    """``limit`` examples drawn without replacement by ``seed`` (None: the first ``limit``), in source order.

    Keeping source order makes a ``--limit 50`` run a reproducible slice that later, larger runs can extend.
    """
    examples = list(examples)
    if limit is None:
        return examples
    if not isinstance(limit, int) or limit < 1:
        raise SteerscaleError(f"limit must be a positive integer, got {limit!r}", "pass --limit N with N >= 1")
    if limit > len(examples):
        raise SteerscaleError(f"limit {limit} is larger than task {name!r}, which has {len(examples)} examples",
                              f"use --limit {len(examples)} or leave --limit out for the full set")
    if seed is None:
        return examples[:limit]
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


class Task:
    """Base class. Subclasses implement ``_load_all`` and ``metrics``; ``primary`` names the score metric."""

    name: str = "task"
    kind: str = "gen"  # "mc" or "gen"
    primary: str = "acc"
    description: str = ""
    #: scoring is a pure function of the model's (greedy / log-likelihood) output: extra seeds add nothing
    deterministic: bool = True

    def _load_all(self, seed: int) -> list[Example]:
        raise NotImplementedError

    def load(self, limit: int | None = None, seed: int | None = 0) -> list[Example]:
        """Examples of the task, subsampled to ``limit`` (seeded); raises for a limit larger than the set."""
        return subset(self._load_all(seed if seed is not None else 0), limit, seed, self.name)

    def format(self, example: Example) -> str:
        """The user-turn text; the chat template is applied later by the scorer/generator."""
        return example.question

    def metrics(self, example: Example, output: Any) -> dict[str, float]:
        raise NotImplementedError

    def read_answer(self, text: str, example: Example | None = None) -> str | None:
        """The answer this task scores in a generated ``text`` (normalised so that equal answers compare equal)."""
        return extract_answer(text)

    def score(self, example: Example, output: Any) -> float:
        return float(self.metrics(example, output)[self.primary])

    def config(self) -> dict:
        """What identifies this task in a run hash."""
        return {"name": self.name, "kind": self.kind}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# --------------------------------------------------------------------------------------------------------------
# multiple choice
# --------------------------------------------------------------------------------------------------------------
def softmax(values: Sequence[float]) -> list[float]:
    m = max(values)
    e = [math.exp(v - m) for v in values]
    s = sum(e)
    return [x / s for x in e]


class MCTask(Task):
    """Multiple choice. ``output`` is a dict from ``measure.mc.score_choices`` (log-likelihood mode) or
    ``{"text": reply}`` (generate-then-parse mode)."""

    kind = "mc"
    primary = "acc"

    def format_generate(self, example: Example) -> str:
        lines = [example.question.strip(), ""]
        lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(example.choices)]
        lines += ["", "Answer with the letter of the correct option only."]
        return "\n".join(lines)

    def read_answer(self, text: str, example: Example | None = None) -> str | None:
        """The chosen option's letter (``choice_letter``); needs the example for its number of choices."""
        if example is None or not example.choices:
            raise SteerscaleError("a multiple-choice answer is read against its example's choices",
                                  "call read_answer(text, example)")
        pick = choice_letter(text, len(example.choices))
        return None if pick is None else LETTERS[pick]

    def metrics(self, example: Example, output: dict) -> dict[str, float]:
        n = len(example.choices)
        if "text" in output and "logprobs" not in output:
            pick = choice_letter(output["text"], n)
            return {"acc": float(pick == example.gold), "parsed": float(pick is not None)}
        lp, mean = output["logprobs"], output["mean_logprobs"]
        if len(lp) != n:
            raise SteerscaleError(f"{len(lp)} scores for {n} choices of example {example.id}")
        per_char = [v / max(1, len(c)) for v, c in zip(lp, example.choices)]
        argmax = lambda xs: max(range(len(xs)), key=xs.__getitem__)
        out = {"acc": float(argmax(lp) == example.gold), "acc_norm": float(argmax(mean) == example.gold),
               "acc_per_char": float(argmax(per_char) == example.gold)}
        if example.labels is not None:
            probs = softmax(lp)
            out["mc2"] = sum(p for p, y in zip(probs, example.labels) if y)
        return out


# --------------------------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------------------------
class GenTask(Task):
    """Free generation scored by a function ``(example, text) -> dict of metrics``."""

    kind = "gen"
    primary = "acc"
    max_new_tokens: int = 256
    instruction: str = ""

    def format(self, example: Example) -> str:
        return example.question.strip() + (("\n\n" + self.instruction) if self.instruction else "")

    def metrics(self, example: Example, output: Any) -> dict[str, float]:
        text = output["text"] if isinstance(output, dict) else output
        return self.check(example, text)

    def check(self, example: Example, text: str) -> dict[str, float]:
        raise NotImplementedError


class FunctionTask(GenTask):
    """A generation task built from a loader, an answer reader (``text -> answer``, from ``steerscale.answers``) and
    a checker ``(example, answer) -> metrics`` of what the reader returned (used by the package-data loaders)."""

    def __init__(self, name: str, loader: Callable[[int], list[Example]],
                 checker: Callable[[Example, str | None], dict], instruction: str = "", max_new_tokens: int = 256,
                 description: str = "", reader: Callable[[str], str | None] = extract_answer):
        self.name, self._loader, self._checker, self._reader = name, loader, checker, reader
        self.instruction, self.max_new_tokens, self.description = instruction, max_new_tokens, description

    def _load_all(self, seed: int) -> list[Example]:
        return self._loader(seed)

    def read_answer(self, text: str, example: Example | None = None) -> str | None:
        return self._reader(text)

    def check(self, example: Example, text: str) -> dict[str, float]:
        return self._checker(example, self._reader(text))


def require_fields(row: dict, fields: Sequence[str], where: str) -> None:
    """Raise a SteerscaleError naming every missing field of one data row."""
    if not isinstance(row, dict):
        raise SteerscaleError(f"{where}: expected a JSON object, got {type(row).__name__}",
                              "each line must be one JSON object")
    missing = [f for f in fields if f not in row or row[f] in (None, "")]
    if missing:
        raise SteerscaleError(f"{where}: missing field(s) {', '.join(map(repr, missing))}; present: "
                              f"{', '.join(map(repr, row)) or 'none'}",
                              f"every row needs {', '.join(map(repr, fields))}")
