"""Causal tracing (corrupt and restore; Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

Where in the network is a behaviour computed? Three runs of one prompt:

* clean: the prompt as written; the metric is the probability (or log-probability) of a target completion, or the
  contrast ``log p(target) - log p(foil)`` (e.g. a true vs a false TruthfulQA answer);
* corrupted: Gaussian noise (std = ``noise`` x the std of the model's token embeddings) is added to the embeddings
  of the corrupted tokens (the ``subject`` substring, else the whole user text), at the input of block 0, for
  ``samples`` noise draws; the metric drops;
* restored: the corrupted run again, except that at one site (layer L, kind K) and one token position p the hidden
  state is set back to its clean value. The indirect effect of (L, p) is ``metric(restored) - metric(corrupted)``:
  how much of the behaviour that one state carries.

Kinds: ``resid_post`` (the block's output), ``mlp_out`` and ``attn_out`` (restored over a ``window`` of adjacent
layers centred on L, as in ROME: one module's output alone carries little), ``head_out`` (one head of layer L at
every traced position: a layers x heads map).

Batching: a forward pass carries many restorations at once. Every row is the same prompt; row r adds noise draw
``s_r`` and restores its own position (or head): the edits are ``Lambda``s that index per row, attached through
the one hook place, ``engine.runtime.intervene``. Rows share the shared-prompt packed scorer of
``engine.choices`` (target and foil ride in one row behind the prompt), so a contrast costs one forward, not two.
The same noise draws are used for the corrupted baseline and every restoration (paired differences: less noise
in the effects).

Positions before the first corrupted token see the same (clean) values in the corrupted run, so restoring them
changes nothing: by default the traced positions run from the first corrupted token to the last prompt token.
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..engine.choices import Item, choice_logprob_sums, encode, head_is_separable
from ..engine.generation import format_prompt, has_chat_template
from ..engine.ops import Lambda
from ..engine.runtime import Intervention, Observer, intervene, observe
from ..errors import SteerscaleError
from ..models.layout import ModelLayout
from ..models.sites import Site, SiteKind

FORMAT = "steerscale.trace"
KINDS = ("resid_post", "mlp_out", "attn_out", "head_out")
METRICS = ("prob", "logprob", "contrast")
# ROME's position classes for averaging over prompts whose corrupted spans differ in length and place.
CLASSES = ("first corrupted", "middle corrupted", "last corrupted", "first after", "further", "last token")


@dataclass(frozen=True)
class TraceCase:
    """One prompt to trace: the completion ``target`` (and optionally a ``foil`` to contrast it with) after
    ``prompt``; ``subject`` is the substring whose tokens are corrupted (default: the whole prompt text)."""

    prompt: str
    target: str
    foil: str | None = None
    subject: str | None = None

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise SteerscaleError("empty prompt", "give the text to trace, e.g. 'The Eiffel Tower is located in'")
        if not isinstance(self.target, str) or not self.target.strip():
            raise SteerscaleError(f"empty target for prompt {self.prompt[:60]!r}",
                                  "give the completion whose probability is traced, e.g. ' Paris'")
        if self.foil is not None and (not isinstance(self.foil, str) or not self.foil.strip()):
            raise SteerscaleError(f"empty foil for prompt {self.prompt[:60]!r}", "give a non-empty foil, or none")
        if self.foil is not None and self.foil == self.target:
            raise SteerscaleError(f"foil equals target ({self.target!r})", "the foil is the alternative to contrast")
        if self.subject is not None and (not isinstance(self.subject, str) or not self.subject.strip()):
            raise SteerscaleError("empty subject", "give a substring of the prompt, or none to corrupt all of it")

    @classmethod
    def from_dict(cls, obj: dict, where: str = "") -> "TraceCase":
        if not isinstance(obj, dict) or "prompt" not in obj or "target" not in obj:
            raise SteerscaleError(f"{where}: a trace case needs 'prompt' and 'target' fields",
                                  '{"prompt": "The Eiffel Tower is in", "target": " Paris", "subject": "Eiffel Tower"}')
        try:
            return cls(obj["prompt"], obj["target"], obj.get("foil"), obj.get("subject"))
        except SteerscaleError as exc:
            raise SteerscaleError(f"{where}: {exc.problem}" if where else exc.problem, exc.hint) from None


@dataclass(frozen=True)
class Encoded:
    """A case as token ids: the prompt and its continuations (target, then foil), the prompt's token strings and
    the corrupted prompt columns (a contiguous span)."""

    item: Item
    tokens: tuple[str, ...]
    corrupt: tuple[int, ...]
    chat: bool


def _token_text(tokenizer, i: int) -> str:
    try:
        return tokenizer.decode([i], skip_special_tokens=False)
    except TypeError:  # the tests' tiny tokenizers
        return tokenizer.decode([i])


def _offsets(tokenizer, text: str, special: bool, ids: list[int]) -> list[tuple[int, int]] | None:
    """Character offsets of ``ids`` in ``text`` from a fast tokenizer; None when it cannot give them (or they
    would not describe exactly these ids)."""
    try:
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    except (TypeError, NotImplementedError, ValueError):
        return None
    if list(enc.get("input_ids", [])) != ids or "offset_mapping" not in enc:
        return None
    return [tuple(o) for o in enc["offset_mapping"]]


def token_span(tokenizer, text: str, ids: list[int], start: int, end: int, special: bool) -> tuple[int, ...]:
    """Columns of the tokens of ``ids`` (the encoding of ``text``) that overlap characters ``[start, end)``.

    Offsets from a fast tokenizer when it has them (special tokens have empty offsets, so a BOS is never
    included); otherwise by encoding the text up to ``start`` and up to ``end`` and checking that those encodings
    are prefixes of ``ids`` (if not, whitespace before ``start`` joins the span: BPE attaches a space to the next
    word)."""
    offsets = _offsets(tokenizer, text, special, ids)
    if offsets is not None:
        return tuple(i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start)
    through = encode(tokenizer, text[:end], special)
    for s in (start, len(text[:start].rstrip())):
        before = encode(tokenizer, text[:s], special) if (s or special) else []
        if ids[: len(before)] == before and ids[: len(through)] == through:
            return tuple(range(len(before), len(through)))
    raise SteerscaleError(f"cannot map characters {start}..{end} of the prompt to tokens with this tokenizer",
                          "use a fast (HF tokenizers) tokenizer, or a subject that starts and ends on word boundaries")


def encode_case(tokenizer, case: TraceCase, chat: bool | None = None) -> Encoded:
    """Token ids of ``case`` as ``engine.choices.build_items`` makes them (chat template when the tokenizer has
    one and ``chat`` is not False; the completion is the assistant's reply; without a template it follows the
    prompt as written), and the corrupted span located inside the user's text."""
    use_chat = has_chat_template(tokenizer) if chat is None else bool(chat)
    text = format_prompt(tokenizer, case.prompt, chat=use_chat)
    special = not use_chat  # chat templates write their own BOS
    ids = encode(tokenizer, text, special)
    if not ids:
        raise SteerscaleError(f"prompt {case.prompt[:60]!r} encodes to no tokens")
    user = case.prompt.strip()
    base = text.rfind(user)  # the user's text inside the template (the last occurrence: after any system text)
    if base < 0:
        raise SteerscaleError("the chat template changed the prompt's text, so its tokens cannot be located",
                              "trace without the chat template (chat=False, --no-chat)")
    start, end = base, base + len(user)
    if case.subject is not None:
        sub = case.subject.strip()
        at = text.find(sub, base, end)
        if at < 0:
            raise SteerscaleError(f"subject {case.subject!r} not found in prompt {case.prompt!r}",
                                  "give a subject that occurs in the prompt exactly (case and spelling included)")
        start, end = at, at + len(sub)
    corrupt = token_span(tokenizer, text, ids, start, end, special)
    if not corrupt:
        raise SteerscaleError(f"the corrupted text {text[start:end]!r} covers no token", "give a longer subject")
    sep = "" if use_chat or text.endswith((" ", "\n")) else " "
    conts = []
    for c in (case.target, case.foil):
        if c is None:
            continue
        # A target written with its own leading space (ROME style: " Paris") keeps it; otherwise lm-eval's
        # convention applies (a space between prompt and completion when there is no chat template).
        cid = encode(tokenizer, c if c[:1].isspace() else sep + c, False)
        if not cid:
            raise SteerscaleError(f"completion {c!r} encodes to no tokens", "give a non-empty completion")
        conts.append(cid)
    return Encoded(Item(ids, conts), tuple(_token_text(tokenizer, i) for i in ids), corrupt, use_chat)


def embedding_std(model, max_rows: int = 4096) -> float:
    """Std of the token embeddings as block 0 sees them (the embedding module's output, so Gemma's sqrt(d) scale is
    included), over at most ``max_rows`` evenly spaced vocabulary rows. ROME scales its noise by this."""
    emb = model.get_input_embeddings()
    n = emb.weight.shape[0]
    ids = torch.linspace(0, n - 1, steps=min(n, max_rows), device=emb.weight.device).long()
    with torch.no_grad():
        return float(emb(ids).float().std())


# -- the edits (row-indexed Lambdas) -------------------------------------------------------------------------
def _add_noise(cols: torch.Tensor, noise: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``h[r, cols] += noise[r]`` for every row r; noise is (batch, len(cols), dim)."""
    if h.shape[0] != noise.shape[0]:
        raise SteerscaleError(f"noise for {noise.shape[0]} rows but the batch has {h.shape[0]}")
    out = h.clone()
    out[:, cols.to(h.device)] += noise.to(device=h.device, dtype=h.dtype)
    return out


def _restore(mask: torch.Tensor, clean: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Where ``mask[r, t]``, the clean value ``clean[t]``; elsewhere ``h`` unchanged."""
    if mask.shape != h.shape[:2] or clean.shape != h.shape[1:]:
        raise SteerscaleError(f"restore mask {tuple(mask.shape)} / clean {tuple(clean.shape)} do not fit the "
                              f"activation {tuple(h.shape)}")
    return torch.where(mask.to(h.device)[..., None], clean.to(device=h.device, dtype=h.dtype)[None], h)


@torch.no_grad()
def clean_run(lm, enc: Encoded, sites: Sequence[Site]) -> tuple[torch.Tensor, dict[Site, torch.Tensor]]:
    """The clean per-choice log-prob sums ``(n_choices,)`` and the clean activation ``(width, dim)`` at every site
    (the whole packed row: prompt and continuations)."""
    acts: dict[Site, torch.Tensor] = {}

    def keep(site, h):
        acts[site] = h[0].detach().clone()

    with observe(lm.layout, [Observer(s, partial(keep, s)) for s in sites]):
        sums = choice_logprob_sums(lm.model, [enc.item], _pad_id(lm.tokenizer))
    return sums[0], acts


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad is None else int(pad)


@torch.no_grad()
def run_rows(lm, enc: Encoded, noise: torch.Tensor | None, restores: dict[Site, torch.Tensor],
             clean: dict[Site, torch.Tensor]) -> torch.Tensor:
    """Per-choice log-prob sums ``(rows, n_choices)`` of one batch: row r adds ``noise[r]`` (``(rows, n_corrupt,
    hidden)``; None: clean) to the corrupted tokens' embeddings, and at each site of ``restores`` sets the
    positions where its ``(rows, width)`` mask is true to their clean values."""
    rows = noise.shape[0] if noise is not None else next(iter(restores.values())).shape[0] if restores else 1
    ivs = []
    if noise is not None:
        cols = torch.tensor(enc.corrupt)
        ivs.append(Intervention(Site(0, SiteKind.RESID_PRE), Lambda(partial(_add_noise, cols, noise))))
    for site, mask in restores.items():
        ivs.append(Intervention(site, Lambda(partial(_restore, mask, clean[site]), lm.layout.site_dim(site))))
    with intervene(lm.layout, ivs):
        return choice_logprob_sums(lm.model, [enc.item] * rows, _pad_id(lm.tokenizer))


def metric_of(sums: torch.Tensor, metric: str) -> torch.Tensor:
    """The traced quantity from per-choice log-prob sums ``(..., n_choices)``: ``prob`` = p(target),
    ``logprob`` = log p(target), ``contrast`` = log p(target) - log p(foil)."""
    if metric == "prob":
        return sums[..., 0].exp()
    if metric == "logprob":
        return sums[..., 0]
    return sums[..., 0] - sums[..., 1]


def _window(layer: int, window: int, n_layers: int) -> list[int]:
    """ROME's window: ``window`` adjacent layers centred on ``layer``, clipped to the model."""
    lo = max(0, layer - window // 2)
    return list(range(lo, min(n_layers, layer - window // 2 + window)))


def _site(kind: str, layer: int, head: int | None = None) -> Site:
    return Site(layer, SiteKind(kind), head)


def _check_knobs(layout: ModelLayout, kind: str, layers, samples: int, noise: float, window: int | None,
                 metric: str, has_foil: bool, batch_size: int) -> tuple[list[int], int, str]:
    if kind not in KINDS:
        raise SteerscaleError(f"unknown trace kind {kind!r}", f"use one of: {', '.join(KINDS)}")
    if kind == "head_out" and (layout.n_heads < 1 or not layout.out_projs):
        raise SteerscaleError(f"this {layout.architecture} model has no attention heads to restore",
                              "trace kind resid_post, mlp_out or attn_out")
    layers = list(range(layout.n_layers)) if layers is None else [int(x) for x in layers]
    if not layers:
        raise SteerscaleError("no layers to trace", "give at least one layer, or none for all")
    for layer in layers:
        layout.check_layer(layer)
    if not isinstance(samples, int) or samples < 1:
        raise SteerscaleError(f"samples must be a positive integer, got {samples!r}", "ROME uses 10; 3-5 is enough")
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise SteerscaleError(f"noise must be a finite number >= 0, got {noise!r}", "ROME uses 3 (x embedding std)")
    if window is None:
        window = 1 if kind in ("resid_post", "head_out") else max(1, layout.n_layers // 5)
    if not isinstance(window, int) or window < 1:
        raise SteerscaleError(f"window must be a positive integer, got {window!r}")
    if metric is None:
        metric = "contrast" if has_foil else "prob"
    if metric not in METRICS:
        raise SteerscaleError(f"unknown metric {metric!r}", f"use one of: {', '.join(METRICS)}")
    if (metric == "contrast") != has_foil:
        raise SteerscaleError(f"metric {metric!r} " + ("needs a foil" if metric == "contrast" else "ignores the foil"),
                              "contrast is log p(target) - log p(foil): give a foil exactly when you use it")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SteerscaleError(f"batch_size must be a positive integer, got {batch_size!r}")
    return layers, window, metric


def _positions(enc: Encoded, positions) -> list[int]:
    n = len(enc.item.prompt)
    if positions is None:
        return list(range(enc.corrupt[0], n))
    out = []
    for p in positions:
        q = int(p) + n if int(p) < 0 else int(p)
        if not 0 <= q < n:
            raise SteerscaleError(f"position {p} is outside the prompt ({n} tokens)",
                                  f"use prompt token indices 0..{n - 1} (negative: from the end)")
        out.append(q)
    return sorted(set(out))


@torch.no_grad()
def trace(lm, prompt: str | TraceCase, target: str | None = None, foil: str | None = None, subject: str | None = None,
          kind: str = "resid_post", layers: Sequence[int] | None = None, samples: int = 5, noise: float = 3.0,
          window: int | None = None, positions: Sequence[int] | None = None, head_positions: str = "all",
          metric: str | None = None, chat: bool | None = None, seed: int = 0, batch_size: int = 32,
          progress: bool = True) -> "TraceResult":
    """Causal trace of one prompt: the indirect effect of restoring each (layer, position), or (layer, head).

    ``noise``: the noise std in units of the embedding std (``embedding_std``; ROME uses 3); ``samples``: noise
    draws averaged; ``window``: layers restored together around each layer (default 1 for ``resid_post`` and
    ``head_out``, ``n_layers // 5`` for ``mlp_out``/``attn_out``); ``positions``: prompt token indices to trace
    (negative from the end; default every position from the first corrupted token on); ``head_positions``: where a
    head is restored, ``all`` (the traced positions) or ``corrupted``; ``metric``: ``prob`` (default), ``logprob``
    or ``contrast`` (the default with a foil). ``batch_size``: rows per forward pass."""
    case = prompt if isinstance(prompt, TraceCase) else TraceCase(prompt, target, foil, subject)
    layout = lm.layout
    layers, window, metric = _check_knobs(layout, kind, layers, samples, noise, window, metric,
                                          case.foil is not None, batch_size)
    if head_positions not in ("all", "corrupted"):
        raise SteerscaleError(f"unknown head_positions {head_positions!r}", "use all or corrupted")
    enc = encode_case(lm.tokenizer, case, chat)
    cols = _positions(enc, positions)
    width = len(enc.item.prompt) + sum(map(len, enc.item.choices))
    if kind == "head_out":
        sites = [Site(layer, SiteKind.HEAD_OUT, h) for layer in layers for h in range(layout.n_heads)]
    else:
        sites = [_site(kind, x) for x in sorted({w for layer in layers for w in _window(layer, window,
                                                                                      layout.n_layers)})]
    head_is_separable(lm.model)  # decided once now, not under the per-row edits below (it runs a 1-row forward)
    clean_sums, clean = clean_run(lm, enc, sites)
    std = embedding_std(lm.model) * float(noise)
    gen = torch.Generator().manual_seed(int(seed))
    draws = torch.randn(samples, len(enc.corrupt), layout.hidden_size, generator=gen) * std

    corrupted = metric_of(run_rows(lm, enc, draws, {}, clean), metric).double().mean().item()
    # Each layer's rows: (noise draw, restored column or head), chunked into forward passes of batch_size rows.
    units = list(range(layout.n_heads)) if kind == "head_out" else cols
    head_cols = cols if head_positions == "all" else [c for c in cols if c in enc.corrupt]
    effects = torch.zeros(len(layers), len(units), dtype=torch.float64)
    rows = [(s, u) for u in range(len(units)) for s in range(samples)]
    bar = tqdm(total=len(layers) * math.ceil(len(rows) / batch_size), desc=f"tracing {kind}", disable=not progress,
               unit="batch")
    for li, layer in enumerate(layers):
        values = torch.zeros(len(rows), dtype=torch.float64)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            noise_rows = draws[[s for s, _ in chunk]]
            restores: dict[Site, torch.Tensor] = {}
            if kind == "head_out":
                for r, (_, u) in enumerate(chunk):
                    mask = restores.setdefault(Site(layer, SiteKind.HEAD_OUT, units[u]),
                                               torch.zeros(len(chunk), width, dtype=torch.bool))
                    mask[r, head_cols] = True
            else:
                for w in _window(layer, window, layout.n_layers):
                    mask = torch.zeros(len(chunk), width, dtype=torch.bool)
                    mask[torch.arange(len(chunk)), torch.tensor([units[u] for _, u in chunk])] = True
                    restores[_site(kind, w)] = mask
            sums = run_rows(lm, enc, noise_rows, restores, clean)
            values[start: start + len(chunk)] = metric_of(sums, metric).double()
            bar.update(1)
        effects[li] = values.view(len(units), samples).mean(-1) - corrupted
    bar.close()
    clean_metric = float(metric_of(clean_sums, metric))
    labels = tuple(f"h{h}" for h in units) if kind == "head_out" else tuple(enc.tokens[c] for c in cols)
    meta = {"model": getattr(lm, "name", None), "n_layers": layout.n_layers, "prompt": case.prompt,
            "target": case.target, "foil": case.foil, "subject": case.subject, "samples": samples, "noise": noise,
            "noise_std": std, "window": window, "seed": seed, "chat": enc.chat, "n_prompts": 1,
            "corrupted_text": "".join(enc.tokens[c] for c in enc.corrupt)}
    if kind == "head_out":
        meta["head_positions"] = head_positions
    return TraceResult(kind=kind, metric=metric, layers=tuple(layers), labels=labels,
                       columns=tuple(units), axis="head" if kind == "head_out" else "position",
                       effects=effects, clean=clean_metric, corrupted=corrupted, tokens=enc.tokens,
                       corrupt=enc.corrupt, metadata=meta)


def trace_many(lm, cases: Sequence[TraceCase | dict], progress: bool = True, **knobs) -> list["TraceResult"]:
    """``trace`` for each case (``TraceCase`` or ``{"prompt", "target", "foil"?, "subject"?}``); ``aggregate``
    averages the results."""
    cases = [c if isinstance(c, TraceCase) else TraceCase.from_dict(c, f"case {i}") for i, c in enumerate(cases)]
    if not cases:
        raise SteerscaleError("no prompts to trace", "give at least one prompt")
    if len({c.foil is None for c in cases}) > 1:
        raise SteerscaleError("some cases have a foil and some do not", "give every case a foil, or none")
    return [trace(lm, c, progress=False, **knobs)
            for c in tqdm(cases, desc="tracing prompts", disable=not progress, unit="prompt")]


def position_class(col: int, corrupt: Sequence[int], last: int) -> str:
    """ROME's class of prompt column ``col``: inside the corrupted span (first, middle, last), the first token
    after it, the last prompt token, or further tokens in between (a corrupted column keeps its span class)."""
    first, end = corrupt[0], corrupt[-1]
    if first <= col <= end:
        return "last corrupted" if col == end else "first corrupted" if col == first else "middle corrupted"
    if col == last:
        return "last token"
    return "first after" if col == end + 1 else "further"


def aggregate(results: Sequence["TraceResult"]) -> "TraceResult":
    """The mean over prompts: per (layer, position class) for position traces (a class a prompt lacks is left out
    of that cell's mean), per (layer, head) for head traces. Every result must have the same kind, metric and
    layers."""
    results = list(results)
    if not results:
        raise SteerscaleError("nothing to aggregate", "trace at least one prompt")
    first = results[0]
    for r in results[1:]:
        if (r.kind, r.metric, r.layers, r.axis) != (first.kind, first.metric, first.layers, first.axis):
            raise SteerscaleError("cannot aggregate traces of different kinds, metrics or layers",
                                  "trace every prompt with the same knobs")
    if first.axis == "class":
        raise SteerscaleError("these traces are already aggregated")
    if first.axis == "head":
        if len({r.columns for r in results}) > 1:
            raise SteerscaleError("head traces of different models cannot be aggregated")
        effects = torch.stack([r.effects for r in results]).mean(0)
        labels, columns = first.labels, first.columns
    else:
        grid = np.full((len(results), len(first.layers), len(CLASSES)), np.nan)
        for i, r in enumerate(results):
            last = len(r.tokens) - 1
            by_class: dict[int, list[int]] = {}
            for j, col in enumerate(r.columns):
                by_class.setdefault(CLASSES.index(position_class(col, r.corrupt, last)), []).append(j)
            for k, js in by_class.items():
                grid[i, :, k] = r.effects[:, js].mean(-1).numpy()
        with np.errstate(all="ignore"):
            counts = (~np.isnan(grid)).sum(0)
            mean = np.where(counts > 0, np.nansum(grid, 0) / np.maximum(counts, 1), np.nan)
        keep = [k for k in range(len(CLASSES)) if counts[0, k] > 0]
        effects = torch.tensor(mean[:, keep], dtype=torch.float64)
        labels, columns = tuple(CLASSES[k] for k in keep), tuple(keep)
    meta = {key: first.metadata.get(key) for key in ("model", "n_layers", "samples", "noise", "window", "seed",
                                                      "chat", "head_positions") if key in first.metadata}
    meta.update(n_prompts=len(results), per_prompt=[
        {"prompt": r.metadata.get("prompt"), "target": r.metadata.get("target"), "foil": r.metadata.get("foil"),
         "subject": r.metadata.get("subject"), "clean": r.clean, "corrupted": r.corrupted,
         "peak_effect": float(r.effects.max())} for r in results])
    return TraceResult(kind=first.kind, metric=first.metric, layers=first.layers, labels=labels, columns=columns,
                       axis="head" if first.axis == "head" else "class", effects=effects,
                       clean=float(np.mean([r.clean for r in results])),
                       corrupted=float(np.mean([r.corrupted for r in results])), metadata=meta)


@dataclass(frozen=True, eq=False)
class TraceResult:
    """A causal trace: ``effects[i, j]`` is the indirect effect (metric restored - metric corrupted) of restoring
    layer ``layers[i]`` at column ``columns[j]`` (a prompt token index for ``axis == "position"``, a position
    class for ``"class"`` (aggregated over prompts), a head for ``"head"``); ``labels`` name the columns."""

    kind: str
    metric: str
    layers: tuple[int, ...]
    labels: tuple[str, ...]
    columns: tuple[int, ...]
    axis: str
    effects: torch.Tensor
    clean: float
    corrupted: float
    tokens: tuple[str, ...] = ()  # every prompt token (single-prompt traces)
    corrupt: tuple[int, ...] = ()  # the corrupted prompt columns
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        shape = (len(self.layers), len(self.columns))
        if tuple(self.effects.shape) != shape or len(self.labels) != len(self.columns):
            raise SteerscaleError(f"trace effects have shape {tuple(self.effects.shape)}, expected {shape}")

    def layer_scores(self) -> dict[int, float]:
        """Per layer, its largest effect over the columns (positions, classes or heads)."""
        return {layer: float(self.effects[i].max()) for i, layer in enumerate(self.layers)}

    def top_layers(self, k: int = 1) -> list[int]:
        """The ``k`` layers with the largest ``layer_scores`` (ties: the earlier layer), best first."""
        if not isinstance(k, int) or k < 1:
            raise SteerscaleError(f"k must be a positive integer, got {k!r}")
        scores = self.layer_scores()
        return sorted(scores, key=lambda layer: (-scores[layer], layer))[:k]

    def table(self, k: int = 5) -> list[dict]:
        """The top ``k`` layers with their best column and effect."""
        out = []
        for layer in self.top_layers(min(k, len(self.layers))):
            i = self.layers.index(layer)
            j = int(self.effects[i].argmax())
            out.append({"layer": layer, "effect": round(float(self.effects[i, j]), 5), "at": self.labels[j],
                        "column": self.columns[j]})
        return out

    # -- files ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "kind": self.kind, "metric": self.metric, "axis": self.axis,
                "layers": list(self.layers), "labels": list(self.labels), "columns": list(self.columns),
                "effects": self.effects.double().tolist(), "clean": self.clean, "corrupted": self.corrupted,
                "tokens": list(self.tokens), "corrupt": list(self.corrupt),
                "top_layers": self.top_layers(min(5, len(self.layers))), "metadata": self.metadata}

    def save(self, path) -> Path:
        """Write the trace as JSON (no pickle); ``load`` reads it back, ``--layers FILE.json`` seeds extraction."""
        path = Path(path)
        if path.suffix != ".json":
            raise SteerscaleError(f"trace file {path} must end in .json", "e.g. -o out/trace.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path) -> "TraceResult":
        path = Path(path)
        if not path.is_file():
            raise SteerscaleError(f"trace file not found: {path}", "write one with: steerscale trace ... -o FILE.json")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SteerscaleError(f"cannot read trace file {path}: {exc}", "write it with steerscale trace") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise SteerscaleError(f"{path} is not a steerscale trace file", "write one with steerscale trace -o")
        try:
            return cls(kind=d["kind"], metric=d["metric"], layers=tuple(d["layers"]), labels=tuple(d["labels"]),
                       columns=tuple(d["columns"]), axis=d["axis"],
                       effects=torch.tensor(d["effects"], dtype=torch.float64).reshape(len(d["layers"]),
                                                                                        len(d["columns"])),
                       clean=float(d["clean"]), corrupted=float(d["corrupted"]), tokens=tuple(d.get("tokens", ())),
                       corrupt=tuple(d.get("corrupt", ())), metadata=dict(d.get("metadata", {})))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise SteerscaleError(f"{path}: malformed trace file ({exc})", "write it again with steerscale trace") \
                from None

    # -- plot ----------------------------------------------------------------------------------------------
    def heatmap(self, path, title: str | None = None) -> Path:
        """A PNG: layers on the y axis, token positions (their text; corrupted ones marked ``*``), position
        classes or heads on the x axis, colour = indirect effect."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        grid = self.effects.numpy()
        labels = [_short(label) + ("*" if self.axis == "position" and c in self.corrupt else "")
                  for label, c in zip(self.labels, self.columns)]
        fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(labels) + 2.2), max(3.0, 0.16 * len(self.layers) + 1.6)))
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="Purples" if self.kind == "resid_post" else
                       "Greens" if self.kind == "mlp_out" else "Reds" if self.kind == "attn_out" else "Blues")
        cbar = fig.colorbar(im, ax=ax)
        cbar.set_label(f"indirect effect ({self.metric})")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60 if self.axis != "head" else 0, ha="right" if self.axis != "head"
                           else "center", fontsize=8)
        step = max(1, len(self.layers) // 15)
        ax.set_yticks(range(0, len(self.layers), step))
        ax.set_yticklabels([str(self.layers[i]) for i in range(0, len(self.layers), step)], fontsize=8)
        ax.set_ylabel(f"layer ({self.kind}" + (f", window {self.metadata.get('window')})"
                                               if self.kind in ("mlp_out", "attn_out") else ")"))
        n = self.metadata.get("n_prompts", 1)
        default = (f"restoring {self.kind}: clean {self.clean:.3g}, corrupted {self.corrupted:.3g}"
                   + (f" (mean of {n} prompts)" if n and n > 1 else ""))
        width_in = fig.get_size_inches()[0]
        ax.set_title(textwrap.fill(title or default, max(30, int(width_in * 11))), fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path


def _short(label: str, n: int = 12) -> str:
    label = label.replace("\n", "\\n")
    return label if len(label) <= n else label[: n - 1] + "…"


def traced_layers(path, n_layers: int, k: int = 1) -> list[int]:
    """The top ``k`` layers of the trace file at ``path`` (``TraceResult.top_layers``), checked against a model of
    ``n_layers`` blocks: what ``steer.layers.parse_layers`` reads for ``--layers trace.json[:K]``."""
    result = TraceResult.load(path)
    made_for = result.metadata.get("n_layers")
    if made_for is not None and int(made_for) != n_layers:
        raise SteerscaleError(f"trace {path} was made on a model with {made_for} blocks; this one has {n_layers}",
                              "trace this model first (steerscale trace -m MODEL ... -o trace.json)")
    bad = [x for x in result.layers if not 0 <= x < n_layers]
    if bad:
        raise SteerscaleError(f"trace {path} names layer(s) {bad}, outside this model's {n_layers} blocks")
    return sorted(result.top_layers(min(k, len(result.layers))))
