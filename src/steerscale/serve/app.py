"""Request -> response logic of ``steerscale serve``: OpenAI's ``/v1/completions`` and ``/v1/chat/completions`` on
one loaded model, plus steerscale's per-request ``steer`` and ``strategy`` fields. See docs/serving.md.

``App.handle(method, path, body) -> (status, payload)`` is all the HTTP front end calls; it never raises.

* Every generation goes through a ``LocalBackend`` built for that request alone, with that request's steering
  interventions, so one request's steering cannot reach another's; ``intervene`` removes the hooks even when a
  forward pass fails. One lock serialises all model (and tokenizer) use.
* Completions take the prompt as raw text (no chat template), as OpenAI and vLLM do; chat completions apply the
  model's chat template. ``add_special_tokens`` (vLLM's extension) says whether BOS/EOS are added when encoding.
* Log-probs are the model's own (temperature 1) log-probs of each token, as ``LocalBackend`` reports them;
  ``top_logprobs`` and echoed prompt log-probs come from one extra teacher-forced pass of prompt + completion under
  the same steering. ``text_offset`` is each token's start in the returned text (vLLM: counted from 0).
* ``finish_reason`` is ``stop`` (EOS or a stop string) or ``length``; ``stop_reason`` (vLLM's field) names the
  stop string that ended the text, or is null (EOS, length).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.generation import has_chat_template
from ..engine.runtime import intervene
from ..errors import SteerscaleError
from ..scale.backend import Candidate, SamplingParams
from ..scale.budget import Budget
from ..scale.local import LocalBackend

log = logging.getLogger("steerscale.serve")

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM clamps to the same value
MAX_STOPS = 16
VECTOR_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
# OpenAI fields we accept but cannot honour: rejected when set to anything but their no-op value, never ignored
UNSUPPORTED = {"stream": (False,), "suffix": ("",), "logit_bias": ({},), "presence_penalty": (0, 0.0),
               "frequency_penalty": (0, 0.0), "best_of": (1,), "tools": ([],)}
STRATEGY_FIELDS = ("name", "verifier", "verifier_opts", "reference", "budget")
REQUEST_KNOBS = ("max_tokens", "temperature", "top_p", "stop", "seed")  # request fields a strategy inherits


class ApiError(Exception):
    """An error the client sees: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, param=param)


# -- reading request fields ------------------------------------------------------------------------------------
_KINDS = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "number": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "bool": ("a boolean", lambda v: isinstance(v, bool)),
    "list": ("an array", lambda v: isinstance(v, list)),
    "dict": ("an object", lambda v: isinstance(v, dict)),
}


def read(body: dict, key: str, kind: str, default=None):
    """``body[key]`` if it has JSON type ``kind``; absent or null: ``default``; any other type: a 400."""
    value = body.get(key)
    if value is None:
        return default
    what, ok = _KINDS[kind]
    if not ok(value):
        raise bad(key, f"'{key}' must be {what}, got {json.dumps(value)[:60]}")
    return value


def read_int(body, key, default, low, high=None):
    value = read(body, key, "int", default)
    if value is not None and (value < low or (high is not None and value > high)):
        rng = f">= {low}" if high is None else f"between {low} and {high}"
        raise bad(key, f"'{key}' must be {rng}, got {value}")
    return value


def read_number(body, key, default, low, high=None, *, open_low=False):
    value = read(body, key, "number", default)
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value) or value < low or (open_low and value == low) or (high is not None and value > high):
        rng = f"{'>' if open_low else '>='} {low}" + ("" if high is None else f" and <= {high}")
        raise bad(key, f"'{key}' must be a finite number {rng}, got {value}")
    return value


def read_stop(body) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "'stop' must be a string or an array of strings")
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise bad("stop", f"'stop' takes 1 to {MAX_STOPS} non-empty strings")
    return tuple(stops)


def check_unsupported(body: dict) -> None:
    for key, noop in UNSUPPORTED.items():
        if key in body and body[key] is not None and body[key] not in noop:
            raise bad(key, f"'{key}' is not supported by steerscale serve")


@dataclass
class GenRequest:
    """A validated completions / chat completions request (one or more prompts, not yet chat-formatted)."""

    prompts: list  # completions: raw texts; chat: one list of messages
    max_tokens: int  # 0: score the prompt only (echo)
    temperature: float
    top_p: float
    n: int
    stop: tuple[str, ...]
    seed: int | None
    top_logprobs: int | None  # None: no log-probs; k: the k most likely tokens at each position
    echo: bool
    add_special_tokens: bool
    steer: list[tuple[str, float]]
    strategy: dict | None
    given: frozenset  # fields the client set (a strategy inherits those, and only those)

    def params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              stop=self.stop, step=None)


def read_steer(body: dict, vectors: dict) -> list[tuple[str, float]]:
    steer = read(body, "steer", "list", [])
    out = []
    for item in steer:
        if not isinstance(item, dict) or set(item) - {"vector", "scale"} or not isinstance(item.get("vector"), str):
            raise bad("steer", 'each steer entry is {"vector": NAME, "scale": NUMBER}')
        name = item["vector"]
        if name not in vectors:
            known = ", ".join(sorted(vectors)) or "(none: start the server with --vector NAME=PATH)"
            raise bad("steer", f"unknown steering vector {name!r}; this server has: {known}")
        scale = read_number(item, "scale", 1.0, -math.inf)
        out.append((name, scale))
    return out


def read_common(body: dict, *, max_n: int, vectors: dict, default_max_tokens: int, max_tokens_key: str) -> dict:
    check_unsupported(body)
    max_tokens = read_int(body, max_tokens_key, None, 0)
    if max_tokens is None:
        max_tokens = read_int(body, "max_tokens", default_max_tokens, 0)
    seed = read_int(body, "seed", None, 0, 2**63 - 1)
    strategy = read(body, "strategy", "dict")
    if strategy is not None and not isinstance(strategy.get("name"), str):
        raise bad("strategy", "'strategy' needs a \"name\" (e.g. best_of_n, majority, beam_search)")
    return dict(max_tokens=max_tokens, temperature=read_number(body, "temperature", 1.0, 0.0),
                top_p=read_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True), n=read_int(body, "n", 1, 1, max_n),
                stop=read_stop(body), seed=seed, steer=read_steer(body, vectors), strategy=strategy,
                given=frozenset(k for k, v in body.items() if v is not None))


def parse_completion(body: dict, *, max_n: int, vectors: dict) -> GenRequest:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise bad("prompt", "'prompt' must be a string or a non-empty array of strings (token-id prompts are not "
                            "supported)")
    if len(prompts) > max_n:
        raise bad("prompt", f"{len(prompts)} prompts in one request; this server takes at most {max_n}")
    common = read_common(body, max_n=max_n, vectors=vectors, default_max_tokens=16, max_tokens_key="max_tokens")
    if len(prompts) * common["n"] > max_n:
        raise bad("n", f"{len(prompts)} prompts x n={common['n']} choices; this server returns at most {max_n}")
    echo = read(body, "echo", "bool", False)
    k = read_int(body, "logprobs", None, 0, MAX_LOGPROBS)
    if common["max_tokens"] == 0 and not echo:
        raise bad("max_tokens", "'max_tokens' must be >= 1 (0 only with echo, to score the prompt)")
    if common["strategy"] is not None and (len(prompts) != 1 or common["n"] != 1 or echo or k is not None):
        raise bad("strategy", "a strategy answers one prompt with one choice: drop n, echo and logprobs, and put the "
                              "strategy's own n inside \"strategy\"")
    return GenRequest(prompts, top_logprobs=k, echo=echo,
                      add_special_tokens=read(body, "add_special_tokens", "bool", True), **common)


def read_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty array of {\"role\", \"content\"} objects")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise bad("messages", "each message needs a role: system, user or assistant")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad("messages", "only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad("messages", "message content must be a string (or text parts)")
        out.append({"role": m["role"], "content": content})
    return out


def parse_chat(body: dict, *, max_n: int, vectors: dict) -> GenRequest:
    messages = read_messages(body)
    common = read_common(body, max_n=max_n, vectors=vectors, default_max_tokens=256,
                         max_tokens_key="max_completion_tokens")
    if common["max_tokens"] == 0:
        raise bad("max_tokens", "'max_tokens' must be >= 1")
    want = read(body, "logprobs", "bool", False)
    k = read_int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if k is not None and not want:
        raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    if common["strategy"] is not None:
        if common["n"] != 1 or want:
            raise bad("strategy", "a strategy answers with one choice: drop n and logprobs (the strategy's own n goes "
                                  "inside \"strategy\")")
        if len(messages) != 1 or messages[0]["role"] != "user":
            raise bad("messages", "with a strategy, send one user message (the strategy formats it with the chat "
                                  "template, as `steerscale solve` does)")
    return GenRequest([messages], top_logprobs=(k or 0) if want else None, echo=False,
                      add_special_tokens=read(body, "add_special_tokens", "bool", False), **common)


# -- generation -------------------------------------------------------------------------------------------------
class _NoSpecialTokens:
    """The tokenizer, minus BOS/EOS insertion: for text that is already formatted (a chat template, or a prompt
    the client formatted itself), exactly as ``LocalBackend`` encodes chat-formatted prompts."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        kwargs["add_special_tokens"] = False
        return self._tokenizer(*args, **kwargs)


@dataclass
class Choice:
    """One generated (or echoed) sequence, with what the response formats need."""

    prompt: str
    prompt_ids: list[int]
    cand: Candidate | None  # None: the prompt only (echo with max_tokens 0)
    stop_reason: str | None
    prompt_scores: tuple | None = None  # (log-probs of prompt tokens 1.., top-k per position) for echo
    gen_tops: list | None = None  # top-k per generated token


def matched_stop(full_text: str, kept: str, stops) -> str | None:
    """The stop string that cut ``full_text`` to ``kept`` (the longest one starting there, as the backend's
    earliest-match rule sees the longer one first when both end on the same token)."""
    hits = [s for s in stops if full_text.startswith(s, len(kept))]
    return max(hits, key=len) if hits else None


@torch.no_grad()
def teacher_forced(backend: LocalBackend, ids: list[int], k: int, prompt_width: int):
    """Log-prob of tokens 1.. of ``ids`` and the ``k`` most likely tokens at each of those positions, in one
    forward pass under the backend's steering."""
    x = torch.tensor([ids], device=backend.device)
    ivs = backend.steering
    with intervene(backend.layout, ivs, prompt_width=prompt_width) if ivs else contextlib.nullcontext():
        logits = backend.model(input_ids=x, use_cache=False).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1)
    chosen = logp.gather(-1, x[0, 1:, None])[:, 0].tolist()
    if not k:
        return chosen, [[] for _ in chosen]
    vals, idx = logp.topk(min(k, logp.shape[-1]), -1)
    return chosen, [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]


def finish_reason(cand: Candidate) -> str:
    return "stop" if cand.finish_reason in ("eos", "stop") else "length"


def clamp(lp):
    """A JSON-safe log-prob: -inf (and NaN) become ``LOGPROB_FLOOR``."""
    if lp is None:
        return None
    lp = float(lp)
    return lp if math.isfinite(lp) and lp > LOGPROB_FLOOR else LOGPROB_FLOOR


# -- the app ----------------------------------------------------------------------------------------------------
class App:
    """The server's state: one model, its registered steering vectors, one lock."""

    def __init__(self, model, tokenizer, layout, *, model_id: str, vectors: dict | None = None, max_n: int = 64):
        if not isinstance(max_n, int) or max_n < 1:
            raise SteerscaleError(f"max_n must be a positive integer, got {max_n!r}")
        if not isinstance(model_id, str) or not model_id:
            raise SteerscaleError("the served model needs a non-empty id")
        self.vectors = dict(vectors or {})
        for name, vec in self.vectors.items():
            if not VECTOR_NAME.fullmatch(name):
                raise SteerscaleError(f"bad vector name {name!r}", "use letters, digits, '_', '.' and '-'")
            vec.check_compatible(layout)  # a vector for another model fails here, not in a request
        self.model, self.tokenizer, self.layout, self.model_id, self.max_n = model, tokenizer, layout, model_id, max_n
        self.base = self.backend([], add_special_tokens=True)  # decoding and encoding helpers, no steering
        self.created = int(time.time())
        self.lock = threading.Lock()

    # -- routing ----------------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
        try:
            route = ROUTES.get(path.split("?", 1)[0].rstrip("/") or "/")
            if route is None:
                raise ApiError(404, f"no route {method} {path}; see /v1/models, /v1/completions, /v1/chat/completions",
                               type="not_found_error", code="not_found")
            want, name = route
            if method != want:
                raise ApiError(405, f"{path} takes {want}, not {method}", code="method_not_allowed")
            endpoint = getattr(self, name)
            return 200, endpoint(parse_json(body)) if want == "POST" else endpoint()
        except ApiError as exc:
            return exc.status, exc.body()
        except SteerscaleError as exc:
            msg = exc.problem + (f" (hint: {exc.hint})" if exc.hint else "")
            return 400, ApiError(400, msg).body()
        except Exception:  # a bug or a failed forward pass: the client gets no traceback, the log does
            log.exception("internal error on %s %s", method, path)
            return 500, ApiError(500, "internal server error (details are in the server log)", type="server_error",
                                 code="internal_error").body()

    def check_model(self, body: dict) -> None:
        name = read(body, "model", "str")
        if name is not None and name != self.model_id:
            raise ApiError(404, f"model {name!r} is not served here; this server serves {self.model_id!r}",
                           param="model", type="not_found_error", code="model_not_found")

    def backend(self, steer, *, add_special_tokens: bool, chat: bool | None = False) -> LocalBackend:
        """A backend for one request: its own steering, nothing shared with other requests."""
        ivs = [iv for name, scale in steer for iv in self.vectors[name].interventions(scale)]
        tok = self.tokenizer if add_special_tokens else _NoSpecialTokens(self.tokenizer)
        return LocalBackend(self.model, tok, self.layout, steering=ivs, chat=chat, max_n=self.max_n)

    # -- endpoints --------------------------------------------------------------------------------------------
    def health(self) -> dict:
        return {"status": "ok"}

    def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": self.created, "owned_by": "steerscale",
            "max_model_len": self.base.context_window,
            "steerscale": {"vectors": sorted(self.vectors), "max_n": self.max_n}}]}

    def completions(self, body: dict) -> dict:
        self.check_model(body)
        req = parse_completion(body, max_n=self.max_n, vectors=self.vectors)
        with self.lock:
            if req.strategy is not None:
                return self.strategy_response(req, req.prompts[0], chat=False)
            choices, usage = self.generate(req, req.prompts)
            out = [self.completion_choice(i, c, req) for i, c in enumerate(choices)]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_id, "choices": out, "usage": usage}

    def chat_completions(self, body: dict) -> dict:
        self.check_model(body)
        req = parse_chat(body, max_n=self.max_n, vectors=self.vectors)
        with self.lock:
            if req.strategy is not None:
                return self.strategy_response(req, req.prompts[0][0]["content"], chat=True)
            choices, usage = self.generate(req, [self.chat_text(req.prompts[0])])
            out = [self.chat_choice(i, c, req) for i, c in enumerate(choices)]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_id, "choices": out, "usage": usage}

    def chat_text(self, messages: list[dict]) -> str:
        if not has_chat_template(self.tokenizer):
            raise bad("messages", f"{self.model_id} has no chat template; use /v1/completions with a raw prompt")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja templates raise their own errors (e.g. no system role)
            raise bad("messages", f"the chat template rejected these messages: {exc}") from None

    # -- generation -------------------------------------------------------------------------------------------
    def generate(self, req: GenRequest, prompts: list[str]) -> tuple[list[Choice], dict]:
        """``n`` choices per prompt (echo-only: the prompt itself), with log-probs as requested; OpenAI's usage."""
        backend = self.backend(req.steer, add_special_tokens=req.add_special_tokens)
        k = req.top_logprobs
        out, n_prompt, n_gen = [], 0, 0
        for prompt in prompts:
            ids = backend._prompt_ids(prompt)  # the very ids sample() encodes; raises past the context window
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
                if cand is not None and cand.finish_reason == "stop":
                    choice.stop_reason = matched_stop(backend._decode(cand.token_ids), cand.text, req.stop)
                if k is not None and (req.echo or k):  # prompt log-probs or top-k: one teacher-forced pass
                    gen = cand.token_ids if cand is not None else []
                    chosen, tops = teacher_forced(backend, ids + gen, k or 0, len(ids))
                    cut = len(ids) - 1
                    choice.prompt_scores = (chosen[:cut], tops[:cut])
                    choice.gen_tops = tops[cut:]
                out.append(choice)
        return out, {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}

    def token_str(self, tid: int) -> str:
        return self.tokenizer.decode([tid], skip_special_tokens=False)

    def offsets(self, ids: list[int], base: int = 0) -> list[int]:
        """Start of each token in the decoded text (a prefix decode, so merged pieces and special tokens count
        exactly as in the returned text)."""
        return [base + len(self.base._decode(ids[:i])) for i in range(len(ids))]

    def token_rows(self, c: Choice, req: GenRequest):
        """(token id, log-prob, top-k list) for each returned token: echoed prompt tokens first (the first has no
        log-prob), then the generated ones."""
        rows = []
        if req.echo:
            lps, tops = c.prompt_scores
            rows += [(c.prompt_ids[0], None, None)]
            rows += [(t, lp, top) for t, lp, top in zip(c.prompt_ids[1:], lps, tops)]
        if c.cand is not None:
            tops = c.gen_tops if c.gen_tops is not None else [[] for _ in c.cand.token_ids]
            rows += list(zip(c.cand.token_ids, c.cand.logprobs, tops))
        return rows

    def completion_choice(self, index: int, c: Choice, req: GenRequest) -> dict:
        text = c.cand.text if c.cand is not None else ""
        logprobs = None
        if req.top_logprobs is not None:
            gen_ids = c.cand.token_ids if c.cand is not None else []
            offs = self.offsets(gen_ids, len(c.prompt) if req.echo else 0)
            if req.echo:
                offs = self.offsets(c.prompt_ids) + offs
            rows = self.token_rows(c, req)
            tokens = [self.token_str(t) for t, _, _ in rows]
            top = []
            for tok, (t, lp, alts) in zip(tokens, rows):
                if lp is None:
                    top.append(None)
                    continue
                entry = {self.token_str(a): clamp(v) for a, v in alts}
                entry.setdefault(tok, clamp(lp))  # OpenAI: the sampled token is always listed
                top.append(entry)
            logprobs = {"tokens": tokens, "token_logprobs": [clamp(lp) for _, lp, _ in rows], "top_logprobs": top,
                        "text_offset": offs}
        if req.echo:
            text = c.prompt + text
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": finish_reason(c.cand) if c.cand is not None else "length",
                "stop_reason": c.stop_reason}

    def chat_choice(self, index: int, c: Choice, req: GenRequest) -> dict:
        logprobs = None
        if req.top_logprobs is not None:
            def item(t, lp):
                s = self.token_str(t)
                return {"token": s, "logprob": clamp(lp), "bytes": list(s.encode())}

            logprobs = {"content": [{**item(t, lp), "top_logprobs": [item(a, v) for a, v in alts]}
                                    for t, lp, alts in self.token_rows(c, req)]}
        return {"index": index, "message": {"role": "assistant", "content": c.cand.text}, "logprobs": logprobs,
                "finish_reason": finish_reason(c.cand), "stop_reason": c.stop_reason}

    # -- strategies -------------------------------------------------------------------------------------------
    def strategy_response(self, req: GenRequest, prompt: str, *, chat: bool) -> dict:
        from ..scale.strategies import run_strategy
        from ..scale.verifiers import get_verifier

        spec = req.strategy
        name = spec["name"]
        knobs = strategy_knobs(name, {k: v for k, v in spec.items() if k not in STRATEGY_FIELDS})
        for key in REQUEST_KNOBS:
            if key in req.given:
                knobs.setdefault(key, list(req.stop) if key == "stop" else getattr(req, key))
        verifier_name = read(spec, "verifier", "str")
        vopts = read(spec, "verifier_opts", "dict", {})
        budget_spec = spec.get("budget")
        if isinstance(budget_spec, dict):
            budget = Budget(budget_spec)
        elif budget_spec is None or isinstance(budget_spec, str):
            budget = Budget.parse(budget_spec)
        else:
            raise bad("strategy", 'strategy "budget" is a string such as "tokens=2000" or an object {"tokens": 2000}')
        # chat: the strategy formats the one user message with the chat template, as a local `solve` does
        backend = self.backend(req.steer, add_special_tokens=True if chat else req.add_special_tokens,
                               chat=None if chat else False)
        verifier = get_verifier(verifier_name, reference=spec.get("reference"), backend=backend, **vopts)
        result = run_strategy(name, prompt, backend, verifier, budget, **knobs)
        best = result.best
        spent = result.budget["spent"]
        text = best.text if best is not None else ""
        finish = finish_reason(best) if best is not None else "length"
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": finish, "stop_reason": None} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None})
        usage = {"prompt_tokens": spent["prompt_tokens"], "completion_tokens": spent["generated_tokens"],
                 "total_tokens": spent["prompt_tokens"] + spent["generated_tokens"]}
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_id, "choices": [choice], "usage": usage,
                "steerscale": {"strategy": result.strategy, "answer": result.answer, "budget": result.budget,
                               "failures": result.failures, "info": result.info,
                               "n_candidates": len(result.candidates)}}


def strategy_knobs(name: str, knobs: dict) -> dict:
    """``knobs`` checked against what strategy ``name`` takes (its keyword arguments and the sampling knobs):
    a typo is a 400, not a silently ignored setting."""
    from ..scale.strategies import get_strategy
    from ..scale.strategies.base import sampling_params

    fn = get_strategy(name)  # unknown name: SteerscaleError listing the strategies
    accepted = {p.name for f in (fn, sampling_params) for p in inspect.signature(f).parameters.values()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    accepted -= {"prompt", "backend", "verifier", "budget", "answer_fn"}  # answer_fn is code, not JSON
    unknown = sorted(set(knobs) - accepted)
    if unknown:
        raise bad("strategy", f"strategy {name!r} has no knob {', '.join(map(repr, unknown))}; its knobs: "
                              f"{', '.join(sorted(accepted))}")
    for key, value in knobs.items():
        scalars = (str, int, float, bool, type(None))
        if not isinstance(value, scalars) and not (isinstance(value, list)
                                                   and all(isinstance(v, scalars) for v in value)):
            raise bad("strategy", f"strategy knob {key!r} must be a number, string, boolean or an array of them")
    if "stop" in knobs and isinstance(knobs["stop"], str):
        knobs["stop"] = [knobs["stop"]]
    return dict(knobs)


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body.decode("utf-8") if body else "")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(None, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise bad(None, "the request body must be a JSON object")
    return data


def _plain(obj: Any):
    """JSON-safe copy: NaN/inf become null (JSON has neither), numpy scalars become numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return _plain(obj.item())
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def to_json(payload: dict) -> bytes:
    return json.dumps(_plain(payload), allow_nan=False).encode()


ROUTES = {  # path -> (method, App method name)
    "/health": ("GET", "health"),
    "/v1/models": ("GET", "models"),
    "/v1/completions": ("POST", "completions"),
    "/v1/chat/completions": ("POST", "chat_completions"),
}
