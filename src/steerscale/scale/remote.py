"""``OpenAIBackend``: the ``Backend`` interface over any OpenAI-compatible ``/v1/completions`` server (vLLM, SGLang,
llama.cpp's ``llama-server``, ``steerscale serve``), with nothing but the standard library's ``urllib``.

* Prompts: formatted client-side with ``format_prompt`` when a HF ``tokenizer`` with a chat template is given (and
  ``chat`` is not False), exactly as ``LocalBackend`` does, and then sent with ``add_special_tokens: false`` (vLLM's
  field; the template carries BOS itself); otherwise sent as raw text.
* ``sample``: one request with ``n``, ``logprobs=1`` and the seed. ``Candidate.token_ids`` stays empty (the API has
  no ids); ``logprobs`` holds one log-prob per token, so ``n_tokens`` counts tokens.
* ``start``/``extend``: ``Branches.handle`` holds only the formatted prompt, the seed and a call counter; the rows'
  texts are the state. ``extend`` asks for prompt + row text for the unfinished rows, ``stop`` = the user's stop
  strings + the step delimiter, ``max_tokens`` = ``max_step_tokens``, and cuts every row client-side to what it may
  still generate. Steps follow ``LocalBackend``'s rule (``backend.step_end``): a delimiter with nothing but
  whitespace before it does not end the step, the row goes on to the next one. Stop strings are also checked
  client-side with ``LocalBackend``'s ``find_stop`` on the row's whole text, so one split across two steps or
  requests (the server sees only what it generates in one request) ends the row as it does locally.
* Requests per step: greedy (temperature 0), one request with each distinct row text once (copies share the
  answer); sampling with a seed, one request per distinct text (``n`` = its copies, seeds derived from the search's
  seed and the step), sent concurrently, because a server seeds every prompt of a request alike and rows sharing
  one request would draw the same random numbers; sampling without a seed, one request with every row's text.
* Which stop string ended a text comes from ``stop_reason`` (vLLM, steerscale serve), ``matched_stop`` (SGLang) or
  ``stopping_word``. A server that reports none of them (llama.cpp's ``/v1/completions``) makes the backend
  switch, for good, to stopping only at the user's stop strings and cutting steps at the delimiter client-side
  (tokens past a step are then paid for and dropped), and a "stop" is read as a stop string when any were given,
  else as EOS.
* Server differences also handled: log-probs in the completions format (``token_logprobs``, ``text_offset``) or
  the chat format (``content``, as llama.cpp answers); a server that rejects or ignores ``n`` > 1 gets ``n``
  single-sample requests (seeds derived per copy).
* Budget: a hard cap on generated tokens, FLOPs and verifier passes, as for ``LocalBackend``: before each round
  the rows still going are cut to the tokens left (the others finish with ``"budget"``) and each request's
  ``max_tokens`` to its rows' equal share; verifier requests are cut to the passes left. What the server then
  reports in ``usage`` is recorded (``Budget.record_remote``); its prompt tokens are known only then.
* ``choice_logprobs``: ``echo=True, max_tokens=0, logprobs=1`` on context + option, reading the option's first
  token's log-prob (vLLM's semantics; exact). A server that rejects echo gets ``max_tokens=1, logprobs=20,
  temperature=0`` on the context and the option is looked up in the top 20 (-inf when absent).
* ``loglikelihood`` (multiple-choice scoring, lm-eval's way): the same echo on context + continuation, summing the
  log-probs of the tokens that end after the context (a token straddling the boundary is counted); prompt arrays of
  ``max_n`` pairs, sent concurrently. No fallback: a server that cannot echo is a ``SteerscaleError``.
* Faults (``http_json``): each request runs on a fresh connection (``http.client``; proxies from the environment
  are honoured as ``urllib`` does). No connection (refused, connect timeout), a connection dropped before the
  answer (reset, closed), HTTP 5xx and 429 are retried ``retries`` times, ``backoff`` * 2^k s apart with jitter
  (capped at ``MAX_BACKOFF``), or after the answer's ``Retry-After`` when it has one (capped at
  ``MAX_RETRY_AFTER``); another 4xx is an immediate ``RemoteError`` with the server's message. ``timeout`` bounds
  the connect and each read (a non-streaming answer comes whole, so the generation is timed as a whole). A read
  timeout is not retried: the connection is shut down at once, which makes servers that watch for it (vLLM,
  steerscale serve) abort the generation, and the error says the request was abandoned. Only the answer used is
  charged to the budget (retries happen below it).
* Interrupted runs: a ``RemoteError`` raised by ``sample``/``extend``/``choice_logprobs`` carries ``partial``, every
  candidate this backend finished under the same live ``Budget`` object (one strategy run; a sample-mode verifier's
  judge samples included, ``partial_prompts`` says each one's prompt) up to the failure: earlier calls' results,
  and the rows of the failing call that finished in requests answered before it (concurrent requests that did
  answer are taken and charged). Unfinished rows are not in it.
* Chat template without ``tokenizer=``: unless ``chat=False``, the served model's own tokenizer is looked for on
  this machine, never on the network (``find_tokenizer``: a local directory, a bundled alias's converted
  checkpoint, the HF cache); when none is found, prompts go raw and one warning is logged saying how to fix it.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import http.client
import json
import logging
import math
import random
import socket
import ssl
import threading
import time
import weakref
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..engine.generation import format_prompt, has_chat_template
from ..errors import SteerscaleError
from .backend import Backend, Branches, Candidate, FinishReason, SamplingParams, derive_seed, find_stop, step_end
from .budget import Budget

MISSING = type("Missing", (), {"__repr__": lambda self: "MISSING"})()  # the server does not say which stop matched
HINT = ("is the server running? start one with `steerscale serve -m MODEL` (or `vllm serve MODEL`), and pass its "
        "base URL, e.g. http://127.0.0.1:8000/v1")
REASON_KEYS = ("stop_reason", "matched_stop", "stopping_word")  # vLLM / steerscale, SGLang, llama.cpp
FALLBACK_TOP = 20  # top log-probs asked for when the server cannot echo
MAX_PARALLEL = 16  # concurrent requests of one extend()
MAX_BACKOFF = 30.0  # seconds: the longest wait between two attempts of a request
MAX_RETRY_AFTER = 60.0  # seconds: the longest Retry-After honoured
log = logging.getLogger(__name__)
_jitter = random.Random()  # its own generator: retries never move the global random state


class RemoteError(SteerscaleError):
    """A request to the server that failed for good (after any retries). ``status``: the server's HTTP status, None
    when no answer came (no connection, connection dropped, timeout); ``attempts``: requests sent; ``timed_out``: the
    read timed out and the request was abandoned; ``partial``/``partial_prompts``: what ``OpenAIBackend`` finished
    before the failure (see the module docstring; empty when raised by ``http_json`` itself)."""

    def __init__(self, problem: str, hint: str | None, status: int | None = None, *, attempts: int = 1,
                 timed_out: bool = False):
        super().__init__(problem, hint)
        self.status, self.attempts, self.timed_out = status, attempts, timed_out
        self.partial: list[Candidate] = []
        self.partial_prompts: list[str] = []


def rejected(exc: RemoteError) -> bool:
    """The server refused the request itself (4xx but 429): resending it as it is cannot help."""
    return exc.status is not None and 400 <= exc.status < 500 and exc.status != 429


def base_url_of(url: str) -> str:
    """``http://host:port`` -> ``http://host:port/v1``; a URL with a path is taken as the API root as it is."""
    if not isinstance(url, str) or not url.strip():
        raise SteerscaleError("empty server URL", "pass e.g. http://127.0.0.1:8000/v1")
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SteerscaleError(f"bad server URL {url!r}", "use http://HOST:PORT/v1 (or https://...)")
    path = parts.path.rstrip("/") or "/v1"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class _Failed(Exception):
    """One attempt that got no HTTP answer: ``what`` (for the message), whether another attempt may help."""

    def __init__(self, what: str, retry: bool, timed_out: bool = False):
        super().__init__(what)
        self.what, self.retry, self.timed_out = what, retry, timed_out


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str, dict]:
    """A connection for ``url`` (through the environment's proxy, as urllib would), the request target, and the
    headers the proxy needs."""
    parts = urllib.parse.urlsplit(url)
    https = parts.scheme == "https"
    kind = http.client.HTTPSConnection if https else http.client.HTTPConnection
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.netloc.rsplit("@", 1)[-1]):
        return kind(parts.hostname, parts.port, timeout=timeout), target, {}
    p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    auth = {}
    if p.username:
        token = base64.b64encode(f"{urllib.parse.unquote(p.username)}:{urllib.parse.unquote(p.password or '')}"
                                 .encode()).decode()
        auth = {"Proxy-Authorization": f"Basic {token}"}
    if https:  # a CONNECT tunnel through the proxy, TLS to the server inside it
        conn = kind(p.hostname, p.port or 80, timeout=timeout)
        conn.set_tunnel(parts.hostname, parts.port, headers=auth)
        return conn, target, {}
    return http.client.HTTPConnection(p.hostname, p.port or 80, timeout=timeout), url, auth


def _exchange(url: str, data: bytes | None, headers: dict, timeout: float) -> tuple[int, Any, bytes]:
    """One HTTP request on a fresh connection: ``(status, headers, body)``, or ``_Failed``. The socket is shut down
    whatever happens, so a server sees the client go away at once (a read timeout abandons the request)."""
    conn, target, more = _connection(url, timeout)
    sock = resp = None
    try:
        try:
            conn.connect()
        except ssl.SSLError as exc:
            raise _Failed(f"failed (TLS: {exc})", retry=False) from None
        except socket.gaierror as exc:
            raise _Failed(f"failed (cannot resolve the host: {exc})", retry=False) from None
        except TimeoutError:
            raise _Failed(f"could not connect (timed out after {timeout:g} s)", retry=True) from None
        except OSError as exc:  # refused, unreachable, reset during the handshake
            raise _Failed(f"could not connect ({_reason(exc)})", retry=True) from None
        sock = conn.sock  # kept: the connection drops its own reference once the response says "close"
        try:
            conn.request("POST" if data is not None else "GET", target, body=data, headers={**headers, **more})
            resp = conn.getresponse()
            raw = resp.read()
        except TimeoutError:
            raise _Failed(f"timed out after {timeout:g} s; the request was abandoned (connection closed, so the "
                          "server stops working on it)", retry=False, timed_out=True) from None
        except (OSError, http.client.HTTPException) as exc:  # reset, closed without an answer, a cut-off body
            raise _Failed(f"failed ({_reason(exc)})", retry=True) from None
        return resp.status, resp.headers, raw
    finally:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if resp is not None:
            resp.close()
        conn.close()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    name = type(exc).__name__
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    return f"{name}: {text}" if text else name


def retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date), capped; None when absent."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER) if math.isfinite(seconds) else None


def backoff_delay(backoff: float, attempt: int) -> float:
    """The wait before retry number ``attempt`` + 1: ``backoff`` * 2^attempt capped at ``MAX_BACKOFF``, with jitter
    (a uniform draw from its upper half), so clients that failed together do not come back together."""
    top = min(MAX_BACKOFF, backoff * 2 ** attempt)
    return _jitter.uniform(top / 2, top)


def http_json(url: str, body: dict | None = None, *, api_key: str | None = None, timeout: float = 60,
              retries: int = 0, backoff: float = 0.5) -> dict:
    """GET (``body`` None) or POST JSON; every failure is a ``RemoteError`` naming the URL. ``retries`` more
    attempts follow a failure another attempt may fix (no connection, a dropped connection, HTTP 5xx, 429): see
    the module docstring; a read timeout and other 4xx are final at once."""
    headers = {"Accept": "application/json", "User-Agent": "steerscale", "Connection": "close"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(retries + 1):
        wait = None
        try:
            status, answer_headers, raw = _exchange(url, data, headers, timeout)
        except _Failed as f:
            retry, status = f.retry, None
            problem, timed_out = f"request to {url} {f.what}", f.timed_out
            hint = (f"raise the timeout (timeout=, --backend-timeout; now {timeout:g} s) or ask for fewer tokens"
                    if timed_out else HINT)
        else:
            if 200 <= status < 300:
                return _json_object(url, raw)
            retry, timed_out = status >= 500 or status == 429, False
            problem = f"{url} answered HTTP {status}: {_error_message(raw)}"
            hint = ("the server rejected the request; check the model name and the fields it supports"
                    if status < 500 else "the server failed; its log says why")
            if status == 429:
                hint = "the server is overloaded; send fewer requests at once, or raise retries"
            elif status == 404:
                hint = "check the base URL (it usually ends in /v1) and the model name (GET /v1/models lists them)"
            elif 300 <= status < 400:
                hint = f"the server redirects to {answer_headers.get('Location')}: use that URL"
            if retry:
                wait = retry_after(answer_headers.get("Retry-After"))
        if not retry or attempt == retries:
            if attempt:
                problem += f" (after {attempt + 1} attempts)"
            raise RemoteError(problem, hint, status, attempts=attempt + 1, timed_out=timed_out)
        delay = wait if wait is not None else backoff_delay(backoff, attempt)
        log.warning("%s; retrying in %.1f s (attempt %d of %d)", problem, delay, attempt + 2, retries + 1)
        time.sleep(delay)
    raise AssertionError("unreachable")


def _json_object(url: str, raw: bytes) -> dict:
    try:
        out = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RemoteError(f"{url} did not answer with JSON: {raw[:120]!r}", HINT, 200) from None
    if not isinstance(out, dict):
        raise RemoteError(f"{url} answered with JSON that is not an object: {str(out)[:120]}", HINT, 200)
    return out


def _error_message(raw: bytes) -> str:
    """The server's own error message (OpenAI's ``{"error": {"message"}}``, vLLM's ``{"message"}``) or the text."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return raw[:300].decode("utf-8", "replace").strip() or "(empty body)"
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        return str(err.get("message") or err)[:500]
    return str(err)[:500]


def list_models(base_url: str, *, api_key: str | None = None, timeout: float = 10, retries: int = 0,
                backoff: float = 0.5) -> list[str]:
    """The model ids a server serves (``GET /v1/models``)."""
    data = http_json(base_url_of(base_url) + "/models", api_key=api_key, timeout=timeout, retries=retries,
                     backoff=backoff)
    return [m["id"] for m in data.get("data", []) if isinstance(m, dict) and isinstance(m.get("id"), str)]


# -- reading a completions choice ---------------------------------------------------------------------------
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


# -- deciding what a piece does to a row ----------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    text: str
    logprobs: tuple[float, ...]
    status: str  # eos, stop, length: finished; step: the step is done; more: the row goes on in this call
    drop: int = 0  # characters to cut from the end of the call's earlier text: a stop string began there


# at one token, LocalBackend checks EOS, then stop strings, then the length limit, then the step delimiter; the
# step-token limit and the budget only act after that token
_PRIORITY = {"eos": 7, "stop": 6, "length": 5, "delim": 4, "left": 3, "cap": 2, "end": 1}


def first_stop(prev: str, call_text: str, full: str, ends: Sequence[int] | None, n: int,
               stops: Sequence[str]) -> tuple[int, int] | None:
    """LocalBackend's stop check (``find_stop`` on the row's earlier text and the call's text) replayed token by
    token over a piece: ``(k, cut)``, the first token after which a stop string is there and where the call's text
    (``call_text + full``) is cut, or None. It finds what the server cannot: a stop string that began in an
    earlier step or request (e.g. "\\n" + "\\n" forming "\\n\\n"), whose first part the server never saw."""
    if not stops or find_stop(prev, call_text + full, stops) < 0:  # the common case: no token-by-token replay
        return None
    units = enumerate(ends, 1) if ends is not None else [(n, len(full))]  # without offsets the piece is one unit
    for k, end in units:
        cut = find_stop(prev, call_text + full[:end], stops)
        if cut >= 0:
            return k, cut
    return None


def advance(call_text: str, piece: Piece, *, stops: Sequence[str], step: str | None, room: int, left: int,
            cap: int, prev: str = "") -> Outcome:
    """What ``piece`` adds to a row that has generated ``prev`` in earlier calls and ``call_text`` so far in this
    call, under LocalBackend's rules: ``room`` tokens left before ``max_tokens``, ``left`` before
    ``max_step_tokens``, ``cap`` before the budget share. The earliest event wins; at the same token,
    ``_PRIORITY`` decides, and a stop string found client-side comes before the server's report of the same."""
    n = len(piece.logprobs)
    reason = piece.reason
    full = piece.text + (reason if isinstance(reason, str) else "")
    if n == 0:
        return Outcome("", (), "eos" if piece.finish == "stop" and not isinstance(reason, str) else
                       "stop" if piece.finish == "stop" else "length")
    ends = list(piece.offsets[1:]) + [len(full)] if piece.offsets is not None else None
    events = []  # (token count, priority, status, where a client-side stop cuts call_text + full, or None)
    found = first_stop(prev, call_text, full, ends, n, stops)
    if found is not None:
        events.append((found[0], _PRIORITY["stop"], "stop", found[1]))
    if piece.finish == "stop":
        if isinstance(reason, str) and step is not None and reason == step and reason not in stops:
            events.append((n, _PRIORITY["end"], "more", None))  # a delimiter: the step rule below says if it counts
        elif isinstance(reason, str) or (reason is MISSING and stops):
            events.append((n, _PRIORITY["stop"], "stop", None))
        else:
            events.append((n, _PRIORITY["eos"], "eos", None))
    else:
        events.append((n, _PRIORITY["end"], "length", None))  # the server's own limit (its context window)
    for k, key, status in ((room, "length", "length"), (left, "left", "step"), (cap, "cap", "more")):
        if 1 <= k <= n:
            events.append((k, _PRIORITY[key], status, None))
    if step:
        e = step_end(call_text + full, step)
        end = e - len(call_text)
        if e >= 0 and end > 0:
            k = n if ends is None else next((j + 1 for j, e in enumerate(ends) if e >= end), n)
            events.append((k, _PRIORITY["delim"], "step", None))
    k, _, status, cut = min(events, key=lambda e: (e[0], -e[1]))  # min keeps the first of equals
    if cut is not None:  # cut where the stop string begins, in this piece or (drop) in the call's earlier text
        if cut >= len(call_text):
            return Outcome(full[: cut - len(call_text)], piece.logprobs[:k], status)
        return Outcome("", piece.logprobs[:k], status, drop=len(call_text) - cut)
    if k == n:
        text = piece.text if status in ("eos", "stop") else full
    else:  # cut inside the piece: at the end of token k (the whole text when the server gave no offsets)
        text = full[: ends[k - 1]] if ends is not None else full
    return Outcome(text, piece.logprobs[:k], status)


def plan_requests(texts: Sequence[str], *, greedy: bool, seeded: bool) -> list[tuple[list[str], int, list[list[int]]]]:
    """Requests for rows with prompts ``texts``: ``(prompts, n, owners)``, where ``owners[c]`` are the rows that
    take choice ``c`` (choices come prompt by prompt, ``n`` each).

    * Greedy: one request, each distinct text once, its answer copied to every row with that text.
    * Sampling with a seed: one request per distinct text, ``n`` = its rows. A server seeds every prompt of a
      request alike, so prompts sharing one request would draw the same random numbers and the rows would move
      in lockstep; the ``n`` samples of one prompt are independent.
    * Sampling without a seed: one request with every row's text."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        groups.setdefault(t, []).append(i)
    if greedy:
        return [(list(groups), 1, list(groups.values()))]
    if seeded or len(groups) == 1:
        return [([t], len(rows), [[r] for r in rows]) for t, rows in groups.items()]
    return [(list(texts), 1, [[i] for i in range(len(texts))])]


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


@dataclass
class _Call:
    """A row's progress within one sample()/extend() call."""

    text: str = ""
    logprobs: list = field(default_factory=list)
    active: bool = True


@dataclass
class _Handle:
    """``Branches.handle`` of this backend: no model state, only what makes requests reproducible."""

    prompt: str  # formatted
    seed: int | None
    calls: int = 0


# -- the backend ----------------------------------------------------------------------------------------------
def find_tokenizer(model: str):
    """The served model's tokenizer when this machine has it, without the network (``local_files_only``), or
    None: ``model`` as a local directory, as a bundled alias whose converted checkpoint exists (what ``steerscale
    serve -m ALIAS`` serves under that name), or as an HF id in the local HF cache (vLLM serves HF ids)."""
    from pathlib import Path

    places = []
    try:
        from ..models.registry import BUNDLED

        if model in BUNDLED:
            from ..models.cache import gguf_cache_dir
            from ..models.registry import bundled_gguf_path

            places.append(gguf_cache_dir(bundled_gguf_path(model)))
        elif model.endswith(".gguf"):
            from ..models.cache import gguf_cache_dir

            places.append(gguf_cache_dir(Path(model).expanduser()))
    except (SteerscaleError, OSError):
        pass
    path = Path(model).expanduser()
    places.append(path if path.is_dir() else model)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    for place in places:
        if isinstance(place, Path) and not (place / "tokenizer_config.json").is_file():
            continue
        try:
            return AutoTokenizer.from_pretrained(str(place), local_files_only=True)
        except Exception:  # noqa: BLE001 - not there, or not loadable: a best-effort look, the caller warns
            continue
    return None


class OpenAIBackend(Backend):
    """A ``Backend`` over an OpenAI-compatible completions server. See the module docstring."""

    name = "openai"

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, tokenizer=None,
                 chat: bool | str | None = None, timeout: float = 60, max_n: int = 64, n_params: int = 0,
                 extra_body: dict | None = None, retries: int = 3, backoff: float = 0.5):
        """``tokenizer``: formats prompts client-side; None looks for the served model's own on this machine unless
        ``chat`` is False (``find_tokenizer``; none found: raw prompts and one logged warning). ``chat``: None or
        "auto" (the template when the tokenizer has one), True (required), False (raw prompts). ``timeout``: seconds
        per request (connect, then each read); ``retries``/``backoff``: see ``http_json``."""
        self.base_url = base_url_of(base_url)
        if chat == "auto":
            chat = None
        if chat not in (None, True, False):
            raise SteerscaleError(f"chat must be True, False, None or 'auto', got {chat!r}")
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise SteerscaleError(f"retries must be a non-negative integer, got {retries!r}")
        if not isinstance(backoff, (int, float)) or not 0 <= backoff < math.inf:
            raise SteerscaleError(f"backoff must be a non-negative number of seconds, got {backoff!r}")
        if not isinstance(model, str) or not model:
            raise SteerscaleError("OpenAIBackend needs the served model's name", "GET /v1/models lists them")
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise SteerscaleError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not isinstance(max_n, int) or max_n < 1:
            raise SteerscaleError(f"max_n must be a positive integer, got {max_n!r}")
        if not isinstance(n_params, int) or n_params < 0:
            raise SteerscaleError(f"n_params must be a non-negative integer, got {n_params!r}")
        if extra_body is not None and not isinstance(extra_body, dict):
            raise SteerscaleError("extra_body must be a dict of extra request fields")
        self.found_tokenizer = False  # True: the tokenizer is the served model's own, found on this machine
        if tokenizer is None and chat is not False:
            tokenizer = find_tokenizer(model)
            self.found_tokenizer = tokenizer is not None
            if tokenizer is None and not chat:
                log.warning("no tokenizer of %r found on this machine: prompts to %s are sent raw, without a "
                            "chat template; pass its tokenizer (tokenizer=, --backend-tokenizer HF_ID_OR_DIR), or "
                            "chat=False (--no-chat) for raw prompts on purpose", model, self.base_url)
        if chat and (tokenizer is None or not has_chat_template(tokenizer)):
            raise SteerscaleError("chat=True needs a tokenizer with a chat template",
                                  "pass tokenizer=AutoTokenizer.from_pretrained(MODEL), or chat=False")
        self.model, self.api_key, self.tokenizer, self.chat = model, api_key, tokenizer, chat
        self.timeout, self.max_n, self._n_params = float(timeout), max_n, n_params
        self.retries, self.backoff = retries, float(backoff)
        self._done: dict[int, list[tuple[str, Candidate]]] = {}  # id(budget) -> its run's finished candidates
        self._done_lock = threading.Lock()
        self.extra_body = dict(extra_body or {})
        self.templated = tokenizer is not None and (has_chat_template(tokenizer) if chat is None else bool(chat))
        self.reports_stop = True  # set False once a response shows the server does not say which stop matched
        self.echo = True  # set False once the server rejects echo
        self.multi_n = True  # set False once the server rejects or ignores n > 1

    @property
    def n_params(self) -> int:
        return self._n_params

    def format(self, prompt: str) -> str:
        if self.tokenizer is not None:
            return format_prompt(self.tokenizer, prompt, self.chat)
        if not isinstance(prompt, str) or not prompt.strip():
            raise SteerscaleError("empty prompt", "pass a non-empty prompt text")
        return prompt

    # -- HTTP -------------------------------------------------------------------------------------------------
    def completions(self, prompts: list[str], **fields) -> tuple[list[dict], dict]:
        """``/completions`` for ``prompts``: the choices in order (prompt by prompt, ``n`` each) and the usage.
        A server that takes no ``n`` (llama.cpp: it rejects or ignores it) gets ``n`` single-sample requests."""
        n = fields.get("n", 1)
        if n > 1 and not self.multi_n:
            return self._one_by_one(prompts, fields)
        try:
            choices, usage = self._request(prompts, fields)
        except RemoteError as exc:
            if n == 1 or not rejected(exc):
                raise
            self.multi_n = False
            return self._one_by_one(prompts, fields)
        if n > 1 and len(choices) == len(prompts):  # n ignored: these are each prompt's first sample
            self.multi_n = False
            more, more_usage = self._one_by_one(prompts, {**fields, "n": n - 1}, first=1)
            choices = [c for i, first in enumerate(choices) for c in [first] + more[i * (n - 1):(i + 1) * (n - 1)]]
            usage = _add_usage([usage, more_usage])
        if len(choices) != len(prompts) * n:
            raise SteerscaleError(f"{self.base_url}/completions returned {len(choices)} choices for {len(prompts)} "
                                  f"prompt(s) x n={n}", HINT)
        return choices, usage

    def _request(self, prompts: list[str], fields: dict) -> tuple[list[dict], dict]:
        body = {**self.extra_body, **fields, "model": self.model,
                "prompt": prompts[0] if len(prompts) == 1 else prompts}
        if self.templated:
            body["add_special_tokens"] = False
        url = self.base_url + "/completions"
        data = http_json(url, body, api_key=self.api_key, timeout=self.timeout, retries=self.retries,
                         backoff=self.backoff)
        choices = data.get("choices")
        if not isinstance(choices, list):
            raise SteerscaleError(f"{url} returned no choices: {str(data)[:200]}", HINT)
        choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
        return choices, data.get("usage") if isinstance(data.get("usage"), dict) else {}

    def _one_by_one(self, prompts: list[str], fields: dict, first: int = 0) -> tuple[list[dict], dict]:
        """``n`` requests of one sample each, regrouped prompt by prompt. Copy 0 keeps the seed (it is the sample a
        server that ignores ``n`` returns for the plain request), later copies derive theirs."""
        n, seed = fields["n"], fields.get("seed")

        def seeded(j):
            return {} if seed is None else {"seed": seed if j == 0 else derive_seed(seed, "copy", j)}

        copies = [(prompts, {**fields, "n": 1, **seeded(j)}) for j in range(first, first + n)]
        answers = self._send_all(copies)
        for choices, _ in answers:
            if len(choices) != len(prompts):
                raise SteerscaleError(f"{self.base_url}/completions returned {len(choices)} choices for "
                                      f"{len(prompts)} prompt(s)", HINT)
        return [answers[j][0][i] for i in range(len(prompts)) for j in range(n)], _add_usage([u for _, u in answers])

    def _send_all(self, requests: list[tuple[list[str], dict]], settle: bool = False) -> list:
        """Several completions requests at once (a batching server runs them together); answers in order. A
        failure raises once all are back; with ``settle``, a failed request's place holds its ``RemoteError``."""
        def one(r):
            try:
                return self.completions(r[0], **r[1])
            except RemoteError as exc:
                if not settle:
                    raise
                return exc

        if len(requests) == 1:
            return [one(requests[0])]
        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(requests))) as pool:
            return list(pool.map(one, requests))

    def _charge(self, budget: Budget, usage: dict, pieces: Sequence[Piece] = (), verifier_passes: int = 0) -> None:
        p = int(usage.get("prompt_tokens") or 0)
        if "completion_tokens" in usage:
            c = int(usage["completion_tokens"] or 0)
        else:  # a server without usage: count the tokens it returned
            c = sum(len(x.logprobs) for x in pieces)
        if verifier_passes:
            budget.record_remote(verifier_passes=verifier_passes, verifier_tokens=p + c, n_params=self.n_params)
        else:
            budget.record_remote(prompt_tokens=p, generated_tokens=c, n_params=self.n_params)

    def _paid_rows(self, budget: Budget, rows: list[Candidate], calls: list["_Call"], live: list[int]):
        """The rows of ``live`` this round can pay for, and each one's token cap (None: no token-like limit). With
        fewer tokens left than rows, the rows past them finish with ``"budget"``."""
        left = budget.tokens_left(self.n_params)
        if budget.exhausted:
            left = 0
        if math.isinf(left):
            return live, None
        paid = live[: int(left)]
        for i in live[len(paid):]:
            rows[i].finished, rows[i].finish_reason, calls[i].active = True, FinishReason.BUDGET, False
        return paid, (int(left) // len(paid) if paid else 0)

    # -- the decoding loop shared by sample() and extend() ------------------------------------------------------
    def _grow(self, prompt: str, rows: list[Candidate], params: SamplingParams, budget: Budget, *, stepwise: bool,
              seed: int | None, first_seed: int | None = None) -> None:
        """Grow ``rows`` by one step (``stepwise``) or to the end, in rounds of requests until every row is done."""
        step = params.step if stepwise else None
        calls = [_Call(active=not r.finished) for r in rows]
        try:
            self._rounds(prompt, rows, calls, params, budget, step, stepwise, seed, first_seed)
        except RemoteError:  # the rows that are done keep what they got; those still mid-request stay as they were
            _fold([r for r, c in zip(rows, calls) if not c.active], [c for c in calls if not c.active])
            raise
        _fold(rows, calls)
        for row in rows:
            if not stepwise and not row.finished:
                row.finished, row.finish_reason = True, FinishReason.LENGTH

    def _rounds(self, prompt, rows, calls, params, budget, step, stepwise, seed, first_seed) -> None:
        """``_grow``'s rounds of requests; a failed request is raised after the answered ones of its round are
        taken (and charged)."""
        rnd = 0
        while any(c.active for c in calls):
            live, cap = self._paid_rows(budget, rows, calls, [i for i, c in enumerate(calls) if c.active])
            if not live:
                break
            groups: dict[tuple, list[int]] = {}
            for i in live:  # the step delimiter is dropped from the stops once the server is found not to report it
                with_step = step is not None and self.reports_stop
                groups.setdefault(params.stop + ((step,) if with_step else ()), []).append(i)
            for g, (stops, members) in enumerate(groups.items()):
                limits = {i: self._limits(rows[i], calls[i], params, stepwise, cap) for i in members}
                texts = [prompt + rows[i].text + calls[i].text for i in members]
                plans = plan_requests(texts, greedy=params.temperature == 0, seeded=seed is not None)
                first = first_seed if rnd == 0 and len(groups) == len(plans) == 1 else None
                requests = [(prompts, self._fields(n, [limits[members[o]] for own in owners for o in own], params,
                                                   stops, first if first is not None else derive_seed(seed, rnd, g, p)))
                            for p, (prompts, n, owners) in enumerate(plans)]
                answers = self._send_all(requests, settle=True)
                ok = [k for k, a in enumerate(answers) if not isinstance(a, RemoteError)]
                self._take([answers[k] for k in ok], [plans[k] for k in ok], members, rows, calls, limits, params,
                           step, stops, budget)
                failed = next((a for a in answers if isinstance(a, RemoteError)), None)
                if failed is not None:
                    raise failed
            rnd += 1

    @staticmethod
    def _limits(row: Candidate, call: _Call, params: SamplingParams, stepwise: bool, cap: int | None) -> dict:
        """Tokens a row may still take in this request: ``room`` before ``max_tokens``, ``left`` before the step's
        ``max_step_tokens``, ``cap`` before its share of the budget."""
        room = params.max_tokens - row.n_tokens - len(call.logprobs)
        left = params.max_step_tokens - len(call.logprobs) if stepwise else room
        return dict(room=room, left=left, cap=room if cap is None else cap)

    @staticmethod
    def _fields(n: int, limits: list[dict], params: SamplingParams, stops: tuple, seed: int | None) -> dict:
        """The completions request fields for ``n`` choices of rows with ``limits``."""
        fields = dict(n=n, max_tokens=max(min(lim.values()) for lim in limits), temperature=params.temperature,
                      logprobs=1)
        if params.top_p < 1:
            fields["top_p"] = params.top_p
        if params.min_tokens:  # the server would hold stop strings back too, but a step's request cannot know when
            raise SteerscaleError("min_tokens is not supported with a remote backend",
                                  "drop min_tokens, or run the strategy on a local model")
        for name, off in (("top_k", 0), ("min_p", 0.0), ("repetition_penalty", 1.0), ("presence_penalty", 0.0),
                          ("frequency_penalty", 0.0), ("ignore_eos", False)):  # vLLM's fields, sent only when on
            if getattr(params, name) != off:
                fields[name] = getattr(params, name)
        if params.logit_bias:
            fields["logit_bias"] = {str(t): b for t, b in params.logit_bias}
        if stops:
            fields["stop"] = list(stops)
        if seed is not None:
            fields["seed"] = seed
        return fields

    def _take(self, answers, plans, members, rows, calls, limits, params, step, stops, budget) -> None:
        """Charge each answer and advance its rows (``advance``); a server found not to report which stop matched
        has its answers dropped when the step delimiter was among the stops: those rows go again without it."""
        redo = False
        for (choices, usage), (_, _, owners) in zip(answers, plans):
            pieces = [read_choice(c, self.base_url) for c in choices]
            self._charge(budget, usage, pieces)
            if any(pc.reason is MISSING for pc in pieces):
                self.reports_stop = False
                redo = redo or (step is not None and step in stops)
            if redo:
                continue
            for piece, own in zip(pieces, owners):
                for o in own:
                    i = members[o]
                    out = advance(calls[i].text, piece, stops=params.stop, step=step, prev=rows[i].text, **limits[i])
                    calls[i].text = calls[i].text[: len(calls[i].text) - out.drop] + out.text
                    calls[i].logprobs.extend(out.logprobs)
                    if out.status in ("eos", "stop", "length"):
                        rows[i].finished, rows[i].finish_reason = True, FinishReason(out.status)
                        calls[i].active = False
                    elif out.status == "step":
                        calls[i].active = False

    # -- Backend API ------------------------------------------------------------------------------------------
    # -- what a run has finished, for RemoteError.partial -----------------------------------------------------
    def _record(self, budget: Budget, prompt: str, rows: Sequence[Candidate]) -> None:
        """Note the finished ``rows`` among the candidates of the run that ``budget`` pays for (kept while the
        budget lives: its entry goes when it is collected, before its id can be reused)."""
        key = id(budget)
        with self._done_lock:
            if key not in self._done:
                self._done[key] = []
                weakref.finalize(budget, self._done.pop, key, None)
            done = self._done[key]
            seen = {id(c) for _, c in done}
            done += [(prompt, r) for r in rows if r.finished and id(r) not in seen]

    def _failed(self, exc: RemoteError, budget: Budget) -> RemoteError:
        """``exc`` with what the run paid by ``budget`` finished so far."""
        with self._done_lock:
            done = list(self._done.get(id(budget), []))
        exc.partial, exc.partial_prompts = [c for _, c in done], [p for p, _ in done]
        return exc

    def sample(self, prompt, n, params, budget, *, seed=None) -> list[Candidate]:
        self.check_n(n)
        rows = [Candidate() for _ in range(n)]
        text = self.format(prompt)
        try:  # the first request carries the caller's seed as is, so a deterministic server reproduces a local run
            self._grow(text, rows, params, budget, stepwise=False, seed=seed, first_seed=seed)
        except RemoteError as exc:
            self._record(budget, prompt, rows)
            raise self._failed(exc, budget) from None
        self._record(budget, prompt, rows)
        return rows

    def start(self, prompt, n, budget, *, seed=None) -> Branches:
        self.check_n(n)
        return Branches(prompt, [Candidate() for _ in range(n)], _Handle(self.format(prompt), seed))

    def extend(self, branches, params, budget) -> Branches:
        h = _handle(branches)
        if branches.rows and not branches.all_finished:
            h.calls += 1
            live = [r for r in branches.rows if not r.finished]
            try:
                self._grow(h.prompt, branches.rows, params, budget, stepwise=True, seed=derive_seed(h.seed, h.calls))
            except RemoteError as exc:
                self._record(budget, branches.prompt, live)
                raise self._failed(exc, budget) from None
            self._record(budget, branches.prompt, live)
        return branches

    def select(self, branches, indices) -> Branches:
        idx = self.check_select(branches, indices)
        h = _handle(branches)
        return Branches(branches.prompt, [branches.rows[i].copy() for i in idx], _Handle(h.prompt, h.seed, h.calls))

    def merge(self, parts) -> Branches:
        parts = self.check_merge(parts)
        h = _handle(parts[0])
        return Branches(parts[0].prompt, [r for p in parts for r in p.rows],
                        _Handle(h.prompt, h.seed, max(_handle(p).calls for p in parts)))

    def choice_logprobs(self, contexts, options, budget) -> list[list[float]]:
        if not contexts:
            return []
        if any(not isinstance(o, str) or not o for o in options):
            raise SteerscaleError(f"options must be non-empty strings, got {list(options)!r}")
        # the verifier passes left decide how many contexts are scored; the rest stay unscored (NaN)
        per_context = len(options) if self.echo else 1
        k = budget.affordable([{"verifier_passes": per_context}] * len(contexts))
        texts = [self.format(c) for c in contexts[:k]]
        out: list[list[float] | None] = [None] * len(texts)
        try:
            if self.echo and texts:
                try:
                    self._echo_logprobs(texts, list(options), out, budget)
                except RemoteError as exc:
                    if not rejected(exc):
                        raise
                    self.echo = False  # the server cannot echo prompt log-probs: use its top log-probs from now on
            todo = [i for i, v in enumerate(out) if v is None]
            todo = todo[: budget.affordable([{"verifier_passes": 1}] * len(todo))]  # the fallback within what is left
            if todo:
                self._top_logprobs([texts[i] for i in todo], list(options), todo, out, budget)
        except RemoteError as exc:
            raise self._failed(exc, budget) from None
        unscored = [math.nan] * len(options)
        return [v if v is not None else list(unscored) for v in out] + [list(unscored) for _ in contexts[k:]]

    def _echo_logprobs(self, texts, options, out, budget) -> None:
        """Exact: each option appended to each context, scored with echo; the option's first token is the one
        that starts where the context ends (rows whose tokens straddle that point stay None)."""
        pairs = [(i, o) for i in range(len(texts)) for o in options]
        found: dict[tuple[int, str], float] = {}
        for start in range(0, len(pairs), self.max_n):
            chunk = pairs[start:start + self.max_n]
            choices, usage = self.completions([texts[i] + o for i, o in chunk], n=1, max_tokens=0, echo=True,
                                              logprobs=1, temperature=0)
            self._charge(budget, usage, verifier_passes=len(chunk))
            for (i, o), ch in zip(chunk, choices):
                lp = echo_option_logprob(ch, o)
                if lp is not None:
                    found[(i, o)] = lp
        for i in range(len(texts)):
            if all((i, o) in found for o in options):
                out[i] = [found[(i, o)] for o in options]

    def loglikelihood(self, requests: Sequence[tuple[str, str]], budget: Budget | None = None) -> list[Loglikelihood]:
        """The log-likelihood of each ``(context, continuation)``'s continuation given its context, lm-eval's way:
        one echo of context + continuation per pair (``echo: true, max_tokens: 0, logprobs: 1``), summing the
        log-probs of the tokens that end after the context (``echo_continuation_logprob``; a token straddling the
        boundary is counted). The texts are sent as given (``format`` them first for a chat template); the server
        tokenizes them (with ``add_special_tokens: false`` when this backend applies a chat template). Pairs go
        ``max_n`` to a request (a prompt array), the requests concurrently; each answer's ``usage`` is charged to
        ``budget`` (prompt tokens) when one is given. A server that cannot echo prompt log-probs is a
        ``SteerscaleError`` (there is no exact fallback)."""
        pairs = [(c, x) for c, x in requests]
        for c, x in pairs:
            if not isinstance(c, str) or not isinstance(x, str) or not x:
                raise SteerscaleError(f"loglikelihood needs (context, continuation) strings with a non-empty "
                                      f"continuation, got {(c, x)!r}"[:300])
        if not pairs:
            return []
        fields = dict(n=1, max_tokens=0, echo=True, logprobs=1, temperature=0)
        chunks = [pairs[i:i + self.max_n] for i in range(0, len(pairs), self.max_n)]
        try:
            answers = self._send_all([([c + x for c, x in chunk], fields) for chunk in chunks])
        except RemoteError as exc:
            if not rejected(exc):
                raise
            self.echo = False
            raise SteerscaleError(f"{self.base_url} cannot score log-likelihoods: it rejected an echo of the prompt's "
                                  f"log-probs ({exc.problem})",
                                  "log-likelihood scoring needs `echo` with `max_tokens: 0` on /v1/completions "
                                  "(vLLM, steerscale serve); on other servers use --mode generate with --strategy "
                                  "greedy") from None
        out = []
        for chunk, (choices, usage) in zip(chunks, answers):
            if budget is not None:
                self._charge(budget, usage)
            for (c, x), ch in zip(chunk, choices):
                got = echo_continuation_logprob(ch, x)
                if got is None:
                    if echo_tokens(ch, x) is None:
                        raise SteerscaleError(f"{self.base_url} did not echo the prompt with its log-probs",
                                              "log-likelihood scoring needs `echo` with `max_tokens: 0` and "
                                              "`logprobs` on /v1/completions (vLLM, steerscale serve)")
                    raise SteerscaleError(f"{self.base_url}'s echoed tokens cannot be placed on the continuation "
                                          f"{x[:80]!r} (their strings do not spell it, or a log-prob is missing)",
                                          "score this task with a local model")
                out.append(got)
        return out

    def _top_logprobs(self, texts, options, where, out, budget) -> None:
        """Fallback: the next token's top log-probs after each context; an option outside them gets -inf."""
        firsts = [self._first_token(o) for o in options]
        for start in range(0, len(texts), self.max_n):
            chunk = texts[start:start + self.max_n]
            choices, usage = self.completions(chunk, n=1, max_tokens=1, logprobs=FALLBACK_TOP, temperature=0)
            self._charge(budget, usage, verifier_passes=len(chunk))
            for j, ch in enumerate(choices):
                out[where[start + j]] = [_lookup(first_top_logprobs(ch), f) for f in firsts]

    def _first_token(self, option: str) -> str:
        """The option's first token as text (the whole option when no tokenizer is known)."""
        if self.tokenizer is None:
            return option
        ids = self.tokenizer([option], return_tensors="pt", padding=False, add_special_tokens=False)["input_ids"][0]
        return self.tokenizer.decode([int(ids[0])]) if len(ids) else option


def _fold(rows: Sequence[Candidate], calls: Sequence[_Call]) -> None:
    """Append what each row got in this call to it (one step)."""
    for row, call in zip(rows, calls):
        if call.logprobs:
            row.logprobs.extend(call.logprobs)
            row.steps.append(call.text)
            row.text += call.text


def _add_usage(usages: Sequence[dict]) -> dict:
    out: dict = {}
    for u in usages:
        for key in ("prompt_tokens", "completion_tokens"):
            if key in u:
                out[key] = out.get(key, 0) + int(u[key] or 0)
    return out


def _handle(branches: Branches) -> _Handle:
    if not isinstance(branches.handle, _Handle):
        raise SteerscaleError("these branches were not made by an OpenAIBackend", "use backend.start(...) first")
    return branches.handle


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


def _lookup(tops: dict, token: str) -> float:
    if token in tops and tops[token] is not None:
        return float(tops[token])
    alike = [v for k, v in tops.items() if isinstance(k, str) and k.strip() == token.strip() and v is not None]
    return float(max(alike)) if alike else -math.inf
