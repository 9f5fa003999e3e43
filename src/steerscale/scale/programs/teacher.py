"""Teacher intervention: a teacher model decides when an explanation helps the student, by simulating the student
with and without it, under a budget of explanations.

The ``teach`` prompt stage (``{"type": "teach", "model": "teacher", "explanations": 1}``):

1. the teacher (the backend the stage's ``model`` names; the run's own when empty) writes up to ``explanations``
   short explanations of the question, each ending with its answer -- the stage's budget of interventions;
2. it simulates the student (the backend that generates next: ``student`` names one, the run's own otherwise): the
   student's log-probability of the teacher's answer as the first token of its reply, to the prompt without and
   with each explanation (one batched pass, verifier work). The gain is the expected-utility test of "Can language
   models teach?" (Saha et al., 2023), with the teacher's answer standing in for the gold one, which a run never
   reads;
3. the explanation with the largest gain is put in the prompt when the gain exceeds ``threshold`` (nats); otherwise
   the student answers alone.

Everything -- the explanations and the simulation -- is charged to the run's one budget, so a program with a
teacher runs at the same budget as one without. ``Result.info["trace"]`` shows the stage; ``ctx.notes["teach"]``
(the stage's decision: gain, whether it intervened) is in the result's ``teach`` info.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..backend import Candidate, derive_seed
from ...answers import extract_answer
from .stages import Context, Stage, _register, ask, place_text

TEACH_TEMPLATE = ("Question: {question}\n\nExplain to a student, in at most three short lines, how to solve this "
                  "question. End with the line: Answer: <the answer>.")
TEACHER_HEADER = "A teacher's explanation:"


@_register
@dataclass
class TeachStage(Stage):
    """A teacher's explanation before the answer, when simulating the student says it helps (budget: explanations)."""

    type: ClassVar[str] = "teach"
    kind: ClassVar[str] = "prompt"
    model: str = ""  # the teacher
    student: str = ""
    explanations: int = 1
    threshold: float = 0.0
    max_tokens: int = 96
    temperature: float = 0.7  # when the teacher writes more than one explanation
    where: str = "after"
    CHOICES: ClassVar[dict] = {"where": ("before", "after")}
    BOUNDS: ClassVar[dict] = {"explanations": (1, 8), "max_tokens": (1, 1024), "temperature": (0.0, None)}

    def models(self) -> tuple[str, ...]:
        return self.model, self.student

    def run(self, ctx: Context, cands: list[Candidate]) -> list[Candidate]:
        decision = {"explanations": 0, "gain": None, "intervened": False}
        ctx.notes["teach"] = decision
        if ctx.budget.exhausted:
            return cands
        teacher, student = ctx.backend_for(self.model), ctx.backend_for(self.student)
        texts = ask(teacher, TEACH_TEMPLATE.format(question=ctx.question), ctx.budget, n=self.explanations,
                    max_tokens=self.max_tokens, temperature=self.temperature if self.explanations > 1 else 0.0,
                    seed=derive_seed(ctx.seed, "teach"))
        read = ctx.answer_fn or extract_answer
        shown = [(t, read(t)) for t in texts]
        shown = [(t, str(a).strip()) for t, a in shown if a is not None and str(a).strip()]
        decision["explanations"] = len(texts)
        if not shown:
            return cands
        options = list(dict.fromkeys(a for _, a in shown))
        contexts = [ctx.prompt] + [self.explained(ctx.prompt, t) for t, _ in shown]
        lp = student.choice_logprobs(contexts, options, ctx.budget)
        gains = [lp[i + 1][options.index(a)] - lp[0][options.index(a)] for i, (_, a) in enumerate(shown)]
        gains = [(g, i) for i, g in enumerate(gains) if g == g]  # NaN: a pass the budget could not pay for
        if not gains:
            return cands
        gain, i = max(gains)
        decision.update(gain=round(gain, 4), answer=shown[i][1])
        if gain > self.threshold:
            ctx.prompt = self.explained(ctx.prompt, shown[i][0])
            decision["intervened"] = True
        return cands

    def explained(self, prompt: str, explanation: str) -> str:
        return place_text(prompt, f"{TEACHER_HEADER}\n{explanation}", self.where)


__all__ = ["TEACH_TEMPLATE", "TeachStage"]
