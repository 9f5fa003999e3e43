"""Continuous batching with per-row steering: one engine loop owns the model and decodes every running request in
one forward pass per token, each row with its own steering, sampling parameters, seed and stop strings.

* A request (``Job``) joins at a decoding-step boundary: its prompt is prefilled under its own steering (the
  jobs that arrived together share one left-padded prefill pass; a job alone is encoded exactly as
  ``LocalBackend`` encodes it), and its KV-cache rows join the running batch without restarting the others
  (caches of different lengths are left-padded with masked columns, ``engine.kvcache``; positions are counted
  from real tokens, so the padding is invisible). It leaves when it finishes (EOS, a stop
  string, ``max_tokens``, the context window) or is cancelled; its row is dropped before the next forward.
* Steering per row: the batch's steering plan (``engine.plan``, the form the vLLM worker runs too): per site, edit
  slots whose tables hold each steered request's rows per token class, and a per-token index (``_plan``). A row's
  edits run in the order its request gave them, exactly as alone; an unsteered row (and padding) reads row 0, no
  edit. Steered and unsteered rows, and rows with different vectors, share the pass. Tables are rebuilt when the
  batch's composition changes, the index every pass.
* Sampling per row: every row has its own ``torch.Generator`` seeded from its request, so seeded sampling gives the
  same tokens alone or in a batch. Greedy rows are argmax. Float rounding can still differ with the batch shape;
  ``tests/test_scheduler.py`` checks that where a greedy token differs, the top-2 logit margin there is tiny.
* ``step()`` is one iteration of the loop (admit waiting jobs, then decode one token for every running row);
  ``start()`` runs it on a background thread and ``submit`` returns a ``concurrent.futures.Future``. One thread
  owns the model: a scheduler, not a lock. Other model work (a strategy run, a scoring pass) goes to the same
  thread with ``call(fn)`` and runs between two steps.

Token scopes: ``all`` (prompt and generated tokens), ``prompt`` (the prefill only) and ``generated`` (decode only).
Position-based scopes (``last:K``, ``positions:``) are refused at submission: they need the request's own width.
Token gates (an entry's fourth element, a ``TokenGate``): the plan's gated slots apply from the token at which the
gate fired in that row; each row's latch is kept on its job between steps (``Job.latches``), as ``generate`` keeps
it over one generation.
"""

from __future__ import annotations

import queue
import threading
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..engine.capture import Batch
from ..engine.decoding import FinishReason, RowCall, SamplingParams, TokenRules, sample_next, seeded_generator
from ..engine.kvcache import cache_of, cat_caches, map_cache, with_cache
from ..engine.logit_contrast import LogitContrast, contrast_rows, early_reader
from ..engine.plan import PlanEdit, SteeringPlan, build_tables, request_slots, token_index
from ..engine.prompt_rules import PromptRule, read_prompts
from ..engine.runtime import Intervention, StandingIntervener, new_latch
from ..engine.scope import Scope, TokenScope
from ..errors import SteerscaleError
from ..models.sites import Site
from ..models.threads import refresh as refresh_threads
from ..scale.backend import Candidate
from ..scale.budget import Budget
from ..steer.gating import check_gate
from ..steer.grammar import check_op
from ..steer.vector import SteeringVector

SCHEDULED_SCOPES = (Scope.ALL, Scope.PROMPT, Scope.GENERATED)


@dataclass
class Job:
    """``n`` sequences of one prompt (its token ids), with sampling parameters, a seed, and steering as
    ``(vector, scale)`` or ``(vector, scale, scope)`` entries applied in order (``scope`` is the default scope of
    entries that name none) and ``PromptRule``s (CAST conditions, controllers), which the engine decides for the
    prompt right before its prefill (``Scheduler._decide``) and replaces by the entries they chose; an entry
    ``(vector, scale, scope, gate)`` applies from the token at which its ``TokenGate`` fires. Its future
    gives the ``n`` finished ``Candidate``s. The ``n`` rows draw from one generator, jointly, as ``LocalBackend.sample`` draws them, so a seeded job gives the tokens ``LocalBackend``
    gives.

    ``budget`` (optional): the ledger that pays for the job's tokens, bought step by step as ``LocalBackend`` buys
    them (rows it cannot pay for end with ``FinishReason.BUDGET``). ``on_update`` (optional) is called on the engine
    thread after every step that gave the job tokens and when it finishes (a streaming response wakes on it): it
    must be quick and must not raise."""

    prompt_ids: list[int]
    params: SamplingParams
    seed: int | None = None
    steer: Sequence[tuple] = ()
    scope: TokenScope | str = "all"
    n: int = 1
    budget: Budget | None = None
    n_params: int = 0
    logit_contrast: LogitContrast | None = None  # decode from the early-layer contrast (DoLa / VISTA)
    on_update: Callable[[], None] | None = field(default=None, repr=False)
    future: Future = field(default_factory=Future, repr=False)
    cancelled: bool = False
    # engine state, set when the job is admitted
    cands: list = field(default_factory=list, repr=False)
    calls: list = field(default_factory=list, repr=False)  # per row: its RowCall (the decoding core's row state)
    slots: dict | None = field(default=None, repr=False)  # its edits per site, as the steering plan takes them
    latches: dict = field(default_factory=dict, repr=False)  # id(gate) -> per row, the real index it fired at
    generator: torch.Generator | None = field(default=None, repr=False)
    last_logits: torch.Tensor | None = field(default=None, repr=False)  # (n, V): each row's latest distribution

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise SteerscaleError(f"n must be a positive integer, got {self.n!r}")
        self.scope = _scheduled_scope(self.scope)
        self.steer = [entry if isinstance(entry, PromptRule) and _scheduled_scope(entry.scope) else
                      _job_entry(entry, self.scope) for entry in self.steer]
        if not self.prompt_ids:
            raise SteerscaleError("a job needs at least one prompt token")

    def cancel(self) -> None:
        """Leave the batch at the next step boundary; the future ends with what was generated so far."""
        self.cancelled = True

    def notify(self) -> None:
        if self.on_update is not None:
            self.on_update()


def _job_entry(entry, scope: TokenScope) -> tuple:
    """``(vector, op, scope, gate)`` of an entry ``(vector, op[, scope[, gate]])``, its scope the job's if none."""
    if not isinstance(entry, tuple) or not 2 <= len(entry) <= 4:
        raise SteerscaleError(f"a steering entry is (vector, op[, scope[, gate]]) or a PromptRule, got {entry!r}")
    vector, op, *rest = entry
    return (vector, op, _scheduled_scope(rest[0]) if rest and rest[0] is not None else scope,
            rest[1] if len(rest) > 1 else None)


def _scheduled_scope(scope) -> TokenScope:
    scope = TokenScope.parse(scope)
    if scope.kind not in SCHEDULED_SCOPES:
        raise SteerscaleError(f"token scope {scope!r} is not supported by the batching scheduler",
                              "use all, prompt or generated")
    return scope


@dataclass
class _Row:
    """A row of the running batch: sequence ``index`` of ``job``."""

    job: Job
    index: int

    @property
    def cand(self) -> Candidate:
        return self.job.cands[self.index]


class Scheduler:
    """The engine loop. ``Scheduler(model, tokenizer, layout, max_batch=16, sites=...)``; ``submit(job) -> Future``
    (the future gives a finished ``Candidate``); ``step()`` runs one iteration; ``start()``/``stop()`` the background
    loop. Its hooks are attached once (``hooks``, an ``engine.runtime.StandingIntervener``): at ``sites`` (the
    server's registered vectors) when it is built, elsewhere the first time a request steers there, and removed by
    ``stop()``; each pass runs the edits of the rows in it, so a decoding step registers nothing."""

    def __init__(self, model, tokenizer, layout, *, max_batch: int = 16, sites: Sequence[Site] = ()):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise SteerscaleError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.model, self.tokenizer, self.layout, self.max_batch = model, tokenizer, layout, max_batch
        self.tokens = TokenRules(model, tokenizer)  # the decoding core's EOS set, pad id, window and decode
        self.device = next(model.parameters()).device
        self._tables: tuple | None = None  # (the steered jobs of the batch, their plan's tables)
        self.hooks = StandingIntervener(layout).attach()
        self.hooks.prepare(sites)
        # a loop dropped without stop() must not leave its hooks on the model either
        weakref.finalize(self, self.hooks.close)
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.rows: list[_Row] = []
        self._cache = self._mask = self._logits = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._calls: queue.Queue = queue.Queue()
        self._next: Job | None = None  # the first waiting job, taken off the queue but not yet admitted
        self._closed = False
        self.steps = 0  # decoding steps run (each one forward pass for the whole batch)

    @property
    def queue_depth(self) -> int:
        """Jobs submitted and not yet admitted to the batch."""
        return self.waiting.qsize() + (self._next is not None)

    @property
    def running(self) -> int:
        """Rows in the running batch."""
        return len(self.rows)

    # -- requests ---------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Future:
        if self._closed:
            raise SteerscaleError("the server is shutting down", "retry on another replica or later")
        for entry in job.steer:
            if isinstance(entry, PromptRule):
                entry.check(self.layout)
                continue
            vector, op, _, gate = entry
            vector.check_compatible(self.layout)
            check_op(op)
            if gate is not None:
                check_gate(gate, self.layout)
                for site in vector.directions:
                    gate.check_edit_site(site)
        window = self.tokens.context_window
        if window and len(job.prompt_ids) >= window:
            raise SteerscaleError(f"prompt is {len(job.prompt_ids)} tokens but the context window is {window}",
                                  "shorten the prompt")
        self.waiting.put(job)
        self._wake.set()
        if self._closed:  # stop() ran between the check above and the put: nobody will take it now
            while not self.waiting.empty():
                _fail(self.waiting.get_nowait(), "the server is shutting down")
        return job.future

    def sample(self, prompt_ids: list[int], params: SamplingParams, **job_fields) -> Job:
        """Submit a job for ``prompt_ids`` (``job_fields``: the other ``Job`` fields) and return it: its future gives
        the candidates, ``job.cancel()`` ends it. What a strategy's ``sample`` call becomes on this loop."""
        job = Job(prompt_ids, params, **job_fields)
        self.submit(job)
        return job

    # -- the loop ---------------------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="steerscale-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still running or waiting end with a ``SteerscaleError``."""
        self._closed = True  # nothing new is taken from here on
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)  # a step still running after this ends its batch with the errors below
            self._thread = None
        for row in self.rows:
            _fail(row.job, "the server is shutting down")
        self.rows = []
        while not self._calls.empty():
            _, future = self._calls.get_nowait()
            if not future.done():
                future.set_exception(SteerscaleError("the server is shutting down"))
        self._cache = self._mask = self._logits = self._tables = None
        if self._next is not None:
            _fail(self._next, "the server is shutting down")
            self._next = None
        while not self.waiting.empty():
            _fail(self.waiting.get_nowait(), "the server is shutting down")
        self.hooks.close()  # the model is left as it was before the engine

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.rows and self._next is None and self.waiting.empty() and self._calls.empty():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as exc:  # a failed forward fails the batch it ran (a server error), never the loop
                for row in self.rows:
                    _fail(row.job, exc)
                self.rows, self._cache, self._mask, self._logits = [], None, None, None

    def call(self, fn) -> Future:
        """Run ``fn()`` on the engine thread between two steps, with the model to itself (work that is not a
        batched generation: a strategy run, a teacher-forced scoring pass). Returns its future."""
        if self._closed:
            raise SteerscaleError("the server is shutting down", "retry on another replica or later")
        future: Future = Future()
        self._calls.put((fn, future))
        self._wake.set()
        return future

    @torch.no_grad()
    def step(self) -> None:
        """Run queued calls, admit waiting jobs (prefill each alone, join the batch), then decode one token for
        every running row."""
        # in this loop's own thread (torch's count is per thread); a clock read, the machine re-read once a second
        refresh_threads(self.device)
        self._run_calls()
        self._admit()
        if not self.rows:
            return
        by_job = {}
        for b, row in enumerate(self.rows):
            by_job.setdefault(id(row.job), (row.job, []))[1].append((row.index, b))
        keep, fed = [], []
        for job, members in by_job.values():
            for i, b in members:
                job.last_logits[i] = self._logits[b]
            if job.cancelled:
                for i, _ in members:
                    self._finish(job, i, FinishReason.CANCELLED)
                continue
            # every row of the job draws, finished ones from their last distribution, as LocalBackend draws them
            history = {}
            if job.params.has_processors:  # what the logits processors read: each row's prompt and output so far
                history = {"eos_ids": self.tokens.eos_ids, "prompt_ids": [job.prompt_ids] * job.n,
                           "output_ids": [c.token_ids for c in job.cands]}
            try:
                tok, lp = sample_next(job.last_logits, job.params, job.generator, **history)
            except Exception as exc:  # this request's sampling failed (a server error): it alone leaves
                _fail(job, exc)
                continue
            granted = self._buy(job, len(members))
            for rank, (i, b) in enumerate(members):
                if rank >= granted:  # the budget pays for no more tokens: this row ends here
                    self._finish(job, i, FinishReason.BUDGET)
                elif self._accept(job, i, int(tok[i]), float(lp[i])):
                    keep.append(b)
                    fed.append(int(tok[i]))
            job.notify()
        order = sorted(range(len(keep)), key=keep.__getitem__)  # rows keep their batch order
        keep, fed = [keep[k] for k in order], [fed[k] for k in order]
        self._select(keep)
        if not self.rows:
            return
        inp = torch.tensor(fed, device=self.device)[:, None]
        pos = self._mask.sum(-1, keepdim=True)
        mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        row_jobs = [row.job for row in self.rows]
        specs = [job.logit_contrast for job in row_jobs]
        early = early_reader(self.layout, self.model, specs)
        generated = torch.tensor([len(job.prompt_ids) for job in row_jobs])[:, None]  # every token is generated
        plan = self._plan(row_jobs, generated, generated[:, 0])
        latches = self._latches(plan)
        with self._running(plan, early.observers() if early else (), latches=latches):
            out = self.model(input_ids=inp, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                             **with_cache(self.model, self._cache))
        for gid, latch in latches.items():  # each gated row keeps its latch on its job
            for row, at in zip(self.rows, latch.tolist()):
                if gid in row.job.latches:
                    row.job.latches[gid][row.index] = at
        self._cache, self._mask = cache_of(out), mask
        self._logits = contrast_rows(self.model, self.layout, out.logits[:, -1].float(), specs, early)
        self.steps += 1

    @staticmethod
    def _buy(job: Job, live: int) -> int:
        """How many of the job's ``live`` rows its budget pays a token for (all of them without a budget)."""
        if job.budget is None:
            return live
        if job.budget.exhausted:  # wall time: checked here, between tokens, as LocalBackend checks it
            return 0
        return job.budget.buy_tokens(live, job.n_params)

    def _run_calls(self) -> None:
        while not self._calls.empty():
            fn, future = self._calls.get_nowait()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # the caller gets the error; the loop goes on
                future.set_exception(exc)

    # -- pieces of a step ---------------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Prefill waiting jobs, in order, while their rows fit in ``max_batch`` (a job larger than that runs when
        the batch is empty): all that fit, in one forward pass."""
        batch, rows = [], len(self.rows)
        while True:
            if self._next is None:
                if self.waiting.empty():
                    break
                self._next = self.waiting.get_nowait()
            job = self._next
            if job.cancelled:
                self._next = None
                _fail(job, "cancelled before it started")
                continue
            if (rows or batch) and rows + job.n > self.max_batch:
                break
            self._next = None
            batch.append(job)
            rows += job.n
        if not batch:
            return
        try:
            self._prefill(batch)
        except Exception as exc:  # a prefill failed (a server error): find the request that fails, alone
            if len(batch) == 1:
                _fail(batch[0], exc)
                return
            for job in batch:
                try:
                    self._prefill([job])
                except Exception as exc_alone:
                    _fail(job, exc_alone)

    def _prefill(self, jobs: list[Job]) -> None:
        """Encode the jobs' prompts, each under its own steering, and join their rows to the batch. One job is
        encoded alone (exactly as ``LocalBackend`` encodes it); several share one left-padded forward pass, each
        row with its own edits (``_row_edits``), its padding masked and its positions counted from its first real
        token, so a row gets what it gets alone up to float rounding."""
        for job in jobs:
            self._decide(job)
            entries = [(vector, op, scope.kind.value, gate) for vector, op, scope, gate in job.steer]
            job.slots = request_slots(entries) or None
        specs = [job.logit_contrast for job in jobs]
        early = early_reader(self.layout, self.model, specs)
        reads = early.observers() if early else ()
        width = max(len(job.prompt_ids) for job in jobs)
        ids = torch.full((len(jobs), width), self.tokens.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for b, job in enumerate(jobs):
            ids[b, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            mask[b, width - len(job.prompt_ids):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        # padding reads no edit: its position -1 is given the slot of no request
        positions = torch.where(mask.bool(), pos, torch.full_like(pos, -1)).cpu()
        latches: dict = {}  # the gates' latches start in this pass (its first column is 0)
        with self._running(self._plan(jobs, positions, torch.tensor([len(j.prompt_ids) for j in jobs])), reads,
                           prompt_width=width, latches=latches):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        logits = contrast_rows(self.model, self.layout, out.logits[:, -1].float(), specs, early)
        rows = torch.tensor([b for b, job in enumerate(jobs) for _ in range(job.n)], device=self.device)
        self._join(map_cache(cache_of(out), lambda t: t.index_select(0, rows)), mask.index_select(0, rows),
                   logits.index_select(0, rows))
        for b, job in enumerate(jobs):
            job.generator = seeded_generator(job.seed)
            job.calls = [RowCall() for _ in range(job.n)]
            # each candidate shares its call's lists: a streaming reader sees every accepted token at once
            job.cands = [Candidate(token_ids=call.ids, logprobs=call.logprobs) for call in job.calls]
            job.last_logits = logits[b].expand(job.n, -1).clone()
            gated = {id(entry[3]) for entry in job.steer if entry[3] is not None}
            job.latches = {gid: [int(latch[b])] * job.n for gid, latch in latches.items() if gid in gated}
            self.rows += [_Row(job, i) for i in range(job.n)]

    def _decide(self, job: Job) -> None:
        """Replace the job's prompt rules by the entries they choose for its prompt (one reading pass that stops at
        the deepest site read): ``(vector of scale x direction per site, 1, the rule's scope)``, or nothing for a
        prompt the rule leaves unsteered."""
        rules = [e for e in job.steer if isinstance(e, PromptRule)]
        if not rules:
            return
        ids = torch.tensor([job.prompt_ids], device=self.device)
        readings = iter(read_prompts(self.model, self.layout, Batch(ids, torch.ones_like(ids)), rules))
        steer = []
        for entry in job.steer:
            if not isinstance(entry, PromptRule):
                steer.append(entry)
                continue
            chosen = {site: float(scales[0]) * direction
                      for site, (direction, scales) in entry.site_scales(next(readings)).items() if float(scales[0])}
            if chosen:
                metadata = {"preserve_norm": True} if entry.preserve_norm else {}
                steer.append((SteeringVector(chosen, method="decided", metadata=metadata), 1.0,
                              _scheduled_scope(entry.scope), None))
        job.steer = steer

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
        idx = torch.tensor(keep, device=self.device)
        self._cache = map_cache(self._cache, lambda t: t.index_select(0, idx))
        self._mask, self._logits = self._mask.index_select(0, idx), self._logits.index_select(0, idx)
        # columns that were padding for every row still running (a long prompt that left): drop them, so the
        # cache does not keep growing under steady load
        real = self._mask.any(0).nonzero()
        first = int(real[0, 0]) if real.numel() else 0
        if first:
            self._mask = self._mask[:, first:]
            self._cache = map_cache(self._cache, lambda t: t[:, :, first:])

    def _accept(self, job: Job, i: int, token: int, logprob: float) -> bool:
        """Append a sampled token to row ``i`` of ``job`` under the decoding core's rules (``RowCall.accept``: EOS,
        stop string, length); False when the row has finished."""
        call = job.calls[i]
        outcome = call.accept(token, logprob, job.params, self.tokens, self.tokens.limit(job.params, len(job.prompt_ids)))
        job.cands[i].text = call.text
        return True if outcome is None else self._finish(job, i, outcome)

    @staticmethod
    def _finish(job: Job, i: int, reason: FinishReason) -> bool:
        c = job.cands[i]
        if not c.finished:
            c.finish_reason = reason  # before ``finished``: a streaming reader that sees finished sees the reason
            c.finished = True
            c.steps = [c.text] if c.token_ids else []
        if all(x.finished for x in job.cands) and not job.future.done():
            job.future.set_result(job.cands)
            job.notify()
        return False

    def _plan(self, row_jobs: list[Job], positions: torch.Tensor, prompt_lens: torch.Tensor) -> SteeringPlan | None:
        """The steering plan (``engine.plan``) of a pass whose row b belongs to ``row_jobs[b]``, with its tokens at
        ``positions`` (rows, tokens; -1: padding) of prompts ``prompt_lens`` long (rows,); None: nothing steered.
        Tables are rebuilt only when the batch's steered jobs change."""
        steered = list({id(job): job for job in row_jobs if job.slots}.values())
        if not steered:
            return None
        # the jobs themselves, compared by identity: a finished job's id may be reused, its object is kept here
        if self._tables is None or len(self._tables[0]) != len(steered) or \
                any(a is not b for a, b in zip(self._tables[0], steered)):
            param = next(self.model.parameters())
            self._tables = (steered, build_tables([job.slots for job in steered], param.device, param.dtype))
        place = {id(job): k for k, job in enumerate(steered)}
        slot = torch.tensor([place.get(id(job), -1) for job in row_jobs])[:, None].expand_as(positions)
        slot = torch.where(positions >= 0, slot, torch.full_like(slot, -1))
        return SteeringPlan(self._tables[1], token_index(slot, positions, prompt_lens[:, None]).to(self.device),
                            gate_on=self.hooks.gate_on)

    def _running(self, plan: SteeringPlan | None, observers=(), prompt_width: int | None = None,
                 latches: dict | None = None):
        """The standing hooks running ``plan`` (one ``PlanEdit`` per site; its gates read, their latches in
        ``latches``) and ``observers`` for the pass inside the block."""
        edits = [] if plan is None else [Intervention(site, PlanEdit(plan, site)) for site in plan.ops]
        return self.hooks.running(edits, observers, prompt_width, gates=plan.gates if plan else (), latches=latches)

    def _latches(self, plan: SteeringPlan | None) -> dict:
        """The batch's latch of each gate ``plan`` reads, from its rows' jobs (rows it does not gate: never)."""
        latches = {}
        for gate in plan.gates if plan is not None else ():
            latch = new_latch(len(self.rows))
            for b, row in enumerate(self.rows):
                if id(gate) in row.job.latches:
                    latch[b] = row.job.latches[id(gate)][row.index]
            latches[id(gate)] = latch.to(self.device)
        return latches


def _fail(job: Job, error: str | BaseException) -> None:
    """End ``job`` with ``error`` (a message: a ``SteerscaleError``) unless it already ended."""
    if not job.future.done():
        job.future.set_exception(SteerscaleError(error) if isinstance(error, str) else error)
        job.notify()
