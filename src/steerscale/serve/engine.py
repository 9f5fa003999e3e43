"""The server's model work. One engine loop owns the model (``serve.scheduler.Scheduler``): plain generations
are jobs it batches with every other request's, each row with its own steering, sampling parameters and seed;
other model work (a strategy run, the teacher-forced pass behind ``logprobs``/``echo``) runs on the same thread
between two decoding steps (``Scheduler.call``), through ``LocalBackend``'s public methods only. A request's
steering lives in its own rows' edits (or its own ``LocalBackend``), so it cannot reach another request's;
``intervene`` removes the hooks even when a forward pass fails.

Completions take the prompt as raw text (no chat template), as OpenAI and vLLM do; chat completions apply the
model's chat template. ``add_special_tokens`` (vLLM's extension) says whether BOS/EOS are added when encoding.
"""

from __future__ import annotations

import threading

from ..errors import SteerscaleError
from ..scale.backend import FinishReason
from ..scale.local import LocalBackend
from ..scale.strategies.base import Result
from .responses import Choice, matched_stop
from .scheduler import Job, Scheduler
from .schema import GenRequest


class SharedTokenizer:
    """The tokenizer, with its calls serialised: HTTP threads encode prompts and decode tokens while the engine
    thread encodes for strategies, and a fast (Rust) tokenizer raises "Already borrowed" when one thread changes
    its padding settings while another uses it. Attributes pass through."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._lock = threading.RLock()

    def __getattr__(self, name):
        value = getattr(self._tokenizer, name)
        if not callable(value):
            return value

        def locked(*args, **kwargs):
            with self._lock:
                return value(*args, **kwargs)

        return locked

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer(*args, **kwargs)


class Engine:
    """One model, its registered steering vectors, the engine loop, and the generation a request asks for."""

    def __init__(self, model, tokenizer, layout, vectors: dict, max_n: int, max_batch: int = 16):
        self.model, self.tokenizer, self.layout, self.vectors, self.max_n = model, tokenizer, layout, vectors, max_n
        self.base = self.backend([], add_special_tokens=True)  # encoding and decoding, no steering
        self.scheduler = Scheduler(model, tokenizer, layout, max_batch=max_batch).start()

    def close(self) -> None:
        """Stop the engine loop; requests still running end with an error."""
        self.scheduler.stop()

    def backend(self, steer, *, add_special_tokens: bool, chat: bool | None = False) -> LocalBackend:
        """A backend for one request: its own steering, nothing shared with other requests."""
        ivs = [iv for name, scale in steer for iv in self.vectors[name].interventions(scale)]
        return LocalBackend(self.model, self.tokenizer, self.layout, steering=ivs, chat=chat, max_n=self.max_n,
                            add_special_tokens=add_special_tokens)

    def generate(self, req: GenRequest, prompts: list[str]) -> tuple[list[Choice], dict]:
        """``n`` choices per prompt (echo-only: the prompt itself), with log-probs as requested; OpenAI's usage.
        Every prompt's ``n`` rows are one scheduler job (seeded alike, as vLLM seeds every prompt of a request)."""
        backend = self.backend(req.steer, add_special_tokens=req.add_special_tokens)
        steer = [(self.vectors[name], scale) for name, scale in req.steer]
        all_ids = [backend.prompt_ids(p) for p in prompts]  # raises past the context window, before any work
        jobs = [self.scheduler.submit(Job(ids, req.params(), seed=req.seed, steer=steer, n=req.n))
                if req.max_tokens else None for ids in all_ids]
        k = req.top_logprobs
        out, n_prompt, n_gen = [], 0, 0
        for prompt, ids, job in zip(prompts, all_ids, jobs):
            cands = job.result() if job is not None else [None] * req.n
            n_prompt += len(ids)
            n_gen += sum(len(c.token_ids) for c in cands if c is not None)
            for cand in cands:
                choice = Choice(prompt, ids, cand, None)
                if cand is not None and cand.finish_reason is FinishReason.STOP:
                    choice.stop_reason = matched_stop(backend.decode(cand.token_ids), cand.text, req.stop)
                if k is not None and (req.echo or k):  # prompt log-probs or top-k: one teacher-forced pass
                    full = ids + (cand.token_ids if cand is not None else [])
                    chosen, tops = self.scheduler.call(lambda: backend.token_logprobs(full, k or 0, len(ids))).result()
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
        return self.scheduler.call(lambda: req.strategy.run(prompt, backend)).result()
