"""Judges of generated text for ``steerscale calibrate --judge`` (docs/studio.md).

A judge maps each (prompt, generated reply) to a number; calibration measures a setting's effect as the gain of
the judge's mean over the unsteered model's replies to the same prompts (paired bootstrap interval), so a
behaviour that shows in generations (refusing, a register, a topic) is calibrated on generations rather than on
the log-prob margin of two fixed replies. Specs, as ``--judge`` takes them:

* ``regex:PATTERN``: 1 when ``re.search(PATTERN, reply)`` matches, else 0 (the share of matching replies).
  Case-sensitive unless the pattern says ``(?i)``.
* ``lexicon:FILE``: the share of the reply's words found in FILE (one word per line, ``#`` comments; matched
  case-insensitively).
* ``probe:FILE``: a saved steerscale condition (``steerscale condition``: a direction and threshold at one site)
  read on the reply with the unsteered model; the score is the cosine with the probe's direction, signed so that
  higher means "the condition holds" (its threshold is ``metadata``).
* ``llm:QUESTION``: the unsteered model itself asked QUESTION (a yes/no question) about the reply; the score is
  P(yes) / (P(yes) + P(no)) from the log-probs of the answers " Yes" and " No" (``measure.mc.score_choices``).
* ``margin``: no judge: the pairs' log-prob margin (calibrate's default).
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

from ..errors import SteerscaleError

KINDS = ("regex", "lexicon", "probe", "llm")
_HINT = "write --judge regex:PATTERN, lexicon:FILE, probe:COND.safetensors or llm:QUESTION (or margin, the default)"
LLM_TEMPLATE = '{question}\n\nText: """{reply}"""\n\nAnswer with Yes or No.'
_WORD = re.compile(r"\w+(?:['\u2019-]\w+)*")


class Judge(ABC):
    """Scores generated replies; ``spec`` is how ``--judge`` names it, ``unit`` what its score means."""

    spec: str
    unit: str

    def check(self, lm) -> None:
        """Raise a ``SteerscaleError`` when the judge cannot read this model (a probe fitted on another)."""

    @abstractmethod
    def score(self, lm, prompts: Sequence[str], replies: Sequence[str]) -> list[float]: ...


class RegexJudge(Judge):
    unit = "share of replies matching"

    def __init__(self, pattern: str):
        try:
            self.pattern = re.compile(pattern)
        except re.error as exc:
            raise SteerscaleError(f"--judge regex:{pattern!r} is not a valid regular expression ({exc})",
                                  "e.g. --judge \"regex:(?i)I can(no|')t\"") from None
        self.spec = f"regex:{pattern}"

    def score(self, lm, prompts, replies):
        return [1.0 if self.pattern.search(r) else 0.0 for r in replies]


class LexiconJudge(Judge):
    unit = "share of words in the lexicon"

    def __init__(self, path: str):
        file = Path(path)
        if not file.is_file():
            raise SteerscaleError(f"--judge lexicon: no file {path!r}", "give a text file with one word per line")
        words = {w.strip().lower() for w in file.read_text(encoding="utf-8").splitlines()}
        self.words = {w for w in words if w and not w.startswith("#")}
        if not self.words:
            raise SteerscaleError(f"--judge lexicon:{path} lists no words", "one word per line (# starts a comment)")
        self.spec = f"lexicon:{path}"

    def score(self, lm, prompts, replies):
        out = []
        for r in replies:
            words = [w.lower() for w in _WORD.findall(r)]
            out.append(sum(w in self.words for w in words) / len(words) if words else 0.0)
        return out


class ProbeJudge(Judge):
    unit = "signed cosine with the probe direction"

    def __init__(self, path: str):
        from ..steer.conditional import Condition

        if not Path(path).is_file():
            raise SteerscaleError(f"--judge probe: no file {path!r}",
                                  "give a condition file (steerscale condition ... -o COND.safetensors)")
        self.condition = Condition.load(path)
        self.spec = f"probe:{path}"

    def check(self, lm) -> None:
        self.condition.check(lm.layout)

    def score(self, lm, prompts, replies):
        import torch

        from ..engine.capture import tokenize
        from ..engine.generation import format_prompt
        from ..engine.prompt_rules import read_prompts
        from ..steer.conditional import Comparison

        cond, out = self.condition, []
        sign = 1.0 if cond.comparison is Comparison.GREATER else -1.0
        device = next(lm.model.parameters()).device
        rule = SimpleNamespace(reads=(cond.read,))  # what read_prompts needs of a rule: the reads
        texts = [format_prompt(lm.tokenizer, r if r.strip() else ".") for r in replies]  # read as a prompt is read
        for s in range(0, len(texts), 16):
            batch = tokenize(lm.tokenizer, texts[s:s + 16], device)
            with torch.no_grad():
                (readings,) = read_prompts(lm.model, lm.layout, batch, [rule])
            out += (sign * cond.similarity(readings[cond.read])).tolist()
        return out


class LLMJudge(Judge):
    unit = "P(yes) of the model's own yes/no answer"

    def __init__(self, question: str):
        if not question.strip():
            raise SteerscaleError("--judge llm: needs a question", 'e.g. --judge "llm:Is this reply formal?"')
        self.question = question.strip()
        self.spec = f"llm:{self.question}"

    def score(self, lm, prompts, replies):
        from .mc import score_choices

        asks = [LLM_TEMPLATE.format(question=self.question, reply=r.strip()) for r in replies]
        scored = score_choices(lm.model, lm.tokenizer, asks, [["Yes", "No"]] * len(asks), layout=lm.layout)
        return [1 / (1 + math.exp(s["logprobs"][1] - s["logprobs"][0])) for s in scored]


def parse_judge(spec: str | Judge | None) -> Judge | None:
    """A ``Judge`` from a ``--judge`` spec (None or ``margin``: none, the pairs' margin), checked before any model
    work; a bad spec is one ``SteerscaleError`` naming the problem."""
    if spec is None or isinstance(spec, Judge):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise SteerscaleError(f"bad --judge {spec!r}", _HINT)
    if spec.strip() == "margin":
        return None
    kind, sep, arg = spec.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in KINDS:
        raise SteerscaleError(f"unknown judge {spec!r}: the kinds are {', '.join(KINDS)} (or margin)", _HINT)
    if not arg:
        raise SteerscaleError(f"--judge {kind}: needs an argument after the colon", _HINT)
    return {"regex": RegexJudge, "lexicon": LexiconJudge, "probe": ProbeJudge, "llm": LLMJudge}[kind](arg)
