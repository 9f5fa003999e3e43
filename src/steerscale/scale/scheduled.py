"""``ScheduledBackend``: the ``LocalBackend`` a server's strategy request runs on, with its model work on the server's
engine loop.

``sample`` becomes a job of the loop (``loop.sample(...)``), batched with every other request's rows and paid from
the request's budget; everything else that runs the model (step-wise search, self-evaluation, embeddings,
teacher-forced scoring) goes to the loop's thread between two decoding steps (``loop.call(fn)``), so one thread owns
the model, on the loop's standing hooks (``loop.hooks``). The loop is any object with those two methods and those
hooks (``serve.scheduler.Scheduler``); this module does not import the server. ``cancel()`` (the client went away)
ends running samples and refuses further work.
"""

from __future__ import annotations

import dataclasses

from ..engine.prompt_rules import PromptRule
from ..errors import SteerscaleError
from .backend import Candidate, FinishReason
from .local import LocalBackend


def split_steer(steer) -> tuple[list, list[PromptRule]]:
    """A request's steering entries (``(vector, op, scope[, gate])`` and prompt rules) as a ``LocalBackend`` takes
    them: the entries' interventions (a gated entry's each waiting on its ``TokenGate``), and the prompt rules (CAST,
    controllers), whose edits the backend runs after the others."""
    ivs = [dataclasses.replace(iv, gate=e[3]) if len(e) > 3 and e[3] is not None else iv
           for e in steer if not isinstance(e, PromptRule) for iv in e[0].interventions(e[1], e[2])]
    return ivs, [e for e in steer if isinstance(e, PromptRule)]


class ScheduledBackend(LocalBackend):
    """``ScheduledBackend(loop, steer, **LocalBackend options)``: ``steer`` is the request's entries as the loop's
    jobs take them."""

    def __init__(self, loop, steer, **kwargs):
        ivs, rules = split_steer(steer)
        # its passes run on the loop's thread (``_on_loop``), so on the loop's standing hooks
        super().__init__(loop.model, loop.tokenizer, loop.layout, steering=ivs, rules=rules, hooks=loop.hooks,
                         **kwargs)
        self.loop, self.steer = loop, steer
        self._jobs: list = []
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        for job in list(self._jobs):
            job.cancel()

    def _check(self) -> None:
        if self.cancelled:
            raise SteerscaleError("the request was cancelled")

    def _on_loop(self, fn, *args, **kwargs):
        self._check()
        return self.loop.call(lambda: fn(*args, **kwargs)).result()

    def sample(self, prompt, n, params, budget, *, seed=None) -> list[Candidate]:
        self.check_n(n)
        self._check()
        ids = self.prompt_ids(prompt)
        passes = 2 if self.rules else 1  # conditional steering reads the prompt once more (as LocalBackend charges)
        if not all(budget.buy_prompt(len(ids), 1, self.n_params) for _ in range(passes)):
            return [Candidate(finished=True, finish_reason=FinishReason.BUDGET) for _ in range(n)]
        job = self.loop.sample(ids, self.with_block(params), seed=seed, steer=self.steer, n=n, budget=budget, n_params=self.n_params,
                               logit_contrast=self.logit_contrast)
        self._jobs.append(job)
        try:
            return job.future.result()
        finally:
            self._jobs.remove(job)

    def start(self, prompt, n, budget, *, seed=None):
        return self._on_loop(super().start, prompt, n, budget, seed=seed)

    def extend(self, branches, params, budget):
        return self._on_loop(super().extend, branches, params, budget)

    def choice_logprobs(self, contexts, options, budget):
        return self._on_loop(super().choice_logprobs, contexts, options, budget)

    def embed(self, texts, budget, *, layer=-1):
        return self._on_loop(super().embed, texts, budget, layer=layer)

    def token_logprobs(self, ids, k=0, prompt_width=None):
        return self._on_loop(super().token_logprobs, ids, k, prompt_width)
