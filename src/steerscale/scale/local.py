"""``LocalBackend``: the transformers implementation of ``Backend``, searching inside the engine.

* The prompt is encoded once (one row, or one row per distinct steering strength) and its KV cache is
  expanded to N rows with ``index_select``; the encoded prompt is kept for later calls charged to the same
  budget (adaptive self-consistency draws batch after batch from it).
* All rows of a batch share one ``DynamicCache``. A row that has finished its step (or its sequence) while
  others go on is fed a masked pad token, so rows stay aligned without re-encoding; positions come from the
  count of real tokens, so the holes are invisible to the model (and to ``engine.scope``'s token masks).
* ``select`` forks/drops rows of the cache (resampling, pruning); ``merge`` left-pads caches of different
  lengths with masked columns and joins them (A* pops nodes kept in separate caches).
* Steering belongs to the backend, never to a strategy: the backend's interventions wrap every forward pass via
  ``steerscale.intervene``. With ``row_scales`` (steering-diversified sampling) row ``i`` of every ``sample``/
  ``start`` call gets multiplier ``row_scales[i % len(row_scales)]`` of every ``Add`` edit; the prompt is then
  encoded once per distinct multiplier. Both are checked when the backend is built.
* Conditional steering (``rules``: ``engine.prompt_rules.PromptRule``, e.g. CAST conditions or a steering
  controller) is decided once per prompt, by a reading pass charged as one more prompt pass, before the prompt is
  encoded; its edits then join the backend's steering for every row of that prompt (kept with the encoded prompt).
* Token gates (``Intervention.gate``): each row's latch (the real index at which the gate fired) lives in the
  decoding state beside its cache and follows its row through ``select``/``merge``, so a gated edit applies to the
  same tokens as in ``generate``.
* Hooks: one ``StandingIntervener`` for the backend's lifetime, attached at its first steered pass (at every
  steering site) and removed by ``close()`` or when the backend is garbage-collected; each pass runs its own
  edits on it, so no call or step registers hooks. A backend on an engine loop (``ScheduledBackend``) runs on the
  loop's hooks (``hooks=``).
* Budget: every purchase goes through the ledger's ``buy_*`` methods before the work (a hard cap): a prompt that
  does not fit is not encoded, a decoding step is cut to the rows still paid for, a batch of verifier passes to
  the passes that fit (the others come back NaN: unscored).
* Seeds: one ``torch.Generator`` per ``Branches``/``sample`` call, so equal seeds give equal results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..engine.capture import Batch
from ..engine.decoding import RowCall, TokenRules, decode_rows, sample_next, score_tokens, seeded_generator
from ..engine.generation import format_prompt, has_chat_template
from ..engine.kvcache import cache_of, cat_caches, map_cache, with_cache
from ..engine.logit_contrast import LogitContrast, check_layout, contrast_rows, early_reader
from ..engine.ops import Add
from ..engine.prompt_rules import PromptRule, prompt_interventions
from ..engine.provenance import SpanIndex
from ..engine.runtime import Intervention, StandingIntervener
from ..errors import SteerscaleError
from ..models.threads import refresh as refresh_threads
from .backend import Backend, Branches, Candidate, FinishReason, SamplingParams
from .budget import Budget


@dataclass
class _KV:
    """Row-aligned decoding state: cache (B rows), 2-D mask of real columns, next-token logits, steering."""

    cache: object
    mask: torch.Tensor  # (B, L) long
    logits: torch.Tensor  # (B, V) float32: distribution of each row's next token
    scales: torch.Tensor | None  # (B,) per-row steering multipliers, None: 1 for every row
    generator: torch.Generator
    prompt_width: int
    prompt_ids: list[int] = field(default_factory=list)  # the prompt's ids (every row's: one prompt per batch)
    decided: list = field(default_factory=list)  # the prompt rules' edits for this prompt (conditional steering)
    latches: dict = field(default_factory=dict)  # token gates: id(gate) -> (B,) real index each row's gate fired at

    def rows(self, index: torch.Tensor) -> dict:
        """The latches of rows ``index`` (``select``, expanding a prompt to its rows)."""
        return {gid: latch.index_select(0, index.to(latch.device)) for gid, latch in self.latches.items()}


def _close(row: Candidate, call: RowCall, stepwise: bool) -> None:
    """Append what one ``sample``/``extend`` call generated to its row, as one step."""
    if call.ids:
        row.token_ids.extend(call.ids)
        row.logprobs.extend(call.logprobs)
        row.steps.append(call.text)
        row.text += call.text
    if not stepwise and not row.finished:
        row.finished, row.finish_reason = True, FinishReason.LENGTH


class LocalBackend(Backend):
    """Sampling and step-wise search on a local transformers model.

    ``LocalBackend(model, tokenizer, layout, steering=[...], row_scales=None, chat=None, rules=())``; ``steering`` is
    a list of ``Intervention`` (e.g. ``load_steering([...], layout)`` or ``vector.interventions(4.0)``); ``rules``
    conditional steering decided per prompt (``PromptRule``); ``row_scales``
    (steering-diversified sampling) multiplies every ``Add`` edit by ``row_scales[i % len(row_scales)]`` in row ``i``
    of each call. ``add_special_tokens``: None (default) adds BOS/EOS to prompts only when no chat template formats
    them; True/False forces it (a server's raw completions prompt). ``hooks``: the ``StandingIntervener`` of the
    engine this backend runs on (its passes run on that engine's thread); None: the backend's own. ``close()``
    removes the backend's own hooks (also on garbage collection, or at the end of ``with LocalBackend(...)``).
    """

    name = "local"

    def __init__(self, model, tokenizer, layout=None, steering: Sequence[Intervention] = (), chat: bool | None = None,
                 max_n: int = 256, prefix_cache_size: int = 4, row_scales: Sequence[float] | None = None,
                 add_special_tokens: bool | None = None, rules: Sequence[PromptRule] = (), logit_contrast=None,
                 block: SpanIndex | None = None, hooks: StandingIntervener | None = None):
        self.model, self.tokenizer, self.layout = model, tokenizer, layout
        self.steering = list(steering)
        self.rules = list(rules)
        self.logit_contrast = LogitContrast.parse(logit_contrast)
        self.block = SamplingParams(block=block).block  # checked where SamplingParams checks it
        if (self.steering or self.rules or self.logit_contrast is not None) and layout is None:
            raise SteerscaleError("steering needs the model's layout", "pass layout= (load_model returns it)")
        if self.logit_contrast is not None:
            check_layout(layout, self.logit_contrast)
        for rule in self.rules:
            if not isinstance(rule, PromptRule):
                raise SteerscaleError(f"rules must be PromptRule objects, got {type(rule).__name__}")
            rule.check(layout)
        self.row_scales = self._check_row_scales(row_scales)
        self.add_special_tokens = add_special_tokens
        self.chat = chat
        self.max_n = max_n
        self.device = next(model.parameters()).device
        self._n_params = sum(p.numel() for p in model.parameters())
        self.tokens = TokenRules(model, tokenizer)  # EOS set, pad id, context window, decode: the decoding core's
        self.context_window = self.tokens.context_window
        self._prefix: dict = {}
        self._prefix_size = prefix_cache_size
        self._hooks = hooks  # the standing hooks every steered pass runs on (``_standing``)
        self._own_hooks = hooks is None
        self.forward_passes = 0  # diagnostic counter (all generator forwards, prompt ones included)

    @classmethod
    def from_pretrained(cls, name: str = "smollm2-135m-instruct", steering=(), **kwargs) -> "LocalBackend":
        from ..models.loading import load_model

        model, tok, layout = load_model(name, **{k: kwargs.pop(k) for k in ("device", "dtype") if k in kwargs})
        return cls(model, tok, layout, steering=steering, **kwargs)

    def _check_row_scales(self, row_scales) -> tuple[float, ...] | None:
        if row_scales is None:
            return None
        try:
            scales = tuple(float(s) for s in row_scales)
        except (TypeError, ValueError):
            raise SteerscaleError(f"row_scales must be numbers, got {row_scales!r}", "e.g. row_scales=[0, 2, 4, 8]") from None
        if not scales or not all(math.isfinite(s) for s in scales):
            raise SteerscaleError(f"row_scales must be one or more finite numbers, got {row_scales!r}")
        if not self.rules and not any(isinstance(iv.edit, Add) for iv in self.steering):
            raise SteerscaleError("row_scales multiply the backend's steering vectors, but it has none",
                                  "construct the backend with steering=... (e.g. --steer VEC) or drop row_scales")
        return scales

    @property
    def n_params(self) -> int:
        return self._n_params

    @property
    def eos_ids(self) -> set[int]:
        return self.tokens.eos_ids

    # -- prompt ---------------------------------------------------------------------------------------------
    def format(self, prompt: str) -> str:
        return format_prompt(self.tokenizer, prompt, self.chat)

    def _adds_special_tokens(self) -> bool:
        if self.add_special_tokens is not None:
            return self.add_special_tokens
        return not has_chat_template(self.tokenizer) or self.chat is False

    def prompt_ids(self, prompt: str) -> list[int]:
        """The token ids this backend feeds the model for ``prompt`` (formatted, special tokens as configured);
        a prompt longer than the context window is a ``SteerscaleError``."""
        text = self.format(prompt)
        enc = self.tokenizer([text], return_tensors="pt", padding=False, add_special_tokens=self._adds_special_tokens())
        ids = enc["input_ids"][0].tolist()
        if not ids:
            raise SteerscaleError("the prompt encodes to no tokens", "pass a non-empty prompt")
        if self.context_window and len(ids) >= self.context_window:
            raise SteerscaleError(
                f"prompt is {len(ids)} tokens but the model's context window is {self.context_window}",
                "shorten the prompt (fewer few-shot examples) or use a model with a longer context")
        return ids

    def _interventions(self, scales: torch.Tensor | None, decided=()) -> list[Intervention]:
        steering = self.steering + list(decided)
        if scales is None or not steering:
            return steering
        out = []
        for iv in steering:
            if isinstance(iv.edit, Add):
                edit = Add(iv.edit.vector, iv.edit.scale * scales, preserve_norm=iv.edit.preserve_norm)
                iv = dataclasses.replace(iv, edit=edit)  # its scope, rows and gate kept
            out.append(iv)
        return out

    def _steered(self, scales, prompt_width, decided=(), observers=(), latches=None):
        """The edits (and reads) of one forward pass, on the backend's standing hooks; ``latches``: the token
        gates' latches of the pass's rows, updated in place."""
        ivs = self._interventions(scales, decided)
        if not ivs and not observers:
            return contextlib.nullcontext()
        return self._standing().running(ivs, observers, prompt_width=prompt_width, latches=latches)

    def _standing(self) -> StandingIntervener:
        """The hooks steered passes run on: attached at the first one (at every steering site), kept until
        ``close()`` (or garbage collection), so no call or decoding step registers hooks."""
        if self._hooks is None:
            self._hooks = StandingIntervener(self.layout).attach()
            self._hooks.prepare(iv.site for iv in self.steering)
            weakref.finalize(self, self._hooks.close)
        return self._hooks

    def close(self) -> None:
        """Remove the backend's hooks from the model (a later steered pass attaches them again)."""
        if self._own_hooks and self._hooks is not None:
            self._hooks.close()
            self._hooks = None

    def __enter__(self) -> "LocalBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _decide(self, ids: list[int], budget: Budget | None) -> list[Intervention] | None:
        """The prompt rules' edits for this prompt (scalar scales: every row of it gets the same); None when the
        budget cannot pay for the reading pass (no budget: not charged)."""
        if not self.rules:
            return []
        if budget is not None and not budget.buy_prompt(len(ids), 1, self.n_params):
            return None
        x = torch.tensor([ids], device=self.device)
        edits, _ = prompt_interventions(self.model, self.layout, self.rules, Batch(x, torch.ones_like(x)))
        return [Intervention(iv.site, Add(iv.edit.vector, float(iv.edit.scale[0]), preserve_norm=iv.edit.preserve_norm),
                             iv.scope) for iv in edits
                if float(iv.edit.scale[0]) != 0.0]

    def _forward(self, input_ids, mask, position_ids, cache, scales, prompt_width, decided=(), latches=None):
        self.forward_passes += 1
        refresh_threads(self.device)  # a clock read; the machine re-read at most once a second (models/threads.py)
        # the distribution every strategy samples, scores and charges as "the model's": the logit contrast's, if any
        early = early_reader(self.layout, self.model, [self.logit_contrast])
        with self._steered(scales, prompt_width, decided, early.observers() if early else (), latches):
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **with_cache(self.model, cache),
                             use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        return contrast_rows(self.model, self.layout, logits, [self.logit_contrast] * len(logits), early), cache_of(out)

    def _encode(self, prompt: str, n: int, budget: Budget, seed) -> _KV | None:
        """The prompt's decoding state expanded to ``n`` rows; None when the budget cannot pay for the prompt."""
        ids = self.prompt_ids(prompt)
        scales = None
        if self.row_scales is not None:
            scales = torch.tensor([self.row_scales[i % len(self.row_scales)] for i in range(n)], dtype=torch.float32)
        uniq, inverse = (torch.unique(scales, return_inverse=True) if scales is not None else (None, torch.zeros(n, dtype=torch.long)))
        key = (tuple(ids), None if uniq is None else tuple(uniq.tolist()), budget.uid)
        hit = self._prefix.get(key)
        if hit is None:
            decided = self._decide(ids, budget)
            u = 1 if uniq is None else uniq.numel()
            if decided is None or not budget.buy_prompt(len(ids), u, self.n_params):
                return None
            inp = torch.tensor([ids] * u, device=self.device)
            mask = torch.ones_like(inp)
            pos = torch.arange(len(ids), device=self.device)[None].expand(u, -1)
            latches: dict = {}  # token gates: read from the last prompt token on
            logits, cache = self._forward(inp, mask, pos, None, uniq, None, decided, latches)
            hit = _KV(cache, mask, logits, None, None, len(ids), ids, decided, latches)
            self._prefix[key] = hit
            while len(self._prefix) > self._prefix_size:
                self._prefix.pop(next(iter(self._prefix)))
        idx = inverse.to(self.device)
        return _KV(map_cache(hit.cache, lambda t: t.index_select(0, idx)), hit.mask.index_select(0, idx),
                   hit.logits.index_select(0, idx), scales, seeded_generator(seed), len(ids), ids, hit.decided,
                   hit.rows(idx))

    # -- token choice: the decoding core's (engine/decoding.py) ----------------------------------------------
    choose = staticmethod(sample_next)

    def decode(self, ids: list[int]) -> str:
        """Text of generated token ids (EOS and special tokens dropped), as candidates' texts are built."""
        return self.tokens.decode(ids)

    def with_block(self, params: SamplingParams) -> SamplingParams:
        """``params`` with this backend's provenance veto (``block=``) when they carry none."""
        return params.with_(block=self.block) if self.block is not None and params.block is None else params

    # -- the decoding loop shared by sample() and extend() ----------------------------------------------------
    def _run(self, rows: list[Candidate], kv: _KV, params: SamplingParams, budget: Budget, stepwise: bool,
             keep_state: bool) -> _KV:
        """Grow ``rows`` by one call (a whole sample, or one step) with the decoding core's loop, buying every token
        from ``budget`` first; the KV state moves on in ``kv``."""
        params = self.with_block(params)
        calls = [RowCall(before=c.n_tokens, prev=c.text) for c in rows]
        # the prompt's width: the cache's columns less what the longest row generated (merged rows share padding)
        limit = self.tokens.limit(params, kv.mask.shape[1] - max(c.n_tokens for c in rows))

        def grant(live: int) -> int:
            if not live or budget.exhausted:  # wall time: checked here, between tokens
                return 0
            return budget.buy_tokens(live, self.n_params)

        def forward(inp: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
            pos = kv.mask.sum(-1, keepdim=True)  # position = number of real tokens before this one
            kv.mask = torch.cat([kv.mask, fed.long()[:, None]], dim=1)
            logits, kv.cache = self._forward(inp[:, None], kv.mask, pos, kv.cache, kv.scales, kv.prompt_width,
                                             kv.decided, kv.latches)
            return logits

        ends, kv.logits = decode_rows(
            calls, kv.logits, params, self.tokens, kv.generator, forward, limit=limit,
            steps=params.max_step_tokens if stepwise else limit, prompt_ids=[kv.prompt_ids] * len(rows),
            earlier=[r.token_ids for r in rows], done=[c.finished for c in rows], stepwise=stepwise, grant=grant,
            feed_last=keep_state)
        for row, call, end in zip(rows, calls, ends):
            if end is not None:
                row.finished, row.finish_reason = True, end
            _close(row, call, stepwise)  # a row still going here ended its step (or hit max_step_tokens)
        return kv

    # -- Backend API ----------------------------------------------------------------------------------------
    def _new_rows(self, kv: _KV | None, n: int) -> list[Candidate]:
        if kv is None:  # the budget could not pay for the prompt
            return [Candidate(finished=True, finish_reason=FinishReason.BUDGET) for _ in range(n)]
        return [Candidate(meta={"steer_scale": float(kv.scales[i])} if kv.scales is not None else {})
                for i in range(n)]

    @torch.no_grad()
    def sample(self, prompt, n, params, budget, *, seed=None) -> list[Candidate]:
        self.check_n(n)
        kv = self._encode(prompt, n, budget, seed)
        rows = self._new_rows(kv, n)
        if kv is not None:
            self._run(rows, kv, params, budget, stepwise=False, keep_state=False)
        return rows

    @torch.no_grad()
    def start(self, prompt, n, budget, *, seed=None) -> Branches:
        self.check_n(n)
        kv = self._encode(prompt, n, budget, seed)
        return Branches(prompt, self._new_rows(kv, n), kv)

    @torch.no_grad()
    def extend(self, branches, params, budget) -> Branches:
        if branches.handle is None and branches.all_finished:  # a prompt the budget could not pay for
            return branches
        if not isinstance(branches.handle, _KV):
            raise SteerscaleError("these branches were not made by this LocalBackend", "use backend.start(...) first")
        if branches.rows and not branches.all_finished:
            branches.handle = self._run(branches.rows, branches.handle, params, budget, stepwise=True, keep_state=True)
        return branches

    def select(self, branches, indices) -> Branches:
        idx = self.check_select(branches, indices)
        kv: _KV = branches.handle
        if kv is None:
            return Branches(branches.prompt, [branches.rows[i].copy() for i in idx], None)
        t = torch.tensor(idx, device=self.device)
        new = _KV(map_cache(kv.cache, lambda x: x.index_select(0, t)), kv.mask.index_select(0, t),
                  kv.logits.index_select(0, t), None if kv.scales is None else kv.scales.index_select(0, t.cpu()),
                  kv.generator, kv.prompt_width, kv.prompt_ids, kv.decided, kv.rows(t))
        return Branches(branches.prompt, [branches.rows[i].copy() for i in idx], new)

    def merge(self, parts) -> Branches:
        parts = self.check_merge(parts)
        parts = [p for p in parts if p.handle is not None] or parts[:1]
        if len(parts) == 1:
            return parts[0]
        kvs: list[_KV] = [p.handle for p in parts]
        widths = [k.mask.shape[1] for k in kvs]
        total = max(widths)
        mask = torch.cat([torch.cat([k.mask.new_zeros(k.mask.shape[0], total - w), k.mask], 1) for k, w in zip(kvs, widths)])
        has_scales = any(k.scales is not None for k in kvs)
        scales = torch.cat([k.scales if k.scales is not None else torch.ones(k.mask.shape[0]) for k in kvs]) if has_scales else None
        # a latch is a real-token index, so rows keep theirs whatever padding the merge adds
        latches = {gid: torch.cat([k.latches[gid] for k in kvs]) for gid in kvs[0].latches}
        kv = _KV(cat_caches([k.cache for k in kvs], widths, total), mask, torch.cat([k.logits for k in kvs]), scales,
                 kvs[0].generator, kvs[0].prompt_width + (total - widths[0]), kvs[0].prompt_ids, kvs[0].decided,
                 latches)
        # prompt_width is only used by steering scopes; rows with different padding see their own real positions
        return Branches(parts[0].prompt, [r for p in parts for r in p.rows], kv)

    @torch.no_grad()
    def token_logprobs(self, ids: list[int], k: int = 0, prompt_width: int | None = None):
        """Teacher-forced log-prob of tokens 1.. of ``ids`` under this backend's steering (its prompt rules decided on
        the prompt), and the ``k`` most likely tokens ``(id, log-prob)`` at each of those positions
        (``engine.decoding.score_tokens``). Not charged to any budget: it scores what was already generated."""
        decided = self._decide(ids[:prompt_width] if prompt_width else ids, None)
        steering = self.steering + decided
        return score_tokens(self.model, self.layout, ids, steering, k=k, prompt_width=prompt_width,
                            logit_contrast=self.logit_contrast, hooks=self._standing() if steering else None)

    @torch.no_grad()
    def choice_logprobs(self, contexts, options, budget) -> list[list[float]]:
        if not contexts:
            return []
        first = []
        for o in options:
            ids = self.tokenizer([o], return_tensors="pt", padding=False, add_special_tokens=False)["input_ids"][0]
            if len(ids) == 0:
                raise SteerscaleError(f"option {o!r} encodes to no tokens")
            first.append(int(ids[0]))
        texts = [self.format(c) for c in contexts]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=self._adds_special_tokens())
        k = budget.buy_verifier(enc["attention_mask"].sum(-1).tolist(), self.n_params)
        out = [[math.nan] * len(first) for _ in texts]  # passes the budget cannot pay for stay unscored
        if k:
            ids, mask = enc["input_ids"][:k].to(self.device), enc["attention_mask"][:k].to(self.device)
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                                logits_to_keep=1).logits
            out[:k] = torch.log_softmax(logits[:, -1].float(), -1)[:, first].tolist()
        return out

    @torch.no_grad()
    def embed(self, texts, budget, *, layer=-1) -> torch.Tensor:
        """``(len(texts), hidden)`` float32 (on CPU): each text's hidden states at ``layer`` (index into
        ``hidden_states``: 0 the embeddings, -1 the last layer), mean-pooled over its tokens. One forward pass of
        the raw texts (no chat template, no special tokens, no steering), charged as verifier passes/tokens and
        FLOPs."""
        texts = list(texts)
        if not texts:
            raise SteerscaleError("embed() needs at least one text")
        if any(not isinstance(t, str) for t in texts):
            raise SteerscaleError("embed() takes a list of strings")
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        lengths = mask.sum(-1)
        if bool((lengths == 0).any()):
            bad = int((lengths == 0).nonzero()[0, 0])
            raise SteerscaleError(f"text {bad} ({texts[bad]!r}) encodes to no tokens", "embed non-empty texts")
        if self.context_window and ids.shape[1] > self.context_window:
            raise SteerscaleError(f"a text to embed is {ids.shape[1]} tokens but the context window is "
                                  f"{self.context_window}", "shorten the texts")
        n_hidden = int(getattr(getattr(self.model, "config", None), "num_hidden_layers", 0) or 0) + 1
        if n_hidden > 1 and not -n_hidden <= layer < n_hidden:
            raise SteerscaleError(f"embed layer {layer} out of range for {n_hidden} hidden states",
                                  f"use -{n_hidden}..{n_hidden - 1} (-1: the last layer)")
        k = budget.buy_verifier(lengths.tolist(), self.n_params)
        dim = int(self.model.get_input_embeddings().weight.shape[-1])
        result = torch.full((len(texts), dim), math.nan)  # texts the budget cannot pay for stay unembedded
        if k:
            ids, mask = ids[:k], mask[:k]
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            hidden = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                                output_hidden_states=True, logits_to_keep=1).hidden_states
            h = hidden[layer].float()
            m = mask[..., None].to(h.dtype)
            result[:k] = ((h * m).sum(1) / m.sum(1)).cpu()
        return result

