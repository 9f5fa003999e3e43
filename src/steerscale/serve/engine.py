"""The server's model work: one request's generation (or strategy run) on the loaded model, through
``LocalBackend``'s public methods only. Every request gets a ``LocalBackend`` built for it alone, with that
request's steering, so one request's steering cannot reach another's; ``intervene`` removes the hooks even when
a forward pass fails. The caller (``App``) serialises model use.

Completions take the prompt as raw text (no chat template), as OpenAI and vLLM do; chat completions apply the
model's chat template. ``add_special_tokens`` (vLLM's extension) says whether BOS/EOS are added when encoding.
"""

from __future__ import annotations

from ..errors import SteerscaleError
from ..scale.backend import FinishReason
from ..scale.budget import Budget
from ..scale.local import LocalBackend
from ..scale.strategies.base import Result
from .responses import Choice, matched_stop
from .schema import GenRequest


class Engine:
    """One model, its registered steering vectors, and the generation a request asks for."""

    def __init__(self, model, tokenizer, layout, vectors: dict, max_n: int):
        self.model, self.tokenizer, self.layout, self.vectors, self.max_n = model, tokenizer, layout, vectors, max_n
        self.base = self.backend([], add_special_tokens=True)  # encoding and decoding, no steering

    def backend(self, steer, *, add_special_tokens: bool, chat: bool | None = False) -> LocalBackend:
        """A backend for one request: its own steering, nothing shared with other requests."""
        ivs = [iv for name, scale in steer for iv in self.vectors[name].interventions(scale)]
        return LocalBackend(self.model, self.tokenizer, self.layout, steering=ivs, chat=chat, max_n=self.max_n,
                            add_special_tokens=add_special_tokens)

    def generate(self, req: GenRequest, prompts: list[str]) -> tuple[list[Choice], dict]:
        """``n`` choices per prompt (echo-only: the prompt itself), with log-probs as requested; OpenAI's usage."""
        backend = self.backend(req.steer, add_special_tokens=req.add_special_tokens)
        k = req.top_logprobs
        out, n_prompt, n_gen = [], 0, 0
        for prompt in prompts:
            ids = backend.prompt_ids(prompt)  # the very ids sample() encodes; raises past the context window
            if req.max_tokens:
                budget = Budget()
                cands = backend.sample(prompt, req.n, req.params(), budget, seed=req.seed)
                n_prompt += budget.spent()["prompt_tokens"]
                n_gen += budget.spent()["generated_tokens"]
            else:
                cands = [None] * req.n
                n_prompt += len(ids)
            for cand in cands:
                choice = Choice(prompt, ids, cand, None)
                if cand is not None and cand.finish_reason is FinishReason.STOP:
                    choice.stop_reason = matched_stop(backend.decode(cand.token_ids), cand.text, req.stop)
                if k is not None and (req.echo or k):  # prompt log-probs or top-k: one teacher-forced pass
                    gen = cand.token_ids if cand is not None else []
                    chosen, tops = backend.token_logprobs(ids + gen, k or 0, len(ids))
                    cut = len(ids) - 1
                    choice.prompt_scores = (chosen[:cut], tops[:cut])
                    choice.gen_tops = tops[cut:]
                out.append(choice)
        return out, {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}

    def run_strategy(self, req: GenRequest, prompt: str, *, chat: bool) -> Result:
        """The request's strategy on ``prompt``; chat: the strategy formats the one user message with the chat
        template, as a local ``steerscale solve`` does."""
        if req.strategy is None:
            raise SteerscaleError("this request has no strategy")
        backend = self.backend(req.steer, add_special_tokens=True if chat else req.add_special_tokens,
                               chat=None if chat else False)
        return req.strategy.run(prompt, backend)
