"""A behaviour handbook (metacognitive reuse): reusable reasoning behaviours written by the model from its own solved
traces, stored as JSON, retrieved for a new problem by embedding similarity and put in the prompt.

* ``build_handbook(problems, backend, budget)``: the model solves each problem (greedy); for each one it solved
  (the problem's own checker says so), it is asked to name one reusable behaviour the solution used, as
  ``name: one-line instruction``. Parsed entries are kept (one per name), each with the embedding of the question it
  came from (``backend.embed``: the model's own mean-pooled hidden states).
* ``Handbook.retrieve(question, backend, budget, k)``: the ``k`` behaviours whose source questions are closest to
  ``question`` (cosine similarity of the same embeddings; the question's embedding is charged to the budget as
  verifier work).
* The ``handbook`` prompt stage (``{"type": "handbook", "path": "handbook.json", "k": 2}``) puts the retrieved
  behaviours before the question. The file is read and checked when the program is loaded.

The file is JSON: ``{"model": ..., "dim": D, "behaviours": [{"name", "instruction", "source", "vector"}]}``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

from ...errors import SteerscaleError
from ..backend import Backend, SamplingParams
from ..budget import Budget
from .stages import Context, Stage, _register

EXTRACT_TEMPLATE = ("Name the reusable reasoning habit a solution used, as one line: habit_name: instruction.\n\n"
                    "Problem: Tom has 3 boxes of 4 pens. How many pens?\nSolution: 3 x 4 = 12 pens.\n"
                    "Habit: multiply_groups: when there are equal groups, multiply the group size by the count.\n\n"
                    "Problem: {question}\nSolution: {solution}\nHabit:")
HANDBOOK_HEADER = "Behaviours that may help with this problem:"
_LINE = re.compile(r"^\s*[-*]?\s*([A-Za-z][A-Za-z0-9_ ]{1,40}?)\s*:\s*(\S.{5,200}?)\s*$")


@dataclass
class Behaviour:
    name: str
    instruction: str
    source: str = ""  # the question it was learned from
    vector: list[float] = field(default_factory=list)


def parse_behaviour(text: str) -> tuple[str, str] | None:
    """``(name, instruction)`` from the first line of the form ``name: instruction``, or None."""
    for line in text.strip().splitlines():
        m = _LINE.match(line)
        if m:
            name = re.sub(r"\s+", "_", m.group(1).strip().lower())
            return name, m.group(2).strip()
    return None


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else -1.0


@dataclass
class Handbook:
    behaviours: list[Behaviour]
    model: str = ""
    dim: int = 0

    def save(self, path) -> None:
        Path(path).write_text(json.dumps({"model": self.model, "dim": self.dim,
                                          "behaviours": [asdict(b) for b in self.behaviours]}, indent=1) + "\n",
                              encoding="utf-8")

    @classmethod
    def load(cls, path) -> "Handbook":
        p = Path(path).expanduser()
        if not p.is_file():
            raise SteerscaleError(f"handbook file {str(p)!r} does not exist",
                                  "build one with steerscale.scale.programs.memory.build_handbook")
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
            items = obj["behaviours"]
            behaviours = [Behaviour(str(b["name"]), str(b["instruction"]), str(b.get("source", "")),
                                    [float(x) for x in b.get("vector", [])]) for b in items]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise SteerscaleError(f"handbook file {str(p)!r} is malformed ({type(exc).__name__}: {exc})",
                                  "it is JSON: {\"behaviours\": [{\"name\", \"instruction\", \"source\", "
                                  "\"vector\"}]}") from None
        dim = int(obj.get("dim", 0) or 0)
        if any(b.vector and len(b.vector) != dim for b in behaviours):
            raise SteerscaleError(f"handbook file {str(p)!r}: a vector's length differs from dim={dim}")
        return cls(behaviours, str(obj.get("model", "")), dim)

    def retrieve(self, question: str, backend: Backend, budget: Budget, k: int = 2) -> list[Behaviour]:
        """The ``k`` behaviours learned from the questions most similar to ``question`` (all of them, in order, when
        the handbook has no vectors)."""
        if not self.behaviours:
            return []
        if not self.dim:
            return self.behaviours[:k]
        vec = backend.embed([question], budget)[0].tolist()
        if any(math.isnan(x) for x in vec):  # the budget could not pay for the embedding
            return []
        if len(vec) != self.dim:
            raise SteerscaleError(f"the handbook's vectors have {self.dim} dimensions, this model's {len(vec)}",
                                  "build the handbook with the model that uses it")
        ranked = sorted(self.behaviours, key=lambda b: _cosine(vec, b.vector), reverse=True)
        return ranked[:k]


def build_handbook(problems, backend: Backend, budget: Budget | None = None, *, max_tokens: int = 128,
                   model: str = "", progress=None) -> Handbook:
    """A handbook from the problems the model solves (``problems``: ``search.Problem``, whose ``check`` says whether
    a text is right). Everything is charged to ``budget``."""
    budget = budget if budget is not None else Budget()
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0, step=None)
    short = SamplingParams(max_tokens=48, temperature=0.0, step=None)
    found: dict[str, Behaviour] = {}
    for p in problems:
        if budget.exhausted:
            break
        out = backend.sample(p.prompt, 1, greedy, budget)
        if out and p.check(out[0].text):
            reply = backend.sample(EXTRACT_TEMPLATE.format(question=p.prompt, solution=out[0].text.strip()), 1, short,
                                   budget)
            parsed = parse_behaviour(reply[0].text) if reply else None
            if parsed and parsed[0] not in found:
                found[parsed[0]] = Behaviour(parsed[0], parsed[1], p.prompt)
        if progress is not None:
            progress.update(1)
    behaviours = list(found.values())
    dim = 0
    if behaviours:
        vectors = backend.embed([b.source for b in behaviours], budget)
        dim = int(vectors.shape[-1])
        for b, v in zip(behaviours, vectors.tolist()):
            b.vector = v
        behaviours = [b for b in behaviours if not any(math.isnan(x) for x in b.vector)]
    return Handbook(behaviours, model, dim)


@_register
@dataclass
class HandbookStage(Stage):
    """Put the k behaviours of a handbook learned from the most similar questions before the prompt."""

    type: ClassVar[str] = "handbook"
    kind: ClassVar[str] = "prompt"
    path: str = ""
    k: int = 2
    BOUNDS: ClassVar[dict] = {"k": (1, 16)}

    def check(self) -> None:
        if not self.path:
            raise SteerscaleError("a handbook stage needs a \"path\" to a handbook JSON file")
        self.handbook = Handbook.load(self.path)  # read and checked at load, before any model work

    def run(self, ctx: Context, cands):
        chosen = self.handbook.retrieve(ctx.question, ctx.backend, ctx.budget, self.k)
        if chosen:
            lines = "\n".join(f"- {b.name}: {b.instruction}" for b in chosen)
            ctx.prompt = f"{HANDBOOK_HEADER}\n{lines}\n\n{ctx.prompt}"
        return cands
