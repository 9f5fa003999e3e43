"""``OpenAIBackend``: the ``Backend`` interface over any OpenAI-compatible ``/v1/completions`` server (vLLM, SGLang,
llama.cpp's ``llama-server``, ``steerscale serve``), with nothing but the standard library. This module is the
backend itself; the HTTP is ``client``, reading an answer ``readers``, what an answer does to a row ``replay``.

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
* Faults (``client.http_json``): retried ``retries`` times with backoff where another attempt may help; see
  ``client``. Only the answer used is charged to the budget (retries happen below it).
* Interrupted runs: a ``RemoteError`` raised by ``sample``/``extend``/``choice_logprobs`` carries ``partial``, every
  candidate this backend finished under the same ``Budget`` (one strategy run, told apart by ``Budget.uid``, which
  is never reused; a sample-mode verifier's judge samples included, ``partial_prompts`` says each one's prompt) up
  to the failure: earlier calls' results, and the rows of the failing call that finished in requests answered
  before it (concurrent requests that did answer are taken and charged). Unfinished rows are not in it.
* Chat template without ``tokenizer=``: unless ``chat=False``, the served model's own tokenizer is looked for on
  this machine, never on the network (``find_tokenizer``: a local directory, a bundled alias's converted
  checkpoint, the HF cache); when none is found, prompts go raw and one warning is logged saying how to fix it.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from ...engine.generation import format_prompt, has_chat_template
from ...errors import SteerscaleError
from ..backend import Backend, Branches, Candidate, FinishReason, SamplingParams, derive_seed
from ..budget import Budget
from .client import HINT, RemoteError, base_url_of, http_json, rejected
from .readers import (MISSING, Loglikelihood, Piece, echo_continuation_logprob, echo_option_logprob, echo_tokens,
                      first_top_logprobs, lookup_top, read_choice)
from .replay import advance, plan_requests

FALLBACK_TOP = 20  # top log-probs asked for when the server cannot echo
MAX_PARALLEL = 16  # concurrent requests of one extend()
log = logging.getLogger(__package__)  # "steerscale.scale.remote", as before the split


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


def find_tokenizer(model: str):
    """The served model's tokenizer when this machine has it, without the network (``local_files_only``), or
    None: ``model`` as a local directory, as a bundled alias whose converted checkpoint exists (what ``steerscale
    serve -m ALIAS`` serves under that name), or as an HF id in the local HF cache (vLLM serves HF ids)."""
    from pathlib import Path

    places = []
    try:
        from ...models.registry import BUNDLED

        if model in BUNDLED:
            from ...models.cache import gguf_cache_dir
            from ...models.registry import bundled_gguf_path

            places.append(gguf_cache_dir(bundled_gguf_path(model)))
        elif model.endswith(".gguf"):
            from ...models.cache import gguf_cache_dir

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
        self._done: dict[int, list[tuple[str, Candidate]]] = {}  # Budget.uid -> its run's finished candidates
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
        """Note the finished ``rows`` among the candidates of the run that ``budget`` pays for. Runs are told apart
        by ``Budget.uid``, which no other budget ever has (``id()`` is reused once an object is collected); the
        entry is dropped when its budget is collected, so finished runs hold no memory."""
        key = budget.uid
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
            done = list(self._done.get(budget.uid, []))
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
                out[where[start + j]] = [lookup_top(first_top_logprobs(ch), f) for f in firsts]

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

