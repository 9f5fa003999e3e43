"""The server's model work. One engine loop owns the model (``serve.scheduler.Scheduler``): generations are jobs it
batches with every other request's, each row with its own steering, sampling parameters and seed. A strategy
request runs its strategy on a worker thread against a ``ScheduledBackend``, whose ``sample`` calls are jobs too
(so a strategy's N samples share forward passes with other users' rows, paid from that request's budget); its
other model work (step-wise search, scoring) and the teacher-forced pass behind ``logprobs``/``echo`` run on the
engine thread between two decoding steps (``Scheduler.call``). A request's steering lives in its own rows' edits
(or its own backend), so it cannot reach another request's; ``intervene`` removes hooks even when a pass fails.

Completions take the prompt as raw text (no chat template) or token ids, as OpenAI and vLLM do; chat completions
apply the model's chat template. ``add_special_tokens`` (vLLM's extension) says whether BOS/EOS are added.
"""

from __future__ import annotations

import threading
from functools import partial

import torch

from ..engine.capture import Batch
from ..engine.decoding import TokenRules, score_tokens
from ..engine.generation import has_chat_template
from ..engine.logit_contrast import check_layout
from ..engine.prompt_rules import prompt_interventions
from ..errors import SteerscaleError
from ..scale.backend import Candidate, FinishReason
from ..scale.scheduled import ScheduledBackend, split_steer
from ..scale.strategies.base import Result
from .responses import Choice, matched_stop
from .scheduler import Job, Scheduler
from .schema import GenRequest, bad

DEFAULT_MAX_TOKENS = {"completions": 16, "chat": 256}  # OpenAI's completions default; chat: cut to the context


class SharedTokenizer:
    """The tokenizer, with its calls serialised: request threads encode prompts and decode tokens while the engine
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

    def __len__(self) -> int:
        return len(self._tokenizer)


class Engine:
    """One model, its registered steering vectors, the engine loop, and the work a request asks for. Methods that
    block (``encode``, ``finish``, ``run_strategy``) are called from worker threads, never the event loop."""

    def __init__(self, model, tokenizer, layout, vectors: dict, max_n: int, max_batch: int = 16,
                 max_tokens_limit: int = 4096):
        self.model, self.tokenizer, self.layout, self.vectors, self.max_n = model, tokenizer, layout, vectors, max_n
        self.max_tokens_limit = max_tokens_limit
        self.tokens = TokenRules(model, tokenizer)  # the decoding core's EOS set, context window and decode
        self.vocab_size = int(getattr(getattr(model, "config", None), "vocab_size", 0) or len(tokenizer))
        # the loop hooks the registered vectors' sites once, at start (a vector registered later: at its first use)
        sites = {site for v in vectors.values() for site in getattr(v, "directions", {})}
        self.scheduler = Scheduler(model, tokenizer, layout, max_batch=max_batch, sites=sorted(sites, key=str)).start()

    def close(self) -> None:
        """Stop the engine loop; requests still running end with an error."""
        self.scheduler.stop()

    # -- prompts ----------------------------------------------------------------------------------------------
    def chat_text(self, messages: list[dict]) -> str:
        if not has_chat_template(self.tokenizer):
            raise bad("messages", "this model has no chat template; use /v1/completions with a raw prompt")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja templates raise their own errors (e.g. no system role)
            raise bad("messages", f"the chat template rejected these messages: {exc}") from None

    def encode(self, req: GenRequest, *, chat: bool) -> tuple[list[str], list[list[int]], int]:
        """Each prompt's text and token ids, and the ``max_tokens`` every choice gets: the request's (a 400 when the
        prompt and it do not fit the context window, or it passes the server's cap) or the endpoint's default cut
        to the room left."""
        texts, all_ids = [], []
        for p in req.prompts:
            if chat:
                text = self.chat_text(p)
                ids = self._ids(text, add_special_tokens=req.add_special_tokens)
            elif isinstance(p, str):
                text, ids = p, self._ids(p, add_special_tokens=req.add_special_tokens)
            else:
                if max(p) >= self.vocab_size:
                    raise bad("prompt", f"token id {max(p)} is past the vocabulary (size {self.vocab_size})")
                text, ids = self.tokenizer.decode(p), list(p)
            texts.append(text)
            all_ids.append(ids)
        bias = req.sampling.get("logit_bias", ())
        if bias and max(t for t, _ in bias) >= self.vocab_size:
            raise bad("logit_bias", f"token id {max(t for t, _ in bias)} is past the vocabulary "
                                    f"(size {self.vocab_size})")
        if req.logit_contrast is not None:
            try:
                check_layout(self.layout, req.logit_contrast)
            except SteerscaleError as exc:
                raise bad("logit_contrast", exc.problem + (f" ({exc.hint})" if exc.hint else "")) from None
        longest = max(len(ids) for ids in all_ids)
        window = self.tokens.context_window
        room = window - longest - 1 if window else None  # the scheduler stops a row one short of the window
        if room is not None and room < 1:
            raise bad("prompt" if not chat else "messages",
                      f"the prompt is {longest} tokens but the model's context window is {window}; shorten it")
        if req.max_tokens is None or req.max_tokens == 0:
            default = DEFAULT_MAX_TOKENS["chat" if chat else "completions"]
            max_tokens = req.max_tokens if req.max_tokens == 0 else min(default, room or default,
                                                                        self.max_tokens_limit)
        else:
            max_tokens = req.max_tokens
            if max_tokens > self.max_tokens_limit:
                raise bad("max_tokens", f"max_tokens={max_tokens} is over this server's limit of "
                                        f"{self.max_tokens_limit} (steerscale serve --max-tokens-limit)")
            if room is not None and max_tokens > room:
                raise bad("max_tokens", f"the prompt ({longest} tokens) + max_tokens ({max_tokens}) exceed the "
                                        f"model's context window ({window}); ask for at most {room} tokens")
        return texts, all_ids, max_tokens

    def _ids(self, text: str, *, add_special_tokens: bool) -> list[int]:
        ids = self.tokenizer([text], return_tensors="pt", padding=False,
                             add_special_tokens=add_special_tokens)["input_ids"][0].tolist()
        if not ids:
            raise bad("prompt", "the prompt encodes to no tokens; send a non-empty prompt")
        return list(ids)

    # -- generation -------------------------------------------------------------------------------------------
    def submit(self, req: GenRequest, all_ids: list[list[int]], max_tokens: int, on_update=None) -> list[Job | None]:
        """One job per prompt (its ``n`` rows seeded alike, as vLLM seeds every prompt of a request); None where
        nothing is generated (echo with ``max_tokens`` 0)."""
        if not max_tokens:
            return [None] * len(all_ids)
        steer, params = req.steer, req.params(max_tokens)
        jobs = [Job(ids, params, seed=req.seed, steer=steer, n=req.n, on_update=on_update,
                    logit_contrast=req.logit_contrast) for ids in all_ids]
        submitted = []
        try:
            for job in jobs:
                self.scheduler.submit(job)
                submitted.append(job)
        except BaseException:
            for job in submitted:
                job.cancel()
            raise
        return jobs

    def finish(self, req: GenRequest, texts: list[str], all_ids: list[list[int]], jobs: list[Job | None]
               ) -> tuple[list[Choice], dict]:
        """The finished jobs as ``Choice``s (stop reasons, log-prob passes as the request asks) and OpenAI's usage."""
        k = req.top_logprobs
        out, n_prompt, n_gen = [], 0, 0
        for text, ids, job in zip(texts, all_ids, jobs):
            cands = job.future.result() if job is not None else [None] * req.n
            n_prompt += len(ids)
            n_gen += sum(len(c.token_ids) for c in cands if c is not None)
            for cand in cands:
                choice = Choice(text, ids, cand, self.stop_reason(cand, req) if cand is not None else None)
                if k is not None and (req.echo or k):  # prompt log-probs or top-k: one teacher-forced pass
                    full = ids + (cand.token_ids if cand is not None else [])
                    chosen, tops = self.scheduler.call(partial(self._score, req, full, k or 0, len(ids))).result()
                    cut = len(ids) - 1
                    choice.prompt_scores = (chosen[:cut], tops[:cut])
                    choice.gen_tops = tops[cut:]
                out.append(choice)
        return out, {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}

    def _score(self, req: GenRequest, ids: list[int], k: int, prompt_width: int):
        """Teacher-forced log-probs of ``ids`` under the request's steering (its prompt rules decided on the prompt)
        and logit contrast: the decoding core's ``score_tokens``, on the engine thread."""
        ivs, rules = split_steer(req.steer)
        if rules:
            x = torch.tensor([ids[:prompt_width]], device=self.scheduler.device)
            decided, _ = prompt_interventions(self.model, self.layout, rules, Batch(x, torch.ones_like(x)))
            ivs += decided
        return score_tokens(self.model, self.layout, ids, ivs, k=k, prompt_width=prompt_width,
                            logit_contrast=req.logit_contrast)

    def stop_reason(self, cand: Candidate, req: GenRequest) -> str | None:
        """The stop string that ended a finished ``cand`` (None: EOS, length, ...), appended to its text when the
        request asked for ``include_stop_str_in_output``. Idempotent."""
        if "stop_reason" not in cand.meta:
            stop = None
            if cand.finish_reason is FinishReason.STOP:
                stop = matched_stop(self.tokens.decode(cand.token_ids), cand.text, req.stop)
                if req.include_stop and stop:
                    cand.text += stop
            cand.meta["stop_reason"] = stop
        return cand.meta["stop_reason"]

    # -- strategies -------------------------------------------------------------------------------------------
    def strategy_backend(self, req: GenRequest, *, chat: bool) -> ScheduledBackend:
        """The backend a strategy request runs on: its steering, its samples batched by the engine loop; chat: the
        strategy formats the one user message with the chat template, as a local ``steerscale solve`` does."""
        return ScheduledBackend(self.scheduler, req.steer, chat=None if chat else False, max_n=self.max_n,
                                add_special_tokens=True if chat else req.add_special_tokens,
                                logit_contrast=req.logit_contrast, block=req.sampling.get("block"))

    @staticmethod
    def run_strategy(req: GenRequest, prompt: str, backend: ScheduledBackend) -> Result:
        if req.strategy is None:
            raise SteerscaleError("this request has no strategy")
        return req.strategy.run(prompt, backend)

