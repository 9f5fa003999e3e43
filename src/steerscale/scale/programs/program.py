"""``Program``: an inference pipeline as data -- a list of stages and a final selection -- run on any backend
within one budget.

A program is a JSON (or YAML) object::

    {"name": "generate-rank-fuse",
     "stages": [{"type": "prompt", "preset": "cot"},
                {"type": "generate", "strategy": "majority", "knobs": {"n": 4, "temperature": 0.7}},
                {"type": "rank", "verifier": "self_eval", "top_k": 2},
                {"type": "fuse", "max_tokens": 256}],
     "select": "vote"}

``load_program`` reads one from a registered name (``PROGRAMS``), a ``.json`` / ``.yaml`` file or inline JSON
text, and checks every stage (``stages.build_stage``) and the layout (candidate stages need a ``generate``
before them) before any model work. ``Program.run(prompt, backend, budget)`` runs the stages in order on one
``Context`` -- prompt stages rewrite the prompt the later generators see; candidate stages map the candidate
list -- and picks the answer (``select``: ``vote`` over answers, ``best`` by score, or ``first``). The result is
a strategy ``Result`` whose ``info["trace"]`` gives each stage's candidate count and the budget spent by then.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ...errors import SteerscaleError
from ...registry import Registry
from ..backend import Backend
from ..budget import Budget
from ..strategies.base import Result, best_of, finish, representative, vote
from ..verifiers import score_candidates
from .stages import Context, Stage, build_stage

SELECTIONS = ("vote", "best", "first")
TOP_KEYS = ("name", "stages", "select", "description")
NOTES_SHOWN = ("teach", "concepts", "learned", "unit_tests")  # what stages noted, shown in Result.info

#: ready-made programs, by name (``--knob program=NAME``); each is plain data, as a user's file would be
PROGRAMS: Registry[dict] = Registry("program")
PROGRAMS.add("generate_rank_fuse", {
    "stages": [{"type": "generate", "strategy": "majority", "knobs": {"n": 4, "temperature": 0.7}},
               {"type": "rank", "verifier": "self_eval", "top_k": 2},
               {"type": "fuse"}],
    "select": "first"}, "Archon's basic block: 4 samples, self-evaluation keeps 2, one fused answer")
PROGRAMS.add("critique_fuse", {
    "stages": [{"type": "generate", "strategy": "majority", "knobs": {"n": 3, "temperature": 0.7}},
               {"type": "critique"},
               {"type": "fuse"}],
    "select": "first"}, "3 samples, a critique of each, one answer fused from samples and critiques")
PROGRAMS.add("vote_then_verify", {
    "stages": [{"type": "generate", "strategy": "majority", "knobs": {"n": 6, "temperature": 0.8}},
               {"type": "filter", "verifier": "self_eval", "threshold": 0.5},
               {"type": "vote"}],
    "select": "best"}, "6 samples, drop those self-evaluation rejects, majority of the rest")
PROGRAMS.add("cot_majority", {
    "stages": [{"type": "prompt", "preset": "cot"},
               {"type": "generate", "strategy": "majority", "knobs": {"n": 4, "temperature": 0.7}}],
    "select": "vote"}, "chain-of-thought prompt, self-consistency over 4 samples")
DEFAULT_PROGRAM = "generate_rank_fuse"


@dataclass(frozen=True)
class Program:
    """A checked pipeline: its stages (built, immutable once loaded) and the final selection."""

    stages: tuple[Stage, ...]
    select: str = "vote"
    name: str = ""
    description: str = ""

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, obj) -> "Program":
        """From a JSON-able dict; every problem is a ``SteerscaleError`` naming the stage and option."""
        if not isinstance(obj, Mapping):
            raise SteerscaleError(f"a program is an object with \"stages\", got {type(obj).__name__}",
                                  "e.g. {\"stages\": [{\"type\": \"generate\", \"strategy\": \"majority\"}]}")
        unknown = sorted(set(obj) - set(TOP_KEYS))
        if unknown:
            raise SteerscaleError(f"a program has no field {', '.join(map(repr, unknown))}",
                                  f"its fields: {', '.join(TOP_KEYS)}")
        raw = obj.get("stages")
        if not isinstance(raw, list) or not raw:
            raise SteerscaleError("a program needs a non-empty \"stages\" list",
                                  "e.g. [{\"type\": \"generate\", \"strategy\": \"majority\", \"knobs\": {\"n\": 4}}]")
        stages = tuple(build_stage(s, f"stage {i} ({s.get('type', '?') if isinstance(s, Mapping) else '?'})")
                       for i, s in enumerate(raw))
        select = obj.get("select", "vote")
        if select not in SELECTIONS:
            raise SteerscaleError(f"unknown program select {select!r}", f"use one of: {', '.join(SELECTIONS)}")
        for key in ("name", "description"):
            if not isinstance(obj.get(key, ""), str):
                raise SteerscaleError(f"program {key} must be a string, got {obj[key]!r}")
        check_layout(stages)
        return cls(stages, select, obj.get("name", ""), obj.get("description", ""))

    def to_dict(self) -> dict:
        out = {"stages": [s.to_dict() for s in self.stages], "select": self.select}
        if self.name:
            out = {"name": self.name, **out}
        if self.description:
            out["description"] = self.description
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    # -- use ----------------------------------------------------------------------------------------------------
    def run(self, prompt: str, backend: Backend, budget: Budget | None = None, *, seed: int | None = 0,
            answer_fn: Callable[[str], str | None] | None = None, reference: Any = None,
            models: Mapping[str, Backend] | None = None, defaults: Mapping[str, Any] | None = None,
            final_verifier=None) -> Result:
        """Run every stage on ``prompt`` with ``backend`` (stages naming a ``model`` use ``models[model]``), all
        charged to ``budget`` (default: unlimited). ``defaults``: sampling knobs for every generate stage that does
        not set them; ``final_verifier`` (a ``Verifier``) scores the last candidates before the selection. Returns a
        strategy ``Result`` named ``program``."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise SteerscaleError("empty prompt", "pass a non-empty prompt text")
        budget = budget if budget is not None else Budget()
        models = dict(models or {})
        ctx = Context(prompt, prompt, backend, budget, seed, answer_fn, reference, models, dict(defaults or {}))
        for name in self.model_names():  # every model a stage names is there before any model work
            ctx.backend_for(name)
        cands, trace = [], []
        for i, stage in enumerate(self.stages):
            cands = stage.run(ctx, cands)
            spent = budget.spent()
            trace.append({"stage": i, "type": stage.type, "candidates": len(cands),
                          "generated_tokens": spent["generated_tokens"], "prompt_tokens": spent["prompt_tokens"],
                          "verifier_passes": spent["verifier_passes"]})
        if final_verifier is not None:
            ctx.failures += score_candidates(final_verifier, prompt, cands, budget)
        answer, best = self.pick(cands)
        for stage in self.stages:  # e.g. a concept memory learning from the answer it helped with
            stage.finish(ctx, best)
        notes = {k: v for k, v in ctx.notes.items() if k in NOTES_SHOWN}
        return finish("program", answer, best, cands, budget, ctx.failures, trace=trace,
                      program=self.name or None, prompt=ctx.prompt if ctx.prompt != prompt else None, **notes)

    def model_names(self) -> list[str]:
        """The models the stages name (besides the run's own), each once, in order."""
        return list(dict.fromkeys(name for s in self.stages for name in s.models() if name))

    def pick(self, cands) -> tuple[str | None, Any]:
        """The final answer and the candidate that carries it."""
        if not cands:
            return None, None
        if self.select == "first":
            return cands[0].answer, cands[0]
        if self.select == "best":
            best = best_of(cands)
            return best.answer, best
        answer, _ = vote(cands)
        return answer, representative(cands, answer)


def check_layout(stages) -> None:
    """Candidate stages other than ``generate`` need candidates: a ``generate`` must come before the first."""
    seen_generate = False
    for i, s in enumerate(stages):
        if s.type == "generate":
            seen_generate = True
        elif s.kind == "candidates" and not seen_generate:
            raise SteerscaleError(f"stage {i} ({s.type}) has no candidates to work on",
                                  "put a {\"type\": \"generate\", ...} stage before it")
    if not seen_generate:
        raise SteerscaleError("a program needs at least one generate stage", "add {\"type\": \"generate\", ...}")


def read_text(text: str, where: str):
    """JSON, or YAML when PyYAML is installed (YAML is a superset of JSON)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        json_error = exc
    try:
        import yaml
    except ImportError:
        raise SteerscaleError(f"{where} is not valid JSON ({json_error})", "fix the JSON, or pip install pyyaml "
                              "for YAML") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SteerscaleError(f"{where} is neither valid JSON nor YAML ({exc})".replace("\n", " ")) from None


@functools.lru_cache(maxsize=64)
def _load_named_or_inline(ref: str) -> Program:
    """A registered program or inline JSON: immutable text, so parsed once (the spec checks it, the run reuses it)."""
    if ref in PROGRAMS:
        obj = copy.deepcopy(PROGRAMS[ref])
        obj.setdefault("name", PROGRAMS.canonical(ref))
        return Program.from_json(obj)
    return Program.from_json(read_text(ref.strip(), "the inline program"))


def _load_text(ref: str) -> Program:
    stripped = ref.strip()
    if ref in PROGRAMS or stripped.startswith("{"):
        return _load_named_or_inline(ref)
    path = Path(stripped).expanduser()
    if path.suffix.lower() in (".json", ".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SteerscaleError(f"program file {str(path)!r} does not exist",
                                  "pass a .json/.yaml file, a program name or inline JSON")
        obj = read_text(path.read_text(encoding="utf-8"), f"program file {str(path)!r}")
        if isinstance(obj, Mapping) and "name" not in obj:
            obj = {"name": path.stem, **obj}
        return Program.from_json(obj)
    raise SteerscaleError(PROGRAMS.unknown(ref).problem,
                          f"pass a program name ({', '.join(PROGRAMS)}), a .json/.yaml file or inline JSON "
                          "({\"stages\": [...]})")


def load_program(ref) -> Program:
    """A checked ``Program`` from a ``Program``, a dict, a registered name, a ``.json``/``.yaml`` path or inline JSON
    text."""
    if isinstance(ref, Program):
        return ref
    if isinstance(ref, Mapping):
        return Program.from_json(ref)
    if isinstance(ref, Path):
        ref = str(ref)
    if not isinstance(ref, str) or not ref.strip():
        raise SteerscaleError(f"a program is a name, a file or JSON text, got {ref!r}",
                              f"e.g. {DEFAULT_PROGRAM}, my_program.json or '{{\"stages\": [...]}}'")
    return _load_text(ref)


__all__ = ["DEFAULT_PROGRAM", "PROGRAMS", "Program", "load_program"]
