"""GrAInS (Nguyen et al. 2025): steering directions built from the prompt tokens that gradients say matter.

For each contrastive prompt pair (prompt x, preferred completion y+, dispreferred completion y-):

1. Attribution. Integrated Gradients over the input embeddings of ``f(x) = log p(y+|x) - log p(y-|x)`` (summed
   completion log-probs), from a baseline (zero embeddings) to x in ``steps`` points (midpoint rule, batched).
   A token's score is ``sum_d (x - baseline) * mean gradient``; by IG's completeness the scores add up to
   ``f(x) - f(baseline)`` (up to the path discretisation: ``ig_gap_median`` in the vector's metadata records the
   miss, and a large one is logged; on Gemma 2/3 the zero baseline misses badly at any step count, because the
   sandwich norms make f jump just above 0: use ``baseline=pad`` there). Only the prompt's own tokens are attributed and moved along the path: the chat
   template's fixed text, special tokens and the completions keep their embeddings.
2. Selection. The ``k`` highest-scoring tokens with a positive score (they push toward y+) and the ``k`` lowest
   with a negative score (toward y-); the sign condition keeps the two sets disjoint on short prompts.
3. Directions. Per layer (resid_post, last prompt token, where the answer starts), with ``h(x)`` the activation:
   ``delta+ = h(x) - h(x without the positive tokens)`` and ``delta- = h(x) - h(x without the negative tokens)``
   (a removed token's embedding is replaced by the baseline: zeros, or with ``baseline=pad`` the pad token's). The
   layer's direction is ``mean(delta+) - mean(delta-)`` (``aggregate=mean``), or, as in the paper,
   ``PC1(delta+) - PC1(delta-)`` (``aggregate=pca``; each first principal axis oriented to agree with its
   mean and scaled by the mean projection on it, so both aggregates share one scale).
4. Inference: ``h' = h + scale * v``, rescaled to ``|h|``. The vector carries ``metadata["preserve_norm"] =
   True``; ``SteeringVector.interventions`` turns that into ``Add(..., preserve_norm=True)``.

Deviations from the authors' code (github.com/duykhuongnguyen/GrAInS), on purpose: the objective sums every
completion token's log-prob (theirs reads the last token only); activations are read at the prompt's last token
(theirs at the last token of prompt + completion, which the steered model never sees before it answers); masking
uses the IG baseline (theirs: IG from zeros, masking with the pad token; ``baseline=pad`` uses the pad token for
both); PCA axes are oriented and scaled (theirs
have an arbitrary sign and unit length); ``layers=auto`` picks one layer by held-out probe accuracy (theirs is a
grid over late layers).

The model stays frozen (``steer.training.frozen``): gradients flow only to the input embeddings, and nothing is
left attached or trainable afterwards.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from ..engine.choices import Item, build_items, encode
from ..engine.generation import format_prompt, has_chat_template
from ..engine.runtime import Observer, StopForward, observe
from ..errors import SteerscaleError
from ..models.loading import LoadedModel
from ..models.sites import Site
from .knobs import Knobs
from .layers import best_layer, parse_layers
from .pairs import ContrastPair, as_pairs, pairs_hash
from .training import frozen
from .vector import SteeringVector, fingerprint

log = logging.getLogger(__name__)
NAME = "grains"  # its entry in steer.methods.METHODS
EXAMPLES_KEPT = 5  # examples whose selected tokens are recorded in the vector's metadata


class Aggregate(str, Enum):
    MEAN = "mean"
    PCA = "pca"


class Baseline(str, Enum):
    ZERO = "zero"  # zero embeddings (the paper's IG baseline)
    PAD = "pad"  # the pad (else EOS) token's embedding (the authors' code masks tokens with it)


@dataclass(frozen=True)
class GrainsConfig(Knobs):
    """GrAInS knobs, validated at construction."""

    LABEL: ClassVar[str] = "GrAInS"
    k: int = 3  # tokens per sign (the paper's setting)
    steps: int = 32  # Integrated Gradients points (16 is 2x faster; on SmolLM2 its scores sum to ~1.5-2x f(x) - f(0))
    batch_size: int = 16  # IG points per forward pass
    aggregate: Aggregate = Aggregate.MEAN
    baseline: Baseline = Baseline.ZERO  # IG's starting point, and what a removed token's embedding becomes
    holdout: float = 0.3  # layers=auto: share of examples the layer probe is scored on
    seed: int = 0

    def __post_init__(self):
        for name, kind in (("aggregate", Aggregate), ("baseline", Baseline)):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                raise SteerscaleError(f"unknown GrAInS {name} {getattr(self, name)!r}",
                                      f"use {name}=" + " or ".join(m.value for m in kind)) from None
        for name in ("k", "steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SteerscaleError(f"GrAInS {name} must be an integer of at least 1, got {v!r}")
        if not (isinstance(self.holdout, (int, float)) and math.isfinite(self.holdout) and 0 < self.holdout < 1):
            raise SteerscaleError(f"GrAInS holdout must be between 0 and 1, got {self.holdout!r}")

    def as_json(self) -> dict:
        return {**asdict(self), "aggregate": self.aggregate.value, "baseline": self.baseline.value}


# -- data ------------------------------------------------------------------------------------------------------
@dataclass
class Example:
    """One pair as token ids: the prompt, the two completions, and which prompt positions are the user's text."""

    prompt: list[int]
    positive: list[int]
    negative: list[int]
    positions: list[int]  # attributable prompt positions (not template text, not special tokens)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _special_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", None) or [])


def template_span(tokenizer, prompt_ids: list[int], chat: bool) -> tuple[int, int]:
    """``(start, end)`` of the user's text inside a formatted prompt's ids: what the template adds before and after
    is found by formatting two different one-character texts (their common token prefix and suffix), so no
    tokenizer offsets are needed."""
    probes = [encode(tokenizer, format_prompt(tokenizer, s, chat=chat), special=not chat) for s in ("0", "Z")]
    before = _common_prefix(*probes)
    after = _common_prefix(*(p[::-1] for p in probes))
    # a user text whose first or last token merged with the template's keeps that token
    before = min(before, _common_prefix(prompt_ids, probes[0]))
    after = min(after, _common_prefix(prompt_ids[::-1], probes[0][::-1]), len(prompt_ids) - before)
    return before, len(prompt_ids) - after


def pair_examples(tokenizer, pairs: list[ContrastPair], chat: bool | None = None) -> list[Example]:
    """Token ids of every pair, as multiple-choice scoring builds them (``engine.choices.build_items``).

    Pairs without a prompt are split at their longest common token prefix, which becomes the prompt."""
    use_chat = has_chat_template(tokenizer) if chat is None else bool(chat)
    special = _special_ids(tokenizer)
    out = []
    for i, p in enumerate(pairs):
        if p.prompt is not None:
            item = build_items(tokenizer, [p.prompt], [[p.positive, p.negative]], use_chat)[0]
            start, end = template_span(tokenizer, item.prompt, use_chat)
        else:
            a, b = encode(tokenizer, p.positive, True), encode(tokenizer, p.negative, True)
            n = _common_prefix(a, b)
            item, start, end = Item(a[:n], [a[n:], b[n:]]), 0, n
        if not all(item.choices) or item.choices[0] == item.choices[1]:
            raise SteerscaleError(f"pair {i}: the completions are empty or identical after tokenization "
                                  f"({p.positive[:60]!r})", "each pair must differ in the behaviour to steer")
        positions = [j for j in range(start, end) if item.prompt[j] not in special]
        if not positions:
            raise SteerscaleError(f"pair {i}: the prompt has no tokens of its own to attribute "
                                  f"({(p.prompt or p.positive)[:60]!r})",
                                  'GrAInS attributes prompt tokens: give {"prompt", "positive", "negative"} pairs '
                                  "with a non-empty prompt (text pairs need a shared beginning)")
        out.append(Example(item.prompt, *item.choices, positions))
    return out


# -- attribution -------------------------------------------------------------------------------------------------
@dataclass
class Attribution:
    """Per-token IG scores of one prompt; ``f_input - f_baseline - scores.sum()`` is IG's discretisation error."""

    scores: torch.Tensor  # (prompt_len,), zero outside ``positions``
    positions: list[int]
    f_input: float  # log p(y+|x) - log p(y-|x)
    f_baseline: float  # the same with the attributed tokens at the baseline

    @property
    def gap(self) -> float:
        return self.f_input - self.f_baseline - float(self.scores.sum())


def _embed(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    """The embeddings the model consumes as ``inputs_embeds`` (Gemma's scaling included where its embedding
    module applies it), so attribution is on exactly what the blocks see."""
    emb = lm.model.get_input_embeddings()
    with torch.no_grad():
        return emb(torch.tensor([ids], device=emb.weight.device))[0]


def _completion_logprobs(model, prefix: torch.Tensor, tail_ids: list[int], tail_embeds: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of ``tail_ids`` after each row of ``prefix`` ``(rows, L, d)``, as a ``(rows,)`` tensor.

    Rows share one length, so there is no padding and no attention mask: every family runs its own default
    causal (and sliding-window) masking."""
    rows, n = prefix.shape[0], len(tail_ids)
    x = torch.cat([prefix, tail_embeds[None].expand(rows, -1, -1)], dim=1)
    # logits only where a completion token is predicted: the last n + 1 positions minus the final one
    logits = model(inputs_embeds=x, use_cache=False, logits_to_keep=n + 1).logits[:, :-1].float()
    target = torch.tensor(tail_ids, device=logits.device)[None, :, None].expand(rows, -1, -1)
    return logits.log_softmax(-1).gather(-1, target)[..., 0].sum(-1)


def _contrast(model, prefix: torch.Tensor, pos: tuple[list[int], torch.Tensor],
              neg: tuple[list[int], torch.Tensor]) -> torch.Tensor:
    """``f = log p(y+|x) - log p(y-|x)`` for each row of ``prefix``."""
    return _completion_logprobs(model, prefix, *pos) - _completion_logprobs(model, prefix, *neg)


def path_points(steps: int, floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Points on the straight path (0 = baseline, 1 = input) and their weights: the composite midpoint rule on
    a partition of [0, 1] whose cuts are half evenly spaced and half geometric from ``floor`` up.

    Why not only even spacing: in a pre-norm model (RMSNorm/LayerNorm on the embedding) ``f`` jumps within
    ``alpha ~ sqrt(eps / mean(x^2))`` (about 1e-3 on the tiny test models) as the first norm switches on, and
    evenly spaced points step over that jump, so the scores would not add up to ``f(x) - f(baseline)``."""
    n_geo = steps // 2
    cuts = set(torch.linspace(0, 1, steps - n_geo + 1, dtype=torch.float64).tolist())
    if n_geo:
        cuts |= set(torch.logspace(math.log10(floor), 0, n_geo + 1, dtype=torch.float64).tolist())
    cuts = torch.tensor(sorted(cuts), dtype=torch.float64)
    cuts = cuts[torch.cat([torch.tensor([True]), cuts.diff() > 1e-12])]  # a cut given twice (1.0) counts once
    return ((cuts[1:] + cuts[:-1]) / 2).float(), cuts.diff().float()


@torch.enable_grad()  # gradients w.r.t. the embeddings, also when a caller runs under no_grad
def attribute(lm: LoadedModel, prompt_ids: list[int], pos_ids: list[int], neg_ids: list[int],
              positions: list[int] | None = None, steps: int = 32, batch_size: int = 16,
              baseline: torch.Tensor | None = None) -> Attribution:
    """Integrated Gradients of ``log p(pos|prompt) - log p(neg|prompt)`` over the prompt's input embeddings.

    ``positions``: the prompt positions to attribute (default: all); the others keep their embeddings along the
    path. The baseline at the attributed positions is zero embeddings, or the ``(dim,)`` embedding ``baseline``
    (e.g. the pad token's, ``pad_embedding``); the path integral uses ``steps`` points
    (``path_points``), ``batch_size`` of them per forward and backward pass. The model's weights get no
    gradients and keep their ``requires_grad`` flags."""
    if not prompt_ids or not pos_ids or not neg_ids:
        raise SteerscaleError("attribution needs a non-empty prompt and two non-empty completions")
    if steps < 1 or batch_size < 1:
        raise SteerscaleError(f"steps and batch_size must be at least 1, got {steps} and {batch_size}")
    positions = list(range(len(prompt_ids))) if positions is None else sorted(set(positions))
    if not positions or positions[0] < 0 or positions[-1] >= len(prompt_ids):
        raise SteerscaleError(f"attribution positions {positions[:8]} are not inside the prompt "
                              f"({len(prompt_ids)} tokens)")
    model = lm.model
    x = _embed(lm, prompt_ids)
    pos = (pos_ids, _embed(lm, pos_ids))
    neg = (neg_ids, _embed(lm, neg_ids))
    where = torch.zeros(len(prompt_ids), 1, dtype=x.dtype, device=x.device)
    where[positions] = 1
    start = x * (1 - where)  # the baseline at the attributed positions, the real embedding elsewhere
    if baseline is not None:
        start = start + where * baseline.to(x)
    grads = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    alphas, weights = path_points(steps)
    with frozen(model):
        for a, w in zip(alphas.split(batch_size), weights.split(batch_size)):
            path = (start + a.to(x)[:, None, None] * (x - start)).detach().requires_grad_(True)
            w = w.to(device=x.device)
            # two backward passes instead of one graph holding both completions: half the peak memory
            (_completion_logprobs(model, path, *pos) * w).sum().backward()
            (-_completion_logprobs(model, path, *neg) * w).sum().backward()
            grads += path.grad.float().sum(0)
        with torch.no_grad():
            ends = _contrast(model, torch.stack([x, start]), pos, neg)
    scores = ((x - start).float() * grads).sum(-1).cpu()
    return Attribution(scores, positions, float(ends[0]), float(ends[1]))


def select_tokens(attribution: Attribution, k: int) -> tuple[list[int], list[int]]:
    """The ``k`` positions with the highest positive scores and the ``k`` with the lowest negative scores."""
    s = attribution.scores
    ranked = sorted(attribution.positions, key=lambda j: -float(s[j]))
    top = [j for j in ranked if s[j] > 0][:k]
    bottom = [j for j in reversed(ranked) if s[j] < 0][:k]
    return sorted(top), sorted(bottom)


# -- directions --------------------------------------------------------------------------------------------------
def _masked_states(lm: LoadedModel, prompt_ids: list[int], masks: list[list[int]], layers: list[int],
                   fill: torch.Tensor | None) -> torch.Tensor:
    """Last-token resid_post at ``layers`` for the prompt with each position set of ``masks`` replaced (by zero
    embeddings, or by ``fill``): ``(len(masks), len(layers), dim)``, one forward pass."""
    x = _embed(lm, prompt_ids)
    rows = x[None].repeat(len(masks), 1, 1)
    for r, idx in enumerate(masks):
        if idx:
            rows[r, idx] = 0 if fill is None else fill.to(rows.dtype)
    seen: dict[int, torch.Tensor] = {}
    observers = [Observer(Site(n), lambda h, n=n: seen.__setitem__(n, h[:, -1].float().cpu())) for n in layers]
    with torch.no_grad(), observe(lm.layout, observers, stop_after=max(layers)):
        try:
            lm.model(inputs_embeds=rows, use_cache=False)
        except StopForward:
            pass
    return torch.stack([seen[n] for n in layers], dim=1)


def pad_embedding(lm: LoadedModel) -> torch.Tensor:
    """The pad token's input embedding (the EOS token's when there is no pad token): ``baseline=pad``."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise SteerscaleError("baseline=pad needs a pad or EOS token, and this tokenizer has neither",
                              "use baseline=zero")
    return _embed(lm, [pad])[0]


def _first_axis(d: torch.Tensor) -> torch.Tensor:
    """First principal axis of the centred rows of ``d``, oriented and scaled like the rows' mean: the unit axis
    times the mean projection of the rows on it (zero when the rows are all zero)."""
    mean = d.mean(0)
    if d.shape[0] < 2 or not torch.any(d != mean):
        return mean  # no spread to find an axis in
    axis = torch.linalg.svd(d - mean, full_matrices=False).Vh[0]
    proj = d @ axis
    if float(proj.mean()) < 0:
        axis, proj = -axis, -proj
    return axis * proj.mean()


def directions(plus: torch.Tensor, minus: torch.Tensor, aggregate: Aggregate | str) -> torch.Tensor:
    """Per-layer directions ``(layers, dim)`` from ``delta+`` and ``delta-`` ``(examples, layers, dim)``."""
    if Aggregate(aggregate) is Aggregate.MEAN:
        return plus.mean(0) - minus.mean(0)
    return torch.stack([_first_axis(plus[:, i]) - _first_axis(minus[:, i]) for i in range(plus.shape[1])])


def _pick_layer(more: torch.Tensor, less: torch.Tensor, layers: list[int], n_layers: int, cfg: GrainsConfig):
    """``layers=auto``: held-out probe accuracy separating the prompt without its negative tokens from the prompt
    without its positive tokens, per layer; the best, ties within a point toward the middle of the network (the
    rule of every ``layers=auto``, ``steer.layers.best_layer``)."""
    from .methods.probe import probe_accuracies

    accs = probe_accuracies([more[:, i] for i in range(len(layers))], [less[:, i] for i in range(len(layers))],
                            cfg.holdout, cfg.seed)
    accuracy = {n: float(a[0]) for n, a in zip(layers, accs)}
    return best_layer(accuracy, n_layers), accuracy


def _record(tokenizer, ex: Example, att: Attribution, top: list[int], bottom: list[int]) -> dict:
    word = lambda j: tokenizer.decode([ex.prompt[j]])  # noqa: E731
    return {"positive_tokens": [[word(j), round(float(att.scores[j]), 5)] for j in top],
            "negative_tokens": [[word(j), round(float(att.scores[j]), 5)] for j in bottom],
            "f": round(att.f_input, 5), "f_baseline": round(att.f_baseline, 5), "ig_gap": round(att.gap, 5)}


def fit_grains(lm: LoadedModel, pairs, config: GrainsConfig | None = None, layers="auto", chat: bool | None = None,
               progress: bool = True, **knobs) -> SteeringVector:
    """GrAInS directions from contrastive prompt pairs (a JSONL path, dicts or ``ContrastPair`` list).

    ``layers``: ``auto`` (one layer, by held-out probe accuracy) or a spec as in ``extract`` (one direction per
    layer). ``knobs`` override ``GrainsConfig`` fields (``k``, ``steps``, ``aggregate``, ...). Apply with
    ``vector.interventions(scale)``: the edit keeps each activation's norm (``metadata["preserve_norm"]``)."""
    cfg = GrainsConfig.build(config, **knobs)
    pairs = as_pairs(pairs, "GrAInS")
    layout = lm.layout
    chosen = parse_layers(layers, layout.n_layers)
    candidates = list(range(layout.n_layers)) if chosen == "auto" else list(chosen)
    examples = pair_examples(lm.tokenizer, pairs, chat)
    fill = pad_embedding(lm) if cfg.baseline is Baseline.PAD else None

    states, records, gaps, n_masked = [], [], [], 0
    for i, ex in enumerate(tqdm(examples, desc="GrAInS attribution", disable=not progress, unit="pair")):
        att = attribute(lm, ex.prompt, ex.positive, ex.negative, ex.positions, cfg.steps, cfg.batch_size, fill)
        top, bottom = select_tokens(att, cfg.k)
        states.append(_masked_states(lm, ex.prompt, [[], top, bottom], candidates, fill))  # (3, layers, dim)
        n_masked += bool(top or bottom)
        gaps.append(abs(att.gap) / max(abs(att.f_input - att.f_baseline), 1e-6))
        if i < EXAMPLES_KEPT:
            records.append(_record(lm.tokenizer, ex, att, top, bottom))
    if n_masked == 0:
        raise SteerscaleError("no prompt token has a non-zero attribution in any pair, so there is no direction",
                              "check that the completions differ in the behaviour the prompts influence")
    h = torch.stack(states)  # (pairs, [x, x without positive tokens, x without negative tokens], layers, dim)
    plus, minus = h[:, 0] - h[:, 1], h[:, 0] - h[:, 2]

    accuracy = {}
    if chosen == "auto":
        layer, accuracy = _pick_layer(h[:, 2], h[:, 1], candidates, layout.n_layers, cfg)
        keep = [candidates.index(layer)]
    else:
        keep = list(range(len(candidates)))
    vecs = directions(plus[:, keep], minus[:, keep], cfg.aggregate)
    contrast = (plus - minus)[:, keep]
    per_site, dirs = {}, {}
    for j, i in enumerate(keep):
        site, v = Site(candidates[i]), vecs[j]
        dirs[site] = v
        agree = float(((contrast[:, j] @ v) > 0).float().mean()) if float(v.norm()) > 0 else 0.0
        per_site[site.key()] = {"norm": float(v.norm()), "agreement": round(agree, 4)}
        if accuracy:
            per_site[site.key()]["probe_accuracy"] = accuracy[candidates[i]]
    if all(float(v.norm()) == 0 for v in dirs.values()):
        raise SteerscaleError("GrAInS found a zero direction at every layer",
                              "raise k, or use pairs whose prompts influence the contrast")
    gap = float(torch.tensor(gaps).median())
    if gap > 0.2:  # e.g. Gemma's sandwich norms make f jump just above the zero baseline
        log.warning("GrAInS: Integrated Gradients scores miss f(x) - f(baseline) by %.0f%% (median over pairs); "
                    "raise steps%s", 100 * gap, "" if cfg.baseline is Baseline.PAD else ", or use baseline=pad")
    return SteeringVector(
        dirs,
        model_name=lm.name,
        model_fingerprint=fingerprint(layout),
        method=NAME,
        metadata={
            "site_kind": "resid_post",
            "layer_convention": "0-based block index; resid_post = output of the block",
            "layers": "auto" if chosen == "auto" else list(chosen),
            "read": "last prompt token",
            "n_pairs": len(pairs),
            "data_hash": pairs_hash(pairs),
            "data": "pairs",
            "grains": cfg.as_json(),
            "preserve_norm": True,  # h + scale * v is rescaled to |h| (GrAInS's normalisation)
            "per_site": per_site,
            "sweep": {Site(n).key(): a for n, a in accuracy.items()},
            "examples": records,
            "ig_gap_median": round(gap, 5),  # IG's relative error; raise steps if large
            "pairs_with_masked_tokens": n_masked,
        },
    )
