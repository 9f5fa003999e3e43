"""The stages an inference program is built from, each a registered, checked piece of data.

Two kinds (Archon's layers, plus the prompt-level interventions):

* **prompt stages** rewrite the prompt the next generators see (``prompt``: a named preset such as ``cot``,
  ``direct``, ``cautious`` or ``clarify``, or free text, before or after the question);
* **candidate stages** map a list of candidates to a list of candidates: ``generate`` (any registered strategy with
  its knobs, adding its candidates), ``critique`` (a critic writes strengths and mistakes of each candidate),
  ``rank`` (a verifier or judge scores them, the top ``top_k`` stay), ``filter`` (a verifier drops those below a
  threshold; the best stays if none passes), ``vote`` (only the majority answer's candidates stay) and ``fuse``
  (the model reads the candidates, with their critiques, and writes new ones that replace them).

A stage is built from a JSON object (``{"type": "rank", "verifier": "self_eval", "top_k": 2}``) by
``build_stage``: an unknown type or option, an option of the wrong type or out of range, or a strategy knob the
strategy lacks is a ``SteerscaleError`` naming it, before any model work. Every model call goes through the
public ``Backend`` API with the run's one ``Budget`` (the backend buys each unit of work before doing it), so a
program never spends more than its budget. A stage may name a ``model``: a key of the ``models`` a program is run
with (e.g. a second, larger judge), the run's own backend otherwise.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

from ...errors import SteerscaleError
from ...registry import Registry
from ..backend import Backend, Candidate, SamplingParams, derive_seed
from ..budget import Budget
from ..spec import StrategySpec, strategy_knobs
from ..strategies.base import annotate, best_of, rank_key, vote
from ..verifiers import check_options, get_verifier, score_candidates

#: named prompt texts for the ``prompt`` stage: (text, where it goes). "Hidden in plain sight" (a cautious persona,
#: a clarifying question before answering) and "Mind your step" (chain of thought on or off).
PROMPT_PRESETS: Registry[tuple[str, str]] = Registry("prompt preset")
PROMPT_PRESETS.add("cot", ("Think step by step, then give the final answer on the last line.", "after"),
                   "chain of thought on: reason step by step, answer last")
PROMPT_PRESETS.add("direct", ("Give only the final answer, without any explanation.", "after"),
                   "chain of thought off: the answer alone")
PROMPT_PRESETS.add("cautious", ("You are a careful assistant who double-checks every step and never guesses.",
                                "before"), "a cautious persona")
PROMPT_PRESETS.add("clarify", ("Before answering, state in one line what exactly the question asks, then answer it.",
                               "after"), "restate (clarify) the question before answering")
PROMPT_PRESETS.add("expert", ("You are an expert problem solver.", "before"), "an expert persona")

CRITIQUE_TEMPLATE = ("Question: {question}\n\nProposed answer: {answer}\n\nReview the proposed answer. In at most "
                     "three short lines, say what is right and what is wrong in it. Do not solve the question again.")
FUSE_TEMPLATE = ("Question: {question}\n\nHere are {k} candidate answers{with_critiques}:\n\n{candidates}\n\n"
                 "Using what is right in them and avoiding their mistakes, write one answer to the question that is "
                 "better than each of them.")


# -- the run's context ----------------------------------------------------------------------------------------
@dataclass
class Context:
    """What every stage of one program run reads: the question as asked, the prompt the next generator sees, the
    backends, the one budget, the seed and the answer reader."""

    question: str
    prompt: str
    backend: Backend
    budget: Budget
    seed: int | None = 0
    answer_fn: Callable[[str], str | None] | None = None
    reference: Any = None
    models: Mapping[str, Backend] = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)  # sampling knobs for generate stages that do not set them
    failures: list[str] = field(default_factory=list)
    notes: dict = field(default_factory=dict)  # what one stage leaves for later ones (unit tests, an embedding)

    def backend_for(self, model: str) -> Backend:
        """The backend a stage names (``""``: the run's own)."""
        if not model:
            return self.backend
        if model not in self.models:
            raise SteerscaleError(f"a stage names model {model!r}, but the program was run without it",
                                  f"run it with models={{{model!r}: backend}} (CLI: --with {model}=MODEL); given: "
                                  f"{', '.join(sorted(self.models)) or 'none'}")
        return self.models[model]


# -- option checking ------------------------------------------------------------------------------------------
def _fail(stage: str, key: str, what: str, value) -> SteerscaleError:
    return SteerscaleError(f"stage {stage!r} option {key!r} must be {what}, got {value!r}")


def check_option(stage: str, f: dataclasses.Field, value, choices: Mapping[str, Sequence[str]],
                 bounds: Mapping[str, tuple]):
    """``value`` for option ``f`` of ``stage``, checked against the field's default type, its choices and bounds."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    key = f.name
    if key in choices:
        if value not in choices[key]:
            raise SteerscaleError(f"stage {stage!r} option {key!r}: unknown value {value!r}",
                                  f"use one of: {', '.join(map(str, choices[key]))}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise _fail(stage, key, "true or false", value)
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(stage, key, "an integer", value)
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _fail(stage, key, "a finite number", value)
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise _fail(stage, key, "a string", value)
    elif isinstance(default, dict):
        if not isinstance(value, Mapping):
            raise _fail(stage, key, "an object", value)
        value = dict(value)
    elif isinstance(default, list):
        if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
            raise _fail(stage, key, "a list of strings", value)
        value = list(value)
    lo, hi = bounds.get(key, (None, None))
    if lo is not None and value < lo or hi is not None and value > hi:
        span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise _fail(stage, key, f"a number {span}", value)
    return value


@dataclass
class Stage:
    """Base of every stage. Subclasses are dataclasses whose fields are their options (defaults give the types);
    ``CHOICES`` and ``BOUNDS`` restrict values; ``kind`` is ``"prompt"`` or ``"candidates"``."""

    type: ClassVar[str] = "stage"
    kind: ClassVar[str] = "candidates"
    CHOICES: ClassVar[dict] = {}
    BOUNDS: ClassVar[dict] = {}

    def check(self) -> None:
        """Cross-option checks after each option passed its own (override)."""

    def run(self, ctx: Context, cands: list[Candidate]) -> list[Candidate]:
        raise NotImplementedError

    def models(self) -> tuple[str, ...]:
        """The names of the models this stage runs on (``""``: the run's own)."""
        return (getattr(self, "model", ""),)

    def finish(self, ctx: Context, best: Candidate | None) -> None:
        """Called once the program has picked its answer (``best``; override, e.g. to update a memory)."""

    def to_dict(self) -> dict:
        out = {"type": self.type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if value != default:
                out[f.name] = value
        return out


STAGES: Registry[type] = Registry("stage")


def build_stage(obj, where: str = "stage") -> Stage:
    """A checked stage from a JSON object ``{"type": NAME, option: value, ...}``."""
    if not isinstance(obj, Mapping):
        raise SteerscaleError(f"{where} must be an object with a \"type\", got {obj!r}",
                              "e.g. {\"type\": \"generate\", \"strategy\": \"majority\", \"knobs\": {\"n\": 4}}")
    obj = dict(obj)
    kind = obj.pop("type", None)
    if not isinstance(kind, str):
        raise SteerscaleError(f"{where} needs a \"type\"", f"one of: {', '.join(STAGES)}")
    try:
        cls = STAGES[kind]
    except SteerscaleError as exc:
        raise SteerscaleError(f"{where}: {exc.problem}", exc.hint) from None
    known = {f.name: f for f in dataclasses.fields(cls)}
    opts = {}
    for key, value in obj.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            guess = f"; did you mean {close[0]!r}?" if close else ""
            raise SteerscaleError(f"{where}: stage {kind!r} has no option {key!r}{guess}",
                                  f"its options: {', '.join(known) or 'none'}")
        try:
            opts[key] = check_option(kind, known[key], value, cls.CHOICES, cls.BOUNDS)
        except SteerscaleError as exc:
            raise SteerscaleError(f"{where}: {exc.problem}", exc.hint) from None
    stage = cls(**opts)
    try:
        stage.check()
    except SteerscaleError as exc:
        raise SteerscaleError(f"{where}: {exc.problem}", exc.hint) from None
    return stage


def _register(cls):
    STAGES.add(cls.type, cls, (cls.__doc__ or "").strip().splitlines()[0])
    return cls


def _shorten(text: str, max_chars: int) -> str:
    """The last ``max_chars`` characters of an answer (where its final answer is)."""
    t = text.strip() or "(empty)"
    return t if len(t) <= max_chars else "..." + t[-max_chars:]


def _annotate(cands: list[Candidate], ctx: Context) -> list[Candidate]:
    annotate(cands, ctx.answer_fn)
    return cands


def _verifier(ctx: Context, name: str, options: dict, model: str):
    return get_verifier(name, reference=ctx.reference, backend=ctx.backend_for(model), **options)


def ask(backend: Backend, prompt: str, budget: Budget, *, n: int = 1, max_tokens: int = 64, temperature: float = 0.0,
        seed: int | None = None) -> list[str]:
    """The non-empty texts of ``n`` samples of ``prompt`` (fewer, or none, when the budget cuts them)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, step=None)
    return [c.text.strip() for c in backend.sample(prompt, n, params, budget, seed=seed) if c.text.strip()]


def yes_probability(backend: Backend, contexts: Sequence[str], budget: Budget) -> list[float]:
    """``P(Yes) / (P(Yes) + P(No))`` after each context (NaN where the budget could not pay for the pass)."""
    if not contexts:
        return []
    return [1.0 / (1.0 + math.exp(n - y)) for y, n in backend.choice_logprobs(list(contexts), ["Yes", "No"], budget)]


def place_text(prompt: str, text: str, where: str) -> str:
    """``text`` before or after ``prompt``, a blank line between."""
    return f"{text}\n\n{prompt}" if where == "before" else f"{prompt}\n\n{text}"


# -- prompt stages --------------------------------------------------------------------------------------------
@_register
@dataclass
class PromptStage(Stage):
    """Rewrite the prompt: a named preset (cot, direct, cautious, clarify, expert) or free text, before or after."""

    type: ClassVar[str] = "prompt"
    kind: ClassVar[str] = "prompt"
    preset: str = ""
    text: str = ""
    where: str = ""  # "" : the preset's own place (free text: before)
    CHOICES: ClassVar[dict] = {"where": ("", "before", "after")}

    def check(self) -> None:
        if bool(self.preset) == bool(self.text.strip()):
            raise SteerscaleError("a prompt stage takes exactly one of \"preset\" or \"text\"",
                                  f"presets: {', '.join(PROMPT_PRESETS)}")
        if self.preset:
            PROMPT_PRESETS.canonical(self.preset)

    def words(self) -> tuple[str, str]:
        text, place = PROMPT_PRESETS[self.preset] if self.preset else (self.text.strip(), "before")
        return text, self.where or place

    def run(self, ctx: Context, cands: list[Candidate]) -> list[Candidate]:
        ctx.prompt = place_text(ctx.prompt, *self.words())
        return cands


# -- candidate stages -----------------------------------------------------------------------------------------
@_register
@dataclass
class GenerateStage(Stage):
    """Add candidates: any registered strategy with its knobs (keep all its candidates, or its pick)."""

    type: ClassVar[str] = "generate"
    strategy: str = "majority"
    knobs: dict = field(default_factory=dict)
    verifier: str = ""
    verifier_options: dict = field(default_factory=dict)
    keep: str = "all"
    model: str = ""
    CHOICES: ClassVar[dict] = {"keep": ("all", "best")}

    def to_dict(self) -> dict:
        return {"type": self.type, "strategy": self.strategy, **super().to_dict()}  # the strategy always shown

    def check(self) -> None:
        if self.strategy == "program":
            raise SteerscaleError("a generate stage cannot run a program", "inline the stages instead")
        # the strategy, its knobs and the verifier, checked as StrategySpec checks them (and kept for the runs)
        self.spec = StrategySpec.of(self.strategy, verifier=self.verifier or None,
                                    verifier_options=self.verifier_options or None, **self.knobs)

    def run(self, ctx: Context, cands: list[Candidate]) -> list[Candidate]:
        if ctx.budget.exhausted:
            return cands
        spec = self.spec
        takes = strategy_knobs(spec.name)
        inherited = {k: v for k, v in ctx.defaults.items() if k in takes and k not in self.knobs}
        spec = spec.with_knobs(**inherited, seed=derive_seed(ctx.seed, "generate", len(cands), self.strategy))
        result = spec.run(ctx.prompt, ctx.backend_for(self.model), reference=ctx.reference, budget=ctx.budget,
                          answer_fn=ctx.answer_fn)
        ctx.failures += result.failures
        new = result.candidates if self.keep == "all" else [result.best] if result.best is not None else []
        new = [c for c in new if c.n_tokens or c.text]  # a row the budget cut before its first token is no candidate
        for c in new:
            c.meta["by"] = self.strategy
        return cands + new


@dataclass
class _WritingStage(Stage):
    """A stage whose model (``model``) writes about the candidates, each shown up to its last ``max_chars``."""

    max_tokens: int = 96
    temperature: float = 0.0
    max_chars: int = 600
    model: str = ""
    BOUNDS: ClassVar[dict] = {"max_tokens": (1, None), "temperature": (0.0, None), "max_chars": (20, None)}


@_register
@dataclass
class CritiqueStage(_WritingStage):
    """A critic writes what is right and wrong in each candidate (read by fuse)."""

    type: ClassVar[str] = "critique"

    def run(self, ctx: Context, cands: list[Candidate]) -> list[Candidate]:
        backend = ctx.backend_for(self.model)
        for i, c in enumerate(cands):
            if ctx.budget.exhausted:
                break
            prompt = CRITIQUE_TEMPLATE.format(question=ctx.question, answer=_shorten(c.text, self.max_chars))
            out = ask(backend, prompt, ctx.budget, max_tokens=self.max_tokens, temperature=self.temperature,
                      seed=derive_seed(ctx.seed, "critique", i))
            if out:
                c.meta["critique"] = out[0]
        return cands


@dataclass
class _ScoringStage(Stage):
    """A stage whose verifier (or judge, on the stage's ``model``) scores every candidate."""

    verifier: str = "self_eval"
    verifier_options: dict = field(default_factory=dict)

    def check(self) -> None:
        check_options(self.verifier, dict(self.verifier_options))

    def score(self, ctx: Context, cands: list[Candidate]) -> None:
        verifier = _verifier(ctx, self.verifier, self.verifier_options, getattr(self, "model", ""))
        ctx.failures += score_candidates(verifier, ctx.question, cands, ctx.budget)


@_register
@dataclass
class RankStage(_ScoringStage):
    """A verifier or judge scores the candidates; the top ``top_k`` stay (Archon's ranker)."""

    type: ClassVar[str] = "rank"
    top_k: int = 2
    model: str = ""
    BOUNDS: ClassVar[dict] = {"top_k": (1, None)}

    def run(self, ctx: Context, cands: list[Candidate]) -> list[Candidate]:
        if not cands:
            return cands
        self.score(ctx, cands)
        return sorted(cands, key=rank_key, reverse=True)[: self.top_k]


@_register
@dataclass
class FilterStage(_ScoringStage):
    """A verifier drops candidates scored below ``threshold`` (the best one stays if none passes)."""

    type: ClassVar[str] = "filter"
    threshold: float = 0.5
    model: str = ""
    BOUNDS: ClassVar[dict] = {"threshold": (0.0, 1.0)}

    def run(self, ctx: Context, cands: list[Candidate]) -> list[Candidate]:
        if not cands:
            return cands
        self.score(ctx, cands)
        return keep_passing(cands, self.threshold)


def keep_passing(cands: list[Candidate], threshold: float) -> list[Candidate]:
    """The candidates scored ``threshold`` or more; the best one when none is."""
    kept = [c for c in cands if c.score is not None and c.score >= threshold]
    return kept or [best_of(cands)]


@_register
@dataclass
class VoteStage(Stage):
    """Only the candidates of the majority answer stay (weighted by their scores when asked)."""

    type: ClassVar[str] = "vote"
    weighted: bool = False

    def run(self, ctx: Context, cands: list[Candidate]) -> list[Candidate]:
        weights = [0.0 if c.score is None else c.score for c in cands] if self.weighted else None
        answer, _ = vote(cands, weights)
        kept = [c for c in cands if answer is not None and c.answer == answer]
        return kept or cands


@_register
@dataclass
class FuseStage(_WritingStage):
    """The model reads the candidates (with critiques) and writes ``n`` new answers that replace them (fuser)."""

    type: ClassVar[str] = "fuse"
    max_tokens: int = 256
    n: int = 1
    max_inputs: int = 4
    BOUNDS: ClassVar[dict] = {**_WritingStage.BOUNDS, "n": (1, 64), "max_inputs": (1, 16)}

    def prompt(self, question: str, cands: Sequence[Candidate]) -> str:
        shown = sorted(cands, key=rank_key, reverse=True)[: self.max_inputs]
        crit = any("critique" in c.meta for c in shown)
        blocks = []
        for i, c in enumerate(shown, 1):
            block = f"Candidate {i}:\n{_shorten(c.text, self.max_chars)}"
            if "critique" in c.meta:
                block += f"\nCritique of candidate {i}: {_shorten(c.meta['critique'], self.max_chars)}"
            blocks.append(block)
        return FUSE_TEMPLATE.format(question=question, k=len(shown), candidates="\n\n".join(blocks),
                                    with_critiques=" with critiques" if crit else "")

    def run(self, ctx: Context, cands: list[Candidate]) -> list[Candidate]:
        if not cands or ctx.budget.exhausted:
            return cands
        params = SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature if self.n > 1 else 0.0,
                                step=None)
        out = ctx.backend_for(self.model).sample(self.prompt(ctx.question, cands), self.n, params, ctx.budget,
                                                 seed=derive_seed(ctx.seed, "fuse", len(cands)))
        out = [c for c in out if c.text.strip()]
        for c in out:
            c.meta["by"] = "fuse"
        # the budget cut the fuser before it wrote anything: the candidates it would have replaced stay
        return _annotate(out, ctx) if out else cands


__all__ = ["CRITIQUE_TEMPLATE", "FUSE_TEMPLATE", "PROMPT_PRESETS", "STAGES", "Context", "Stage", "ask", "build_stage",
           "keep_passing", "place_text", "yes_probability"]
