"""Where a request is parsed: OpenAI's ``/v1/completions`` and ``/v1/chat/completions`` bodies (and steerscale's
``steer`` and ``strategy`` extension fields) read into a checked ``GenRequest``, or an ``ApiError`` (a 4xx with
OpenAI's error object naming the field). Nothing here touches the model.

The ``strategy`` field becomes a ``StrategySpec`` here (``StrategySpec.from_json``), so an unknown strategy,
verifier or knob, a mistyped knob or a malformed budget is a 400 naming the field before any model work; the
request's ``max_tokens``, ``temperature``, ``top_p``, ``stop`` and ``seed`` are inherited by the knobs of those
names that the strategy takes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from ..errors import SteerscaleError
from ..scale.backend import SamplingParams
from ..scale.spec import StrategySpec

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
MAX_STOPS = 16
VECTOR_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
# OpenAI fields we accept but cannot honour: rejected when set to anything but their no-op value, never ignored
UNSUPPORTED = {"stream": (False,), "suffix": ("",), "logit_bias": ({},), "presence_penalty": (0, 0.0),
               "frequency_penalty": (0, 0.0), "best_of": (1,), "tools": ([],)}
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
    strategy: StrategySpec | None

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
    out = dict(max_tokens=max_tokens, temperature=read_number(body, "temperature", 1.0, 0.0),
               top_p=read_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True), n=read_int(body, "n", 1, 1, max_n),
               stop=read_stop(body), seed=seed, steer=read_steer(body, vectors))
    given = {k for k, v in body.items() if v is not None}
    inherit = {k: (list(out["stop"]) if k == "stop" else out[k]) for k in REQUEST_KNOBS if k in given}
    out["strategy"] = read_strategy(body, inherit)
    return out


def read_strategy(body: dict, inherit: dict) -> StrategySpec | None:
    """The ``strategy`` field as a checked ``StrategySpec`` (None when absent); any problem is a 400 naming it."""
    strategy = read(body, "strategy", "dict")
    if strategy is None:
        return None
    if not isinstance(strategy.get("name"), str):
        raise bad("strategy", "'strategy' needs a \"name\" (e.g. best_of_n, majority, beam_search)")
    for key, value in strategy.items():
        scalars = (str, int, float, bool, type(None))
        if key in ("verifier_opts", "verifier_options", "reference", "budget"):
            continue
        if not isinstance(value, scalars) and not (isinstance(value, list) and all(isinstance(v, scalars)
                                                                                   for v in value)):
            raise bad("strategy", f"strategy knob {key!r} must be a number, string, boolean or an array of them")
    try:
        return StrategySpec.from_json(strategy, inherit=inherit)
    except SteerscaleError as exc:
        raise bad("strategy", exc.problem + (f" ({exc.hint})" if exc.hint else "")) from None


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


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body.decode("utf-8") if body else "")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(None, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise bad(None, "the request body must be a JSON object")
    return data


