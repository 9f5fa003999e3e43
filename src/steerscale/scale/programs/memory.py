"""Memory and selection as reusable parts: a behaviour handbook and a prompt router.

A behaviour handbook (metacognitive reuse): reusable reasoning behaviours written by the model from its own solved
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

A prompt router (dynamic prompt selection): ``build_router(problems, backend, prompts)`` runs greedy under each
prompt of a pool (``"none"`` or a ``prompt`` preset) on development problems and stores, per question, which worked
and its embedding; ``Router.choose`` picks, for a new question, the prompt that worked most often on its ``k``
nearest development questions (ties: the best prompt over the whole split). The ``route`` prompt stage
(``{"type": "route", "path": "router.json", "k": 5}``) prepends it. A k-nearest-neighbour vote on the model's own
hidden states: light, and nothing to fit.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

from ...errors import SteerscaleError
from ..backend import Backend
from ..budget import Budget
from .stages import PROMPT_PRESETS, Context, Stage, _register, ask, place_text

EXTRACT_TEMPLATE = ("Name the reusable reasoning habit a solution used, as one line: habit_name: instruction.\n\n"
                    "Problem: Tom has 3 boxes of 4 pens. How many pens?\nSolution: 3 x 4 = 12 pens.\n"
                    "Habit: multiply_groups: when there are equal groups, multiply the group size by the count.\n\n"
                    "Problem: {question}\nSolution: {solution}\nHabit:")
HANDBOOK_HEADER = "Behaviours that may help with this problem:"
HANDBOOK_FORMAT = "it is JSON: {\"behaviours\": [{\"name\", \"instruction\", \"source\", \"vector\"}]}"
ROUTER_FORMAT = "it is JSON: {\"prompts\": [...], \"examples\": [{\"question\", \"vector\", \"correct\"}]}"
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


def embed_question(question: str, backend: Backend, budget: Budget, dim: int, what: str) -> list[float] | None:
    """The question's embedding (charged to ``budget``), or None when the budget cannot pay for it."""
    vec = backend.embed([question], budget)[0].tolist()
    if any(math.isnan(x) for x in vec):
        return None
    if len(vec) != dim:
        raise SteerscaleError(f"the {what}'s vectors have {dim} dimensions, this model's {len(vec)}",
                              f"build the {what} with the model that uses it")
    return vec


def nearest(vec: Sequence[float], items: Sequence, k: int) -> list:
    """The ``k`` items (each with a ``vector``) closest to ``vec`` by cosine similarity, closest first."""
    return sorted(items, key=lambda item: _cosine(vec, item.vector), reverse=True)[:k]


def _embed_all(items, texts: list[str], backend: Backend, budget: Budget) -> tuple[list, int]:
    """``items`` with their ``vector`` set from ``texts`` (those the budget could not embed dropped), and the width."""
    if not items:
        return [], 0
    vectors = backend.embed(texts, budget)
    for item, v in zip(items, vectors.tolist()):
        item.vector = v
    return [i for i in items if not any(math.isnan(x) for x in i.vector)], int(vectors.shape[-1])


def _read_json(path, what: str, example: str):
    p = Path(path).expanduser()
    if not p.is_file():
        raise SteerscaleError(f"{what} file {str(p)!r} does not exist", f"build one with steerscale program {what}")
    try:
        return p, json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SteerscaleError(f"{what} file {str(p)!r} is malformed (JSONDecodeError: {exc})", example) from None


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
        p, obj = _read_json(path, "handbook", HANDBOOK_FORMAT)
        try:
            items = obj["behaviours"]
            behaviours = [Behaviour(str(b["name"]), str(b["instruction"]), str(b.get("source", "")),
                                    [float(x) for x in b.get("vector", [])]) for b in items]
        except (KeyError, TypeError, ValueError) as exc:
            raise SteerscaleError(f"handbook file {str(p)!r} is malformed ({type(exc).__name__}: {exc})",
                                  HANDBOOK_FORMAT) from None
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
        vec = embed_question(question, backend, budget, self.dim, "handbook")
        return nearest(vec, self.behaviours, k) if vec is not None else []


def learn_from_solved(problems, backend: Backend, budget: Budget, template: str, parse, *, max_tokens: int = 128,
                      reply_tokens: int = 48, progress=None) -> list[tuple[str, tuple]]:
    """``(question, parsed)`` for each problem the model solves (greedy; the problem's ``check`` says so) and then
    describes: ``template`` (with ``{question}`` and ``{solution}``) asks for the lesson, ``parse`` reads the reply
    (None: nothing usable). Everything is charged to ``budget``."""
    found = []
    for p in problems:
        if budget.exhausted:
            break
        out = ask(backend, p.prompt, budget, max_tokens=max_tokens)
        if out and p.check(out[0]):
            reply = ask(backend, template.format(question=p.prompt, solution=out[0]), budget, max_tokens=reply_tokens)
            parsed = parse(reply[0]) if reply else None
            if parsed:
                found.append((p.prompt, parsed))
        if progress is not None:
            progress.update(1)
    return found


def build_handbook(problems, backend: Backend, budget: Budget | None = None, *, max_tokens: int = 128,
                   model: str = "", progress=None) -> Handbook:
    """A handbook from the problems the model solves (``problems``: ``search.Problem``, whose ``check`` says whether
    a text is right). Everything is charged to ``budget``."""
    budget = budget if budget is not None else Budget()
    found: dict[str, Behaviour] = {}
    for question, (name, instruction) in learn_from_solved(problems, backend, budget, EXTRACT_TEMPLATE,
                                                           parse_behaviour, max_tokens=max_tokens, progress=progress):
        found.setdefault(name, Behaviour(name, instruction, question))
    behaviours, dim = _embed_all(list(found.values()), [b.source for b in found.values()], backend, budget)
    return Handbook(behaviours, model, dim)


@dataclass
class FileStage(Stage):
    """A prompt stage that reads a JSON file (``path``), read and checked when the program loads, before any model
    work; ``k`` items of it are used per input."""

    kind: ClassVar[str] = "prompt"
    WHAT: ClassVar[str] = "file"
    path: str = ""
    k: int = 2

    def check(self) -> None:
        if not self.path:
            raise SteerscaleError(f"a {self.type} stage needs a \"path\" to a {self.WHAT} JSON file",
                                  f"build one with steerscale program {self.WHAT}")
        self.data = self.load(self.path)

    def load(self, path):
        raise NotImplementedError


def prepend_lines(ctx: Context, header: str, lines: Sequence[str]) -> None:
    """Put ``header`` and one ``- line`` per item before the prompt (nothing when there are none)."""
    if lines:
        ctx.prompt = header + "\n" + "\n".join(f"- {line}" for line in lines) + "\n\n" + ctx.prompt


@_register
@dataclass
class HandbookStage(FileStage):
    """Put the k behaviours of a handbook learned from the most similar questions before the prompt."""

    type: ClassVar[str] = "handbook"
    WHAT: ClassVar[str] = "handbook"
    BOUNDS: ClassVar[dict] = {"k": (1, 16)}

    def load(self, path) -> "Handbook":
        return Handbook.load(path)

    def run(self, ctx: Context, cands):
        chosen = self.data.retrieve(ctx.question, ctx.backend, ctx.budget, self.k)
        prepend_lines(ctx, HANDBOOK_HEADER, [f"{b.name}: {b.instruction}" for b in chosen])
        return cands


# -- prompt router (dynamic prompt selection) -------------------------------------------------------------------
@dataclass
class RouteExample:
    question: str
    correct: dict[str, float]  # prompt preset (or "none") -> 1.0 when greedy answered right with it
    vector: list[float] = field(default_factory=list)


@dataclass
class Router:
    """A light per-input prompt router: which prompt of a pool to prepend, by the prompts that worked on the ``k``
    development questions nearest to the new one (hidden-state similarity); ties go to the prompt best on the
    whole development split."""

    prompts: list[str]
    examples: list[RouteExample]
    model: str = ""
    dim: int = 0

    def overall(self) -> dict[str, float]:
        n = max(1, len(self.examples))
        return {p: sum(e.correct.get(p, 0.0) for e in self.examples) / n for p in self.prompts}

    def choose(self, question: str, backend: Backend, budget: Budget, k: int = 5) -> str:
        prior = self.overall()
        vec = embed_question(question, backend, budget, self.dim, "router") if self.examples else None
        near = nearest(vec, self.examples, k) if vec is not None else []
        local = {p: sum(e.correct.get(p, 0.0) for e in near) for p in self.prompts}
        return max(self.prompts, key=lambda p: (local[p], prior[p], -self.prompts.index(p)))

    def save(self, path) -> None:
        Path(path).write_text(json.dumps({"model": self.model, "dim": self.dim, "prompts": self.prompts,
                                          "examples": [asdict(e) for e in self.examples]}) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path) -> "Router":
        p, obj = _read_json(path, "router", ROUTER_FORMAT)
        try:
            prompts = [str(x) for x in obj["prompts"]]
            examples = [RouteExample(str(e["question"]), {str(k): float(v) for k, v in e["correct"].items()},
                                     [float(x) for x in e.get("vector", [])]) for e in obj["examples"]]
            dim = int(obj.get("dim", 0) or 0)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SteerscaleError(f"router file {str(p)!r} is malformed ({type(exc).__name__}: {exc})",
                                  ROUTER_FORMAT) from None
        check_pool(prompts)
        if any(len(e.vector) != dim for e in examples):
            raise SteerscaleError(f"router file {str(p)!r}: a vector's length differs from dim={dim}")
        return cls(prompts, examples, str(obj.get("model", "")), dim)


def with_preset(prompt: str, preset: str) -> str:
    """``prompt`` with a prompt preset applied (``"none"``: unchanged)."""
    return prompt if preset == "none" else place_text(prompt, *PROMPT_PRESETS[preset])


def check_pool(prompts: Sequence[str]) -> list[str]:
    """A router's pool, checked: ``"none"`` and registered prompt presets, at least one, no repeats."""
    pool = list(prompts)
    if not pool or len(set(pool)) != len(pool):
        raise SteerscaleError(f"a router needs a pool of distinct prompts, got {pool!r}", "e.g. none,cot,direct")
    for name in pool:
        if name != "none":
            PROMPT_PRESETS.canonical(name)  # unknown: "did you mean"
    return pool


def build_router(problems, backend: Backend, prompts: Sequence[str] = ("none", "cot", "direct"),
                 budget: Budget | None = None, *, max_tokens: int = 128, model: str = "", progress=None) -> Router:
    """A router from development problems: greedy under each prompt of the pool, right or wrong by the problem's
    own checker, and each question's embedding. Everything is charged to ``budget``."""
    check_pool(prompts)
    budget = budget if budget is not None else Budget()
    examples = []
    for p in problems:
        if budget.exhausted:
            break
        correct = {}
        for name in prompts:
            out = ask(backend, with_preset(p.prompt, name), budget, max_tokens=max_tokens)
            correct[name] = float(bool(out) and bool(p.check(out[0])))
        examples.append(RouteExample(p.prompt, correct))
        if progress is not None:
            progress.update(1)
    examples, dim = _embed_all(examples, [e.question for e in examples], backend, budget)
    return Router(list(prompts), examples, model, dim)


@_register
@dataclass
class RouteStage(FileStage):
    """Prepend the prompt a router picks for this input (dynamic prompt selection from a pool)."""

    type: ClassVar[str] = "route"
    WHAT: ClassVar[str] = "router"
    k: int = 5
    BOUNDS: ClassVar[dict] = {"k": (1, 64)}

    def load(self, path) -> "Router":
        return Router.load(path)

    def run(self, ctx: Context, cands):
        ctx.prompt = with_preset(ctx.prompt, self.data.choose(ctx.question, ctx.backend, ctx.budget, self.k))
        return cands
