"""MoE router steering: read which experts a behaviour uses, and bias router logits toward or away from experts.

A mixture-of-experts layer sends each token to the ``top_k`` experts with the largest router logits. Two things
follow from that, and this module does both:

* Reading: the fraction of tokens that select each expert (``expert_usage``) differs between two prompt sets
  when the behaviour that separates them lives partly in particular experts (``expert_contrast``).
* Steering: adding a bias to the router logits at ``Site(layer, SiteKind.ROUTER)`` changes which experts run.
  The runtime's router site recomputes the top-k scores and indices from the edited logits
  (``models.layout.reroute``), so a large enough bias forces (or forbids) an expert for every token. A router
  bias is an ordinary ``SteeringVector`` with one ``router`` direction per layer (``router_vector``): it saves,
  loads, checks the model fingerprint and applies with ``vector.interventions(scale)`` like any other vector,
  and ``scale`` multiplies the logit biases.

Reading goes through the hook runtime's observers (``engine.runtime.observe``); no hook is registered here.
Selection is read as the top-k of the router logits, which is what softmax-top-k routers (Mixtral, Qwen-MoE,
OLMoE, Granite-MoE, GPT-OSS) select; routers that re-score logits before choosing (DeepSeek-V3's grouped,
bias-corrected sigmoid routing) would be read approximately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..engine.capture import tokenize
from ..engine.runtime import Intervention, Observer, StopForward, intervene, observe
from ..errors import SteerscaleError
from ..models.layout import ModelLayout, text_config
from ..models.sites import Site, SiteKind
from .layers import parse_layers
from .vector import SteeringVector, fingerprint

# -- where the routers are -------------------------------------------------------------------------------------


def moe_layers(layout: ModelLayout) -> list[int]:
    """Indices of the blocks that have a router (some MoE models keep dense MLPs in a few layers)."""
    return [i for i, r in enumerate(layout.routers) if r is not None]


def _require_moe(layout: ModelLayout, what: str) -> None:
    if not layout.is_moe or not layout.n_experts:
        raise SteerscaleError(
            f"{what} needs a mixture-of-experts model, but this {layout.architecture} model is dense (no MoE router "
            "in any layer)",
            "load an MoE model (e.g. Qwen1.5-MoE, Qwen3-MoE, Mixtral, OLMoE); for dense models steer resid_post",
        )


def router_layers(layout: ModelLayout, layers=None, what: str = "reading expert usage") -> list[int]:
    """The MoE layers to act on: ``None``/``"auto"``/``"all"`` means every layer with a router; otherwise an int, a
    list or a spec such as ``"2-5"`` (``steer.layers.parse_layers``). A layer without a router is an error, not
    skipped: silently reading nothing there would look like "no expert differs"."""
    _require_moe(layout, what)
    with_router = moe_layers(layout)
    if layers in (None, "auto", "all"):
        return with_router
    chosen = parse_layers(layers, layout.n_layers)
    dense = [i for i in chosen if layout.routers[i] is None]
    if dense:
        raise SteerscaleError(
            f"layer(s) {', '.join(map(str, dense))} of this {layout.architecture} model have a dense MLP, "
            "no MoE router",
            f"use layers with a router: {_span(with_router)}",
        )
    return chosen


def _span(layers: list[int]) -> str:
    """``0-7`` for a contiguous run, else ``0,2,4``."""
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}-{layers[-1]}" if contiguous else ",".join(map(str, layers))


def router_top_k(model, layout: ModelLayout, layer: int) -> int:
    """How many experts each token selects at ``layer``: the router's own ``top_k`` (transformers>=5 top-k
    routers carry it), else the config's ``num_experts_per_tok`` (older plain-Linear gates)."""
    k = getattr(layout.routers[layer], "top_k", None)
    if k is None:
        cfg = text_config(model.config)
        k = next((getattr(cfg, n) for n in ("num_experts_per_tok", "moe_topk", "top_k") if getattr(cfg, n, None)), None)
    if not isinstance(k, int) or not 1 <= k <= (layout.n_experts or 0):
        raise SteerscaleError(
            f"cannot tell how many experts a token selects in this {layout.architecture} model (top_k={k!r})",
            "its config should set num_experts_per_tok; report this architecture",
        )
    return k


# -- reading -----------------------------------------------------------------------------------------------------


def count_selected(logits: torch.Tensor, mask: torch.Tensor, top_k: int) -> tuple[torch.Tensor, int]:
    """Per-expert selection counts over real tokens, and the number of real tokens.

    ``logits``: router logits as the router returns them, ``(batch*seq, n_experts)``; ``mask``: the batch's
    ``(batch, seq)`` attention mask. Padding tokens are routed too (the router sees every position) and must not
    count. Selection is the top-k of the logits: softmax is monotonic, so it matches top-k of the probabilities."""
    batch, seq = mask.shape
    logits = logits.reshape(batch, seq, logits.shape[-1])
    chosen = torch.topk(logits.float(), top_k, dim=-1).indices[mask.bool()]  # (n_real, top_k)
    counts = torch.bincount(chosen.flatten().cpu(), minlength=logits.shape[-1]).double()
    return counts, int(chosen.shape[0])


@torch.no_grad()
def _usage(model, tokenizer, layout: ModelLayout, texts: Sequence[str], layers=None, batch_size: int = 16,
           progress: bool = False, interventions: Iterable[Intervention] = ()) -> tuple[dict[int, torch.Tensor], int]:
    """``expert_usage`` plus the number of real tokens it averaged over."""
    layers = router_layers(layout, layers)
    if isinstance(texts, str) or not texts:
        raise SteerscaleError("no texts to read expert usage from", "pass a non-empty list of prompts")
    if batch_size < 1:
        raise SteerscaleError(f"batch_size must be >= 1, got {batch_size}")
    top_k = {layer: router_top_k(model, layout, layer) for layer in layers}
    counts = {layer: torch.zeros(layout.n_experts, dtype=torch.float64) for layer in layers}
    n_tokens = 0
    current: dict[int, torch.Tensor] = {}
    observers = [Observer(Site(layer, SiteKind.ROUTER), partial(current.__setitem__, layer)) for layer in layers]
    device = next(model.parameters()).device
    # Edits first, observers inside: at a shared module PyTorch runs hooks in registration order, so the observers
    # read the edited logits (the routing the model actually used).
    with intervene(layout, list(interventions)), observe(layout, observers, stop_after=max(layers)):
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="reading expert usage", disable=not progress, unit="batch"):
            batch = tokenize(tokenizer, list(texts[start : start + batch_size]), device)
            try:
                model(**batch.model_inputs(), use_cache=False)
            except StopForward:
                pass
            for layer in layers:
                c, n = count_selected(current[layer], batch.attention_mask, top_k[layer])
                counts[layer] += c
            n_tokens += n
            current.clear()
    return {layer: (c / n_tokens).float() for layer, c in counts.items()}, n_tokens


def expert_usage(model, tokenizer, layout: ModelLayout, texts: Sequence[str], layers=None, batch_size: int = 16,
                 progress: bool = False, interventions: Iterable[Intervention] = ()) -> dict[int, torch.Tensor]:
    """For each MoE layer, the fraction of real (non-padding) tokens of ``texts`` whose top-k routing selects each
    expert: ``{layer: (n_experts,)}``. A token counts once per selected expert, so a row sums to ``top_k``.

    ``layers``: ``None`` (every layer with a router), an int, a list or a spec such as ``"2-5"``. The forward pass
    stops after the deepest layer read. ``interventions`` are applied while reading (e.g. a router vector's
    ``interventions(scale)``), and the usage is then the routing under those edits."""
    return _usage(model, tokenizer, layout, texts, layers, batch_size, progress, interventions)[0]


@dataclass
class ExpertContrast:
    """Expert usage of a positive and a negative prompt set, per layer, and their difference (pos - neg).

    ``diff[layer][e] > 0``: the positive set routes a larger fraction of its tokens to expert ``e``. Differences
    are raw usage fractions over tokens; no significance test is made (tokens of one prompt are not independent),
    so read them with the token counts in mind."""

    usage_pos: dict[int, torch.Tensor]
    usage_neg: dict[int, torch.Tensor]
    n_tokens_pos: int = 0
    n_tokens_neg: int = 0
    diff: dict[int, torch.Tensor] = field(init=False)

    def __post_init__(self):
        if set(self.usage_pos) != set(self.usage_neg) or not self.usage_pos:
            raise SteerscaleError(f"usage layers differ: {sorted(self.usage_pos)} vs {sorted(self.usage_neg)}",
                                  "read both prompt sets at the same layers")
        self.usage_pos = {layer: self.usage_pos[layer].float() for layer in sorted(self.usage_pos)}
        self.usage_neg = {layer: self.usage_neg[layer].float() for layer in sorted(self.usage_neg)}
        self.diff = {layer: self.usage_pos[layer] - self.usage_neg[layer] for layer in self.usage_pos}

    @property
    def layers(self) -> list[int]:
        return list(self.diff)

    @property
    def n_experts(self) -> int:
        return int(next(iter(self.diff.values())).shape[0])

    def top(self, k: int = 5, sign: int = 1) -> list[tuple[int, int, float]]:
        """The ``k`` (layer, expert, diff) entries the positive set uses most more than the negative set
        (``sign=+1``), most less (``sign=-1``), or by |diff| either way (``sign=0``). Entries whose diff is zero or
        of the other sign are left out, so fewer than ``k`` may come back."""
        if sign not in (1, -1, 0):
            raise SteerscaleError(f"sign must be +1, -1 or 0, got {sign!r}")
        entries = [(layer, e, float(d)) for layer, row in self.diff.items() for e, d in enumerate(row.tolist())]
        key = (lambda t: abs(t[2])) if sign == 0 else (lambda t: sign * t[2])
        return [t for t in sorted(entries, key=lambda t: (-key(t), t[0], t[1])) if key(t) > 0][: max(k, 0)]

    def row(self, layer: int, expert: int) -> dict:
        return {"layer": layer, "expert": expert, "usage_pos": round(float(self.usage_pos[layer][expert]), 4),
                "usage_neg": round(float(self.usage_neg[layer][expert]), 4),
                "diff": round(float(self.diff[layer][expert]), 4)}

    def table(self) -> list[dict]:
        """Every (layer, expert) as a dict, largest |diff| first."""
        order = sorted(((layer, e) for layer in self.layers for e in range(self.n_experts)),
                       key=lambda le: (-abs(float(self.diff[le[0]][le[1]])), le))
        return [self.row(layer, e) for layer, e in order]

    def plot(self, path, title: str = "expert usage: positive - negative") -> None:
        """A layer x expert heatmap of ``diff`` (red: the positive set uses the expert more), saved as PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        grid = np.stack([self.diff[layer].numpy() for layer in self.layers])
        bound = max(float(np.abs(grid).max()), 1e-6)
        width = min(14.0, max(6.0, 3 + 0.25 * self.n_experts))  # 64 experts: wide; 4 experts: still readable
        fig, ax = plt.subplots(figsize=(width, min(10.0, max(3.5, 2 + 0.35 * len(self.layers)))))
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-bound, vmax=bound)
        fig.colorbar(im, ax=ax, label="usage difference (fraction of tokens)")
        ax.set_yticks(range(len(self.layers)), [str(layer) for layer in self.layers])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def expert_contrast(model, tokenizer, layout: ModelLayout, positive_texts: Sequence[str],
                    negative_texts: Sequence[str], layers=None, batch_size: int = 16,
                    progress: bool = False) -> ExpertContrast:
    """Expert usage of ``positive_texts`` and ``negative_texts`` at the same layers, and its difference: which
    experts a behaviour uses more (or less). Texts are used as given (apply a chat template first if wanted)."""
    layers = router_layers(layout, layers)
    pos, n_pos = _usage(model, tokenizer, layout, positive_texts, layers, batch_size, progress)
    neg, n_neg = _usage(model, tokenizer, layout, negative_texts, layers, batch_size, progress)
    return ExpertContrast(pos, neg, n_pos, n_neg)


# -- steering ----------------------------------------------------------------------------------------------------


def router_vector(layout: ModelLayout, biases: dict[int, dict[int, float]], model_name: str = "",
                  method: str = "router", metadata: dict | None = None) -> SteeringVector:
    """A steering vector of router-logit biases: ``biases = {layer: {expert: logit_bias}}``.

    One ``router`` direction per layer, ``n_experts`` long, zero except at the given experts. Applied at scale
    ``s``, expert ``e`` gets ``s * bias`` added to its router logit for every token in scope: positive biases pull
    tokens toward the expert, negative ones push them away; a bias larger than the gap to the k-th largest logit
    decides the selection outright. Biases are in logit units, whose spread differs between models: check the
    effect with ``expert_usage(..., interventions=vector.interventions(s))``."""
    _require_moe(layout, "a router steering vector")
    if not isinstance(biases, dict) or not biases:
        raise SteerscaleError("no router biases given", "pass {layer: {expert: logit_bias}}, e.g. {3: {5: 4.0}}")
    n = layout.n_experts
    directions: dict[Site, torch.Tensor] = {}
    for layer, per_expert in biases.items():
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise SteerscaleError(f"router bias layer must be an int, got {layer!r}")
        router_layers(layout, [layer], "a router steering vector")  # in range, and has a router
        if not isinstance(per_expert, dict) or not per_expert:
            raise SteerscaleError(f"layer {layer}: no expert biases", "give {expert: logit_bias} for each layer")
        vec = torch.zeros(n)
        for expert, value in per_expert.items():
            if not isinstance(expert, int) or isinstance(expert, bool) or not 0 <= expert < n:
                raise SteerscaleError(f"layer {layer}: expert {expert!r} is out of range: this model has {n} experts "
                                      "per layer", f"use an expert index between 0 and {n - 1}")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise SteerscaleError(f"layer {layer}, expert {expert}: logit bias must be a finite number, "
                                      f"got {value!r}")
            vec[expert] = float(value)
        directions[Site(layer, SiteKind.ROUTER)] = vec
    table = {str(layer): {str(e): float(v) for e, v in sorted(b.items())} for layer, b in sorted(biases.items())}
    meta = {"site_kind": "router", "n_experts": n, "biases": table,
            "note": "router-logit biases; the scale multiplies them"}
    meta.update(metadata or {})
    return SteeringVector(directions, model_name, fingerprint(layout), method, meta)


def router_vector_from_contrast(layout: ModelLayout, contrast: ExpertContrast, k: int = 2, bias: float = 2.0,
                                away: bool = False, model_name: str = "") -> SteeringVector:
    """A router vector from an expert contrast: the ``k`` (layer, expert) entries the positive set uses most more
    than the negative set get ``+bias`` (toward the positive behaviour's experts), or ``-bias`` with
    ``away=True`` (the same experts suppressed: the behaviour's experts taken away, which equals the toward
    vector at scale -1). To boost the experts the negative set prefers instead, swap the two prompt sets. The
    chosen entries and their usage numbers are recorded in ``metadata["contrast"]``."""
    if not isinstance(k, int) or k < 1:
        raise SteerscaleError(f"k must be a positive int, got {k!r}", "the number of (layer, expert) pairs to bias")
    if not isinstance(bias, (int, float)) or not math.isfinite(bias) or bias <= 0:
        raise SteerscaleError(f"bias must be a finite positive number, got {bias!r}",
                              "give the magnitude; away=True makes it negative")
    _require_moe(layout, "a router steering vector")
    if contrast.n_experts != layout.n_experts:
        raise SteerscaleError(f"the contrast has {contrast.n_experts} experts per layer, this model {layout.n_experts}",
                              "compute the contrast on this model")
    chosen = contrast.top(k, +1)
    if not chosen:
        raise SteerscaleError(
            f"no expert is used more by the positive set than by the negative set at layers {_span(contrast.layers)}",
            "the two prompt sets route identically there: use more or more distinct prompts, or other layers")
    value = -float(bias) if away else float(bias)
    biases: dict[int, dict[int, float]] = {}
    for layer, expert, _ in chosen:
        biases.setdefault(layer, {})[expert] = value
    metadata = {"contrast": {"k": k, "bias": float(bias), "away": away, "layers": contrast.layers,
                             "n_tokens_pos": contrast.n_tokens_pos, "n_tokens_neg": contrast.n_tokens_neg,
                             "chosen": [contrast.row(layer, e) for layer, e, _ in chosen]}}
    return router_vector(layout, biases, model_name, "router", metadata)
