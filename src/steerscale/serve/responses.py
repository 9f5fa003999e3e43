"""Response shaping: OpenAI's completion and chat-completion objects (choices, log-probs, usage, finish and stop
reasons) from what the engine generated. Nothing here parses requests or runs the model.

* Log-probs are the model's own (temperature 1) log-probs of each token, as ``LocalBackend`` reports them;
  ``top_logprobs`` and echoed prompt log-probs come from one extra teacher-forced pass (``LocalBackend.
  token_logprobs``) under the same steering. ``text_offset`` is each token's start in the returned text (vLLM:
  counted from 0).
* ``finish_reason`` is ``stop`` (EOS or a stop string) or ``length``; ``stop_reason`` (vLLM's field) names the stop
  string that ended the text, or is null (EOS, length).
* Streaming (``stream: true``): server-sent events, one ``data: {chunk}`` per update and ``data: [DONE]`` last, in
  OpenAI's ``text_completion`` / ``chat.completion.chunk`` shapes. Text still being generated is sent only up to
  where it cannot change: a trailing partial UTF-8 character, or a tail that could begin a stop string, waits for
  the next token.
* ``logprobs.bytes`` (chat) are the token's own bytes: a byte-level BPE token that is part of a multi-byte
  character has bytes that are not valid UTF-8 on their own, and its ``token`` string shows them as U+FFFD.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..scale.backend import Candidate, FinishReason
from ..scale.strategies.base import Result
from .schema import GenRequest

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM clamps to the same value


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


def finish_reason(cand: Candidate) -> str:
    return "stop" if cand.finish_reason in (FinishReason.EOS, FinishReason.STOP) else "length"


def clamp(lp):
    """A JSON-safe log-prob: -inf (and NaN) become ``LOGPROB_FLOOR``."""
    if lp is None:
        return None
    lp = float(lp)
    return lp if math.isfinite(lp) and lp > LOGPROB_FLOOR else LOGPROB_FLOOR


class Shaper:
    """Turns generated ``Choice`` objects into OpenAI's response objects for one model (its tokenizer decodes
    token strings and offsets)."""

    def __init__(self, tokenizer, decode, model_id: str):
        self.tokenizer, self.decode, self.model_id = tokenizer, decode, model_id
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        self.byte_level = any(piece.startswith("\u0120") for piece in vocab)  # GPT-2's spelling of a leading space

    def token_str(self, tid: int) -> str:
        return self.tokenizer.decode([tid], skip_special_tokens=False)

    def token_bytes(self, tid: int) -> list[int]:
        """The bytes a token stands for. Byte-level BPE vocabularies (GPT-2 style, SmolLM2's) spell each byte as
        one printable character; decoding one token alone loses a partial UTF-8 sequence, this does not."""
        piece = self.tokenizer.convert_ids_to_tokens(tid) if self.byte_level else None
        if isinstance(piece, str) and piece and all(ch in _BYTE_OF for ch in piece):
            return [_BYTE_OF[ch] for ch in piece]
        return list(self.token_str(tid).encode())

    def offsets(self, ids: list[int], base: int = 0) -> list[int]:
        """Start of each token in the decoded text (a prefix decode, so merged pieces and special tokens count
        exactly as in the returned text)."""
        return [base + len(self.decode(ids[:i])) for i in range(len(ids))]

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
                return {"token": self.token_str(t), "logprob": clamp(lp), "bytes": self.token_bytes(t)}

            logprobs = {"content": [{**item(t, lp), "top_logprobs": [item(a, v) for a, v in alts]}
                                    for t, lp, alts in self.token_rows(c, req)]}
        return {"index": index, "message": {"role": "assistant", "content": c.cand.text}, "logprobs": logprobs,
                "finish_reason": finish_reason(c.cand), "stop_reason": c.stop_reason}

    def envelope(self, choices: list[dict], usage: dict, *, chat: bool) -> dict:
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_id, "choices": choices, "usage": usage}

    def strategy_response(self, result: Result, *, chat: bool) -> dict:
        """One choice (the strategy's pick) and the strategy's details under ``"steerscale"``."""
        best = result.best
        spent = result.budget["spent"]
        text = best.text if best is not None else ""
        finish = finish_reason(best) if best is not None else "length"
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": finish, "stop_reason": None} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None})
        usage = {"prompt_tokens": spent["prompt_tokens"], "completion_tokens": spent["generated_tokens"],
                 "total_tokens": spent["prompt_tokens"] + spent["generated_tokens"]}
        out = self.envelope([choice], usage, chat=chat)
        out["steerscale"] = {"strategy": result.strategy, "answer": result.answer, "budget": result.budget,
                             "failures": result.failures, "info": result.info,
                             "n_candidates": len(result.candidates)}
        return out


def stream_safe(text: str, stops) -> int:
    """How much of ``text`` (still growing) a stream can send now: not a trailing partial character (U+FFFD from
    an incomplete UTF-8 sequence), not a tail that could be the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), hold, -1):
            if text.startswith(s[:k], end - k):
                hold = k
                break
    return end - hold


def sse(payload) -> bytes:
    """One server-sent event (``[DONE]`` as is, anything else as JSON)."""
    return b"data: " + (payload if isinstance(payload, bytes) else to_json(payload)) + b"\n\n"


class StreamShaper:
    """The chunks of one streamed response: every chunk carries the same id, creation time and model."""

    def __init__(self, model_id: str, *, chat: bool, include_usage: bool):
        self.chat, self.include_usage = chat, include_usage
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                     "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
                     "model": model_id}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> bytes:
        out = {**self.head, "choices": choices}
        if self.include_usage:
            out["usage"] = usage
        return sse(out)

    def role(self, index: int) -> dict:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, index: int, text: str, cand: Candidate | None = None, stop_reason: str | None = None) -> dict:
        """A choice's new text; with ``cand`` (finished) its finish and stop reasons too."""
        finish = finish_reason(cand) if cand is not None else None
        if self.chat:
            return {"index": index, "delta": {"content": text} if text or cand is None else {}, "logprobs": None,
                    "finish_reason": finish, **({"stop_reason": stop_reason} if cand is not None else {})}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": stop_reason}

    def usage(self, usage: dict) -> bytes:
        return self.chunk([], usage)


def _byte_table() -> dict[str, int]:
    """GPT-2's byte -> printable character map, inverted (the spelling byte-level BPE vocabularies use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_table()


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


