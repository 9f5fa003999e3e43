"""Continuous batching with per-row steering: one engine loop owns the model and decodes every running request in
one forward pass per token, each row with its own steering, sampling parameters, seed and stop strings.

* A request (``Job``) joins at a decoding-step boundary: its prompt is prefilled alone (under its own steering,
  scoped to the prompt as ``intervene`` scopes it), and its KV-cache row joins the running batch without
  restarting the others (caches of different lengths are left-padded with masked columns, ``engine.kvcache``;
  positions are counted from real tokens, so the padding is invisible). It leaves when it finishes (EOS, a stop
  string, ``max_tokens``, the context window) or is cancelled; its row is dropped before the next forward.
* Steering per row: for the k-th steering entry of the rows, one ``Add`` per site with a ``(rows, dim)`` vector,
  the row's ``scale x direction`` (zeros for rows without a k-th entry, and for rows whose scope excludes
  generated tokens). A row's edits therefore run in the order its request gave them, exactly as alone, and an
  unsteered row gets ``h + 0 == h``. Steered and unsteered rows, and rows with different vectors, share the pass.
* Sampling per row: every row has its own ``torch.Generator`` seeded from its request, so seeded sampling gives the
  same tokens alone or in a batch. Greedy rows are argmax. Float rounding can still differ with the batch shape;
  ``tests/test_scheduler.py`` checks that where a greedy token differs, the top-2 logit margin there is tiny.
* ``step()`` is one iteration of the loop (admit waiting jobs, then decode one token for every running row);
  ``start()`` runs it on a background thread and ``submit`` returns a ``concurrent.futures.Future``. One thread
  owns the model: a scheduler, not a lock.

Token scopes: ``all`` (prompt and generated tokens), ``prompt`` (the prefill only) and ``generated`` (decode only).
Position-based scopes (``last:K``, ``positions:``) are refused at submission: they need the request's own width.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..engine.kvcache import cache_of, cat_caches, map_cache
from ..engine.ops import Add
from ..engine.runtime import Intervention, intervene
from ..engine.scope import Scope, TokenScope
from ..errors import SteerscaleError
from ..scale.backend import Candidate, FinishReason, SamplingParams, find_stop
from ..scale.local import LocalBackend

SCHEDULED_SCOPES = (Scope.ALL, Scope.PROMPT, Scope.GENERATED)


@dataclass
class Job:
    """One generated sequence: token ids of the prompt, sampling parameters, seed, and steering as
    ``(vector, scale)`` pairs applied in order at ``scope``."""

    prompt_ids: list[int]
    params: SamplingParams
    seed: int | None = None
    steer: Sequence[tuple[object, float]] = ()
    scope: TokenScope | str = "all"
    future: Future = field(default_factory=Future, repr=False)
    cancelled: bool = False

    def __post_init__(self):
        self.scope = TokenScope.parse(self.scope)
        if self.scope.kind not in SCHEDULED_SCOPES:
            raise SteerscaleError(f"token scope {self.scope!r} is not supported by the batching scheduler",
                                  "use all, prompt or generated")
        if not self.prompt_ids:
            raise SteerscaleError("a job needs at least one prompt token")

    def cancel(self) -> None:
        """Leave the batch at the next step boundary; the future ends with what was generated so far."""
        self.cancelled = True


@dataclass
class _Row:
    job: Job
    generator: torch.Generator
    cand: Candidate = field(default_factory=Candidate)


class Scheduler:
    """The engine loop. ``Scheduler(model, tokenizer, layout, max_batch=16)``; ``submit(job) -> Future`` (the future
    gives a finished ``Candidate``); ``step()`` runs one iteration; ``start()``/``stop()`` the background loop."""

    def __init__(self, model, tokenizer, layout, *, max_batch: int = 16, add_special_tokens: bool | None = None):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise SteerscaleError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.base = LocalBackend(model, tokenizer, layout, add_special_tokens=add_special_tokens)
        self.model, self.layout, self.max_batch = model, layout, max_batch
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.rows: list[_Row] = []
        self._cache = self._mask = self._logits = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.steps = 0  # decoding steps run (each one forward pass for the whole batch)

    # -- requests ---------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Future:
        for vector, scale in job.steer:
            vector.check_compatible(self.layout)
            if not isinstance(scale, (int, float)) or scale != scale or abs(scale) == float("inf"):
                raise SteerscaleError(f"steering scale must be a finite number, got {scale!r}")
        window = self.base.context_window
        if window and len(job.prompt_ids) >= window:
            raise SteerscaleError(f"prompt is {len(job.prompt_ids)} tokens but the context window is {window}",
                                  "shorten the prompt")
        self.waiting.put(job)
        self._wake.set()
        return job.future

    # -- the loop ---------------------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="steerscale-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still running or waiting end with a ``SteerscaleError``."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for row in self.rows:
            _fail(row.job, "the server is shutting down")
        self.rows = []
        self._cache = self._mask = self._logits = None
        while not self.waiting.empty():
            _fail(self.waiting.get_nowait(), "the server is shutting down")

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.rows and self.waiting.empty():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as exc:  # a failed forward fails the batch it ran, never the loop
                for row in self.rows:
                    _fail(row.job, f"generation failed: {type(exc).__name__}: {exc}")
                self.rows, self._cache, self._mask, self._logits = [], None, None, None

    @torch.no_grad()
    def step(self) -> None:
        """Admit waiting jobs (prefill each alone, join the batch), then decode one token for every running row."""
        self._admit()
        if not self.rows:
            return
        keep, fed = [], []
        for b, row in enumerate(self.rows):
            if row.job.cancelled:
                self._finish(row, FinishReason.CANCELLED)
                continue
            tok, lp = self.base.choose(self._logits[b : b + 1], row.job.params, row.generator)
            if self._accept(row, int(tok[0]), float(lp[0])):
                keep.append(b)
                fed.append(int(tok[0]))
        self._select(keep)
        if not self.rows:
            return
        inp = torch.tensor(fed, device=self.base.device)[:, None]
        pos = self._mask.sum(-1, keepdim=True)
        mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        with intervene(self.layout, self._decode_edits()):
            out = self.model(input_ids=inp, attention_mask=mask, position_ids=pos, cache=self._cache, use_cache=True,
                             logits_to_keep=1)
        self._cache, self._mask, self._logits = cache_of(out), mask, out.logits[:, -1].float()
        self.steps += 1

    # -- pieces of a step ---------------------------------------------------------------------------------------
    def _admit(self) -> None:
        while len(self.rows) < self.max_batch and not self.waiting.empty():
            job = self.waiting.get_nowait()
            if job.cancelled:
                _fail(job, "cancelled before it started")
                continue
            ids = torch.tensor([job.prompt_ids], device=self.base.device)
            edits = [iv for vector, scale in job.steer for iv in vector.interventions(scale, job.scope)]
            with intervene(self.layout, edits, prompt_width=len(job.prompt_ids)) if edits else contextlib.nullcontext():
                out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                                 logits_to_keep=1)
            gen = torch.Generator(device="cpu")
            gen.manual_seed(int(job.seed) if job.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
            self._join(cache_of(out), torch.ones_like(ids), out.logits[:, -1].float())
            self.rows.append(_Row(job, gen))

    def _join(self, cache, mask, logits) -> None:
        if self._cache is None:
            self._cache, self._mask, self._logits = cache, mask, logits
            return
        widths = [self._mask.shape[1], mask.shape[1]]
        total = max(widths)
        self._cache = cat_caches([self._cache, cache], widths, total)
        self._mask = torch.cat([torch.cat([m.new_zeros(m.shape[0], total - w), m], 1)
                                for m, w in zip((self._mask, mask), widths)])
        self._logits = torch.cat([self._logits, logits])

    def _select(self, keep: list[int]) -> None:
        """Drop the rows that left (finished or cancelled) from the batch state."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[b] for b in keep]
        if not keep:
            self._cache = self._mask = self._logits = None
            return
        idx = torch.tensor(keep, device=self.base.device)
        self._cache = map_cache(self._cache, lambda t: t.index_select(0, idx))
        self._mask, self._logits = self._mask.index_select(0, idx), self._logits.index_select(0, idx)

    def _accept(self, row: _Row, token: int, logprob: float) -> bool:
        """Append a sampled token; False when the row has finished (and its future is resolved)."""
        c, params = row.cand, row.job.params
        c.token_ids.append(token)
        c.logprobs.append(logprob)
        if token in self.base.eos_ids:
            return self._finish(row, FinishReason.EOS)
        text = self.base.decode(c.token_ids)
        cut = find_stop("", text, params.stop)
        if cut >= 0:
            c.text = text[:cut]
            return self._finish(row, FinishReason.STOP)
        c.text = text
        window = self.base.context_window
        if len(c.token_ids) >= params.max_tokens or (window and len(row.job.prompt_ids) + len(c.token_ids) >= window):
            return self._finish(row, FinishReason.LENGTH)
        return True

    @staticmethod
    def _finish(row: _Row, reason: FinishReason) -> bool:
        row.cand.finished, row.cand.finish_reason = True, reason
        row.cand.steps = [row.cand.text]
        if not row.job.future.done():
            row.job.future.set_result(row.cand)
        return False

    def _decode_edits(self) -> list[Intervention]:
        """One ``Add`` per (entry k, site) with a ``(rows, dim)`` vector: row b's k-th ``scale x direction``, zeros
        where row b has no k-th entry at that site or its scope leaves generated tokens alone."""
        slots: dict[tuple[int, object], torch.Tensor] = {}
        order: list[tuple[int, object]] = []
        for b, row in enumerate(self.rows):
            if row.job.scope.kind is Scope.PROMPT:
                continue
            for k, (vector, scale) in enumerate(row.job.steer):
                for site, direction in vector.directions.items():
                    key = (k, site)
                    if key not in slots:
                        slots[key] = torch.zeros(len(self.rows), direction.shape[-1], dtype=direction.dtype)
                        order.append(key)
                    slots[key][b] = scale * direction
        order.sort(key=lambda key: key[0])  # entry by entry: each row's edits run in its request's order
        return [Intervention(site, Add(slots[(k, site)], 1.0)) for k, site in order]


def _fail(job: Job, message: str) -> None:
    if not job.future.done():
        job.future.set_exception(SteerscaleError(message))
