"""ArcMemo: a lifelong concept memory -- abstract, reusable concepts written by the model from solution traces,
selected for a new problem, and updated as an evaluation goes on.

* A **concept** is a name and an abstract idea, ``when <situation>, <what to do>`` (ArcMemo's situation and
  suggestion), with the question it was learned from and that question's embedding (the model's own mean-pooled
  hidden states, ``backend.embed``), and how often it was selected.
* ``build_concepts(problems, backend, budget)``: the model solves each problem (greedy); for each it solves (the
  problem's own checker says so) it writes one concept from its solution; parsed concepts are kept, one per name.
* ``ConceptMemory.select(question, backend, budget, k, how)``: ``how="similar"``: the ``k`` concepts learned from
  the questions closest to this one (cosine similarity; the question's embedding is charged as verifier work);
  ``how="model"``: the model itself reads the ``pool`` nearest concepts and says, for each, whether it helps
  (P(Yes) of a yes/no question, one verifier pass each); those it accepts, best first, up to ``k``.
* The ``concepts`` prompt stage (``{"type": "concepts", "path": "concepts.json", "k": 2}``) puts the selected
  concepts before the prompt. With ``"update": true`` it also learns as the evaluation goes on: once the program has
  picked its answer, a confident one (its score, or the model's self-evaluation when it has none, at least
  ``min_score``) is turned into a new concept, written from that answer's trace and saved to the file, so the next
  problem can select it. No gold answer is read at test time.

The file is JSON: ``{"model", "dim", "concepts": [{"name", "idea", "source", "vector", "uses", "origin"}]}``. Every
run opens it through one in-process cache keyed by path and modification time, so runs in one process share the
updated memory and a file changed on disk is read again.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ...errors import SteerscaleError
from ..backend import Backend, Candidate, derive_seed
from ..budget import Budget
from ..verifiers.model_based import SELF_EVAL_TEMPLATE
from .memory import Behaviour, FileStage, _embed_all, _read_json, embed_question, learn_from_solved, nearest, \
    parse_behaviour, prepend_lines
from .stages import Context, _register, _shorten, ask, yes_probability

CONCEPT_TEMPLATE = ("Problem: {question}\nSolution: {solution}\n\nDo not answer the problem again. Write one general "
                    "lesson from it that would help with similar problems, as one sentence starting with \"When\".")
CONCEPTS_HEADER = "Concepts that may help with this problem:"
SELECT_TEMPLATE = ("Problem: {question}\n\nConcept: {concept}\n\nWould this concept help to solve the problem? "
                   "Answer Yes or No.")
CONCEPTS_FORMAT = "it is JSON: {\"concepts\": [{\"name\", \"idea\", \"source\", \"vector\"}]}"
_WHEN = re.compile(r"\b(when|if|whenever)\b\s+(\S.{10,200})", re.IGNORECASE)


@dataclass
class Concept(Behaviour):
    """A behaviour whose ``instruction`` is an abstract idea (``idea``), with how often it was selected and where it
    came from: ``"build"`` (a development split) or ``"update"`` (learned during a run)."""

    uses: int = 0
    origin: str = "build"

    @property
    def idea(self) -> str:
        return self.instruction

    def line(self) -> str:
        return f"{self.name}: {self.idea}"

    def to_json(self) -> dict:
        return {"name": self.name, "idea": self.idea, "source": self.source, "vector": self.vector, "uses": self.uses,
                "origin": self.origin}


_STOP = {"a", "an", "the", "it", "is", "are", "to", "of", "in", "on", "for", "comes", "you", "your", "we", "there",
         "this", "that", "when", "if", "with", "and", "or", "be", "can", "do", "does", "need", "needs", "asked", "asks"}


def parse_concept(text: str) -> tuple[str, str] | None:
    """``(name, idea)`` from ``name: idea``, or from the first sentence with ``when``/``if`` (named by its first
    content words); None when the text holds neither."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    m = _WHEN.search(first)
    if m and (m.start() == 0 or not parse_behaviour(text)):
        sentence = re.split(r"(?<=[.!?])\s", m.group(2).strip())[0]
        idea = f"{m.group(1).lower()} {sentence}"[:240]
        words = [w for w in re.findall(r"[a-z]+", sentence.lower()) if w not in _STOP][:3]
        return ("_".join(words) or "concept"), idea
    return parse_behaviour(text)


@dataclass
class ConceptMemory:
    concepts: list[Concept]
    model: str = ""
    dim: int = 0
    max_size: int = 256

    # -- the file -------------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"model": self.model, "dim": self.dim, "concepts": [c.to_json() for c in self.concepts]}

    def save(self, path) -> None:
        """Written whole to a temporary file, then moved over ``path`` (a reader never sees half a file)."""
        p = Path(path)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, p)

    @classmethod
    def load(cls, path) -> "ConceptMemory":
        p, obj = _read_json(path, "concepts", CONCEPTS_FORMAT)
        try:
            concepts = [Concept(str(c["name"]), str(c["idea"]), str(c.get("source", "")),
                                [float(x) for x in c.get("vector", [])], int(c.get("uses", 0)),
                                str(c.get("origin", "build"))) for c in obj["concepts"]]
            dim = int(obj.get("dim", 0) or 0)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SteerscaleError(f"concepts file {str(p)!r} is malformed ({type(exc).__name__}: {exc})",
                                  CONCEPTS_FORMAT) from None
        if any(c.vector and len(c.vector) != dim for c in concepts):
            raise SteerscaleError(f"concepts file {str(p)!r}: a vector's length differs from dim={dim}")
        return cls(concepts, str(obj.get("model", "")), dim)

    # -- use --------------------------------------------------------------------------------------------------------
    def select(self, question: str, backend: Backend, budget: Budget, k: int = 2, how: str = "similar",
               pool: int = 8, vector: list[float] | None = None) -> list[Concept]:
        """The concepts for ``question`` (see the module docstring); ``vector``: its embedding when already paid."""
        if not self.concepts:
            return []
        near = self.concepts
        if self.dim and all(c.vector for c in self.concepts):
            vec = vector if vector is not None else embed_question(question, backend, budget, self.dim, "concepts")
            if vec is None:
                return []
            near = nearest(vec, self.concepts, pool if how == "model" else k)
        if how == "similar":
            return near[:k]
        p_yes = yes_probability(backend, [SELECT_TEMPLATE.format(question=question, concept=c.line())
                                          for c in near[:pool]], budget)
        accepted = sorted((p, i) for i, p in enumerate(p_yes) if p == p and p >= 0.5)  # NaN: unpaid, skipped
        return [near[i] for _, i in sorted(accepted, key=lambda t: (-t[0], t[1]))][:k]

    def add(self, concept: Concept) -> bool:
        """Keep ``concept`` unless one of its name exists (the memory drops its least-used, oldest concept when
        full); whether it was added."""
        if any(c.name == concept.name for c in self.concepts) or (self.dim and len(concept.vector) != self.dim):
            return False
        if len(self.concepts) >= self.max_size:
            self.concepts.remove(min(self.concepts, key=lambda c: c.uses))
        self.concepts.append(concept)
        if not self.dim:
            self.dim = len(concept.vector)
        return True


_OPEN: dict[str, tuple[int, ConceptMemory]] = {}
_LOCK = threading.RLock()


def open_memory(path) -> ConceptMemory:
    """The memory at ``path``, shared by every run in this process (read again when the file changed on disk)."""
    key = str(Path(path).expanduser().resolve())
    with _LOCK:
        mtime = Path(key).stat().st_mtime_ns if Path(key).is_file() else -1
        hit = _OPEN.get(key)
        if hit is None or hit[0] != mtime:
            _OPEN[key] = (mtime, ConceptMemory.load(key))
        return _OPEN[key][1]


def save_memory(path, memory: ConceptMemory) -> None:
    key = str(Path(path).expanduser().resolve())
    with _LOCK:
        memory.save(key)
        _OPEN[key] = (Path(key).stat().st_mtime_ns, memory)


def write_concept(question: str, solution: str, backend: Backend, budget: Budget, *, max_tokens: int = 48,
                  seed: int | None = None) -> tuple[str, str] | None:
    """The model's concept from one solution trace, parsed (None: it wrote nothing usable or the budget ran out)."""
    reply = ask(backend, CONCEPT_TEMPLATE.format(question=question, solution=_shorten(solution, 800)), budget,
                max_tokens=max_tokens, seed=seed)
    return parse_concept(reply[0]) if reply else None


def build_concepts(problems, backend: Backend, budget: Budget | None = None, *, max_tokens: int = 128,
                   model: str = "", progress=None) -> ConceptMemory:
    """A concept memory from the problems the model solves (``problems``: ``search.Problem``, whose ``check`` says
    whether a text is right). Everything is charged to ``budget``."""
    budget = budget if budget is not None else Budget()
    found: dict[str, Concept] = {}
    for question, (name, idea) in learn_from_solved(problems, backend, budget, CONCEPT_TEMPLATE, parse_concept,
                                                    max_tokens=max_tokens, progress=progress):
        found.setdefault(name, Concept(name, idea, question))
    concepts, dim = _embed_all(list(found.values()), [c.source for c in found.values()], backend, budget)
    return ConceptMemory(concepts, model, dim)


@_register
@dataclass
class ConceptsStage(FileStage):
    """Put the k concepts a concept memory selects for this problem before the prompt, learning as it goes (ArcMemo).

    With ``update``, new concepts are learned from confident answers."""

    type: ClassVar[str] = "concepts"
    WHAT: ClassVar[str] = "concepts"
    select: str = "similar"
    pool: int = 8
    update: bool = False
    min_score: float = 0.5
    max_tokens: int = 48
    CHOICES: ClassVar[dict] = {"select": ("similar", "model")}
    BOUNDS: ClassVar[dict] = {"k": (1, 16), "pool": (1, 64), "min_score": (0.0, 1.0), "max_tokens": (1, 512)}

    def load(self, path) -> ConceptMemory:
        return open_memory(path)

    def run(self, ctx: Context, cands):
        memory = open_memory(self.path)
        vec = embed_question(ctx.question, ctx.backend, ctx.budget, memory.dim, "concepts") if memory.dim else None
        ctx.notes["concepts_vector"] = vec
        chosen = memory.select(ctx.question, ctx.backend, ctx.budget, self.k, self.select, self.pool,
                               vector=vec) if vec is not None or not memory.dim else []
        for c in chosen:
            c.uses += 1
        ctx.notes["concepts"] = [c.name for c in chosen]
        prepend_lines(ctx, CONCEPTS_HEADER, [c.line() for c in chosen])
        return cands

    def finish(self, ctx: Context, best: Candidate | None) -> None:
        """With ``update``: a concept from the chosen answer's trace, when the answer is confident enough."""
        if not self.update or best is None or not best.text.strip() or ctx.budget.exhausted:
            return
        score = best.score
        if score is None and self.min_score > 0:
            score = yes_probability(ctx.backend, [SELF_EVAL_TEMPLATE.format(
                question=ctx.question, solution=_shorten(best.text, 800))], ctx.budget)[0]
        if score is not None and (not score == score or score < self.min_score):  # NaN: the check was not paid
            return
        parsed = write_concept(ctx.question, best.text, ctx.backend, ctx.budget, max_tokens=self.max_tokens,
                               seed=derive_seed(ctx.seed, "concept"))
        if parsed is None:
            return
        memory = open_memory(self.path)
        vec = ctx.notes.get("concepts_vector")
        if vec is not None:
            concept = Concept(parsed[0], parsed[1], ctx.question, list(vec))
        elif memory.dim:
            return  # the budget could not pay for the question's embedding
        else:  # an empty memory takes its width from its first concept
            embedded, _ = _embed_all([Concept(*parsed, ctx.question)], [ctx.question], ctx.backend, ctx.budget)
            if not embedded:
                return
            concept = embedded[0]
        concept.origin = "update"
        with _LOCK:
            if memory.add(concept):
                save_memory(self.path, memory)
                ctx.notes["learned"] = concept.name


__all__ = ["CONCEPT_TEMPLATE", "Concept", "ConceptMemory", "ConceptsStage", "build_concepts", "open_memory",
           "parse_concept", "write_concept"]
