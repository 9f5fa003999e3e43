"""Reading a ``/v1/completions`` answer, whatever the server: a generated choice (``read_choice`` -> ``Piece``:
text, one log-prob per token, offsets, which stop ended it), an echoed prompt's log-probs (``echo_tokens``,
``echo_option_logprob``, ``echo_continuation_logprob`` -> ``Loglikelihood``) and the first position's top
log-probs (``first_top_logprobs``, ``lookup_top``). Pure functions of the JSON; no requests.

* Log-probs come in the completions format (``token_logprobs``, ``text_offset``) or the chat format (``content``,
  as llama.cpp answers).
* Which stop string ended a text comes from ``stop_reason`` (vLLM, steerscale serve), ``matched_stop`` (SGLang) or
  ``stopping_word``; a server that reports none of them leaves ``Piece.reason`` ``MISSING``.
* Echo offsets are read relative to the end of the text, so servers that count from the prompt or from 0 agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ...errors import SteerscaleError
from .client import HINT

MISSING = type("Missing", (), {"__repr__": lambda self: "MISSING"})()  # the server does not say which stop matched
REASON_KEYS = ("stop_reason", "matched_stop", "stopping_word")  # vLLM / steerscale, SGLang, llama.cpp


@dataclass(frozen=True)
class Piece:
    """One choice of a completions response: generated text (a matched stop string excluded, as servers return
    it), one log-prob per token, each token's start in ``text`` (None when not given), why it ended."""

    text: str
    logprobs: tuple[float, ...]
    offsets: tuple[int, ...] | None
    finish: str  # the server's finish_reason: stop or length
    reason: Any = MISSING  # the matched stop string; None or a token id: EOS / a stop token; MISSING: not reported


def read_choice(choice: dict, url: str) -> Piece:
    if not isinstance(choice, dict) or not isinstance(choice.get("text"), str):
        raise SteerscaleError(f"{url} returned a choice without text: {str(choice)[:200]}", HINT)
    lp = choice.get("logprobs")
    if isinstance(lp, dict) and isinstance(lp.get("token_logprobs"), list):  # the completions format
        values, offs = lp["token_logprobs"], lp.get("text_offset")
    elif isinstance(lp, dict) and isinstance(lp.get("content"), list):  # the chat format (llama.cpp uses it here)
        items = [it if isinstance(it, dict) else {} for it in lp["content"]]
        values = [it.get("logprob") for it in items]
        pieces = [it.get("token") if isinstance(it.get("token"), str) else "" for it in items]
        offs = [sum(map(len, pieces[:i])) for i in range(len(pieces))]
    else:
        raise SteerscaleError(f"{url} returned no log-probs", "steerscale needs `logprobs` on /v1/completions "
                                                              "(vLLM, SGLang and steerscale serve support it)")
    logprobs = tuple(-math.inf if v is None else float(v) for v in values)
    offsets = None
    if isinstance(offs, list) and len(offs) == len(logprobs) and offs and all(isinstance(o, int) for o in offs):
        offsets = tuple(o - offs[0] for o in offs)  # servers differ on where 0 is; only differences matter
    reason = MISSING
    for key in REASON_KEYS:
        if key in choice:
            reason = choice[key] if choice[key] != "" else None
            break
    return Piece(choice["text"], logprobs, offsets, str(choice.get("finish_reason") or "length"), reason)


@dataclass(frozen=True)
class Loglikelihood:
    """``OpenAIBackend.loglikelihood``'s answer for one (context, continuation): ``logprob``, the sum of the
    continuation's token log-probs; ``n_tokens``, how many tokens that sums (the server's tokenization of context +
    continuation); ``n_context``, the tokens before them; ``straddles``: the first counted token began inside the
    context (see ``echo_continuation_logprob``); ``greedy``: every counted token was the most likely one (None when
    the server listed no top log-probs)."""

    logprob: float
    n_tokens: int
    n_context: int
    straddles: bool = False
    greedy: bool | None = None


def echo_tokens(choice: dict, tail: str) -> tuple[list[str], list, list[int], int, int] | None:
    """An echoed completion's tokens, log-probs and starts, with where the text ends and where its last
    ``len(tail)`` characters (``tail``) begin on the same axis: ``(tokens, values, starts, end, target)``. ``end``
    is the last token's start plus its length, so positions count back from the end and servers that count offsets
    from the prompt or from 0 agree. None when the choice is not an echo of a text ending in ``tail`` (a server
    that ignored echo) or its log-probs are malformed."""
    lp = choice.get("logprobs") if isinstance(choice, dict) else None
    if not isinstance(lp, dict):
        return None
    tokens, values, offs = lp.get("tokens"), lp.get("token_logprobs"), lp.get("text_offset")
    if not (isinstance(tokens, list) and isinstance(values, list) and isinstance(offs, list)) or not tokens:
        return None
    if not (len(tokens) == len(values) == len(offs)) or not str(choice.get("text", "")).endswith(tail):
        return None  # not an echo of context + tail
    if not all(isinstance(t, str) for t in tokens) or not all(isinstance(o, int) for o in offs):
        return None
    end = offs[-1] + len(tokens[-1])
    return tokens, values, offs, end, end - len(tail)


def echo_option_logprob(choice: dict, option: str) -> float | None:
    """Log-prob of the echoed token that starts ``len(option)`` characters before the end of the text, if one
    does (offsets are taken relative to the end, so servers that count from the prompt or from 0 agree)."""
    echoed = echo_tokens(choice, option)
    if echoed is None:
        return None
    _, values, offs, _, target = echoed
    for tok_start, value in zip(offs, values):
        if tok_start == target:
            return None if value is None else float(value)
    return None


def echo_continuation_logprob(choice: dict, continuation: str) -> Loglikelihood | None:
    """The log-likelihood of ``continuation`` in an echo of context + continuation: the sum of the log-probs of
    the echoed tokens that end after the context does (``echo_tokens``' axis). Those are the tokens that start at
    or after the boundary and, when the server's tokenization merged the context's last characters with the
    continuation's first ones, the one token that straddles the boundary: it is counted (it carries the
    continuation's first characters; lm-eval's text-offset readers do the same). None when the tokens cannot be
    placed: not an echo, a missing log-prob among the counted tokens, or token strings that do not spell the
    continuation (a server whose per-token strings differ from the text there, e.g. U+FFFD for the pieces of a
    multi-byte character)."""
    echoed = echo_tokens(choice, continuation)
    if echoed is None or not continuation:
        return None
    tokens, values, offs, end, target = echoed
    ends = list(offs[1:]) + [end]
    picked = [i for i in range(len(tokens)) if ends[i] > target]
    if not picked or picked[0] == 0 or any(values[i] is None for i in picked):
        return None  # the first echoed token has no log-prob: nothing precedes the continuation
    spelled = "".join(tokens[i] for i in picked)
    if not spelled.endswith(continuation):
        return None
    tops = choice["logprobs"].get("top_logprobs")
    greedy = None
    if isinstance(tops, list) and len(tops) == len(tokens):
        at = [tops[i] for i in picked]
        if all(isinstance(t, dict) and t for t in at):  # greedy: no listed token beats the text's own
            greedy = all(float(values[i]) >= max(float(v) for v in t.values() if v is not None) - 1e-6
                         for i, t in zip(picked, at))
    return Loglikelihood(math.fsum(float(values[i]) for i in picked), len(picked), picked[0],
                         straddles=offs[picked[0]] < target, greedy=greedy)


def first_top_logprobs(choice: dict) -> dict:
    """``{token: log-prob}`` of the first generated position (completions or chat log-prob format)."""
    lp = choice.get("logprobs") if isinstance(choice, dict) else None
    if not isinstance(lp, dict):
        return {}
    if isinstance(lp.get("top_logprobs"), list) and lp["top_logprobs"] and isinstance(lp["top_logprobs"][0], dict):
        return lp["top_logprobs"][0]
    content = lp.get("content")
    if isinstance(content, list) and content and isinstance(content[0], dict):
        return {t.get("token"): t.get("logprob") for t in content[0].get("top_logprobs") or [] if isinstance(t, dict)}
    return {}


def lookup_top(tops: dict, token: str) -> float:
    """``token``'s log-prob among ``tops`` (``first_top_logprobs``); a listed token that differs only in
    surrounding whitespace stands in for it (the best such one); -inf when none is listed."""
    if token in tops and tops[token] is not None:
        return float(tops[token])
    alike = [v for k, v in tops.items() if isinstance(k, str) and k.strip() == token.strip() and v is not None]
    return float(max(alike)) if alike else -math.inf
