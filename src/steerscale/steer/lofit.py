"""LoFiT (Yin et al. 2024): per-head offsets that are learned rather than read off activations.

Two short training runs; the model stays frozen and only a few small tensors learn:

1. Head selection. Every attention head gets a scaling vector, ``z -> (1 + a) * z`` on its output (the input of
   the attention output projection, site ``head_out``), trained with an L1 penalty. The ``heads`` heads whose
   vectors grow largest are the ones the task leans on.
2. Offsets. Each selected head gets a bias, ``z -> z + v``, trained with the same loss from zero.

The result is an ordinary per-head ``SteeringVector`` (method ``lofit``, sites ``head_out``, like ITI): ``scale``
multiplies the learned offsets (1 = as trained), it bakes into ``o_proj`` biases, and it composes with any other
vector. Like ITI it cannot be exported as a llama.cpp control vector (per-head, not residual).

Loss, on contrastive prompt pairs (prompt, preferred completion, rejected completion), summed completion log-probs
from steerscale's packed scorer (``engine.choices.choice_logprob_sums``, which multiple-choice scoring such as
TruthfulQA MC1 also runs on):

* ``dpo`` (default; LoFiT's TruthfulQA setting): ``-log sigmoid(beta * ((lp+ - ref+) - (lp- - ref-)))`` with the
  unsteered model as the reference;
* ``sft``: the preferred completion's mean negative log-likelihood.

Interventions go through the ordinary hook runtime (``engine.runtime.intervene``): learned edits use the same
hook contract as every other edit, and nothing stays attached or trainable after training.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..engine.choices import Item, build_items, choice_logprob_sums, encode
from ..engine.ops import Affine, Lambda
from ..engine.runtime import Intervention, intervene
from ..errors import SteerscaleError
from ..models.loading import LoadedModel
from ..models.sites import Site, SiteKind
from .knobs import Knobs
from .layers import parse_layers
from .pairs import ContrastPair, as_pairs, pairs_hash
from .training import descend, frozen
from .vector import SteeringVector, fingerprint

NAME = "lofit"  # its entry in steer.methods.METHODS


class LofitLoss(str, Enum):
    DPO = "dpo"
    SFT = "sft"


@dataclass(frozen=True)
class LofitConfig(Knobs):
    """Knobs of both training steps, validated at construction."""

    LABEL: ClassVar[str] = "LoFiT"
    heads: int = 16  # K: heads that get offsets
    epochs: int = 2  # offset training
    select_epochs: int = 1  # head-selection training
    lr: float = 5e-3
    select_lr: float = 5e-3
    l1: float = 1e-3  # L1 weight on the selection scalings (per element, summed)
    beta: float = 0.5  # DPO temperature
    loss: LofitLoss = LofitLoss.DPO
    batch_size: int = 8  # pairs per step
    seed: int = 0

    def __post_init__(self):
        try:
            object.__setattr__(self, "loss", LofitLoss(self.loss))
        except ValueError:
            raise SteerscaleError(f"unknown LoFiT loss {self.loss!r}", "use loss=dpo or loss=sft") from None
        for name in ("heads", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise SteerscaleError(f"LoFiT {name} must be at least 1, got {getattr(self, name)!r}")
        if int(self.select_epochs) < 0:
            raise SteerscaleError(f"LoFiT select_epochs must be >= 0, got {self.select_epochs!r}")
        for name in ("lr", "select_lr", "beta"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise SteerscaleError(f"LoFiT {name} must be a positive finite number, got {v!r}")
        if not (math.isfinite(self.l1) and self.l1 >= 0):
            raise SteerscaleError(f"LoFiT l1 must be a finite number >= 0, got {self.l1!r}")


# -- data ------------------------------------------------------------------------------------------------------
def pair_items(tokenizer, pairs: list[ContrastPair], chat: bool | None = None) -> list[Item]:
    """One scoring item per pair: the prompt, then the two completions as its two choices (preferred first).

    Pairs without a prompt are split at their longest common token prefix, which becomes the prompt; two texts
    that share no leading token have no completion to compare and are an error."""
    items: list[Item] = []
    for i, p in enumerate(pairs):
        if p.prompt is not None:
            item = build_items(tokenizer, [p.prompt], [[p.positive, p.negative]], chat)[0]
        else:
            a, b = encode(tokenizer, p.positive, True), encode(tokenizer, p.negative, True)
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            if n == 0:
                raise SteerscaleError(f"pair {i}: the two texts share no leading token, so there is no completion "
                                      "to train on", 'LoFiT trains on completions: give {"prompt", "positive", '
                                      '"negative"} pairs')
            item = Item(a[:n], [a[n:], b[n:]])
        if not all(item.choices) or item.choices[0] == item.choices[1]:
            raise SteerscaleError(f"pair {i}: the completions are empty or identical after tokenization "
                                  f"({p.positive[:60]!r})", "each pair must differ in the behaviour to learn")
        items.append(item)
    return items


# -- training ----------------------------------------------------------------------------------------------------
def _batches(n: int, size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + size] for i in range(0, n, size)]


def _objective(sums: torch.Tensor, ref: torch.Tensor, items: list[Item], cfg: LofitConfig) -> torch.Tensor:
    if cfg.loss is LofitLoss.DPO:
        margin = (sums[:, 0] - ref[:, 0]) - (sums[:, 1] - ref[:, 1])
        return -F.logsigmoid(cfg.beta * margin).mean()
    n_tok = torch.tensor([len(it.choices[0]) for it in items], dtype=sums.dtype, device=sums.device)
    return -(sums[:, 0] / n_tok).mean()


def _reference(lm: LoadedModel, items: list[Item], pad_id: int, cfg: LofitConfig) -> torch.Tensor:
    """The unsteered model's summed log-probs of both completions (DPO's reference; SFT needs none)."""
    size = cfg.batch_size
    if cfg.loss is not LofitLoss.DPO:
        return torch.zeros(len(items), 2, dtype=torch.float64)
    with torch.no_grad():
        return torch.cat([choice_logprob_sums(lm.model, items[i : i + size], pad_id)[:, :2]
                          for i in range(0, len(items), size)])


def _train(lm, items, ref, interventions, params, penalty, epochs, lr, cfg, pad_id, desc, progress) -> list[float]:
    """Adam on ``params`` through the hooked model; returns the mean loss per epoch."""
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    with frozen(lm.model), intervene(lm.layout, interventions):
        for epoch in range(epochs):
            losses = []
            batches = _batches(len(items), cfg.batch_size, gen)
            for idx in tqdm(batches, desc=f"{desc} (epoch {epoch + 1}/{epochs})", disable=not progress, unit="batch"):
                chunk = [items[i] for i in idx]
                sums = choice_logprob_sums(lm.model, chunk, pad_id)[:, :2]
                loss = _objective(sums, ref[idx], chunk, cfg)
                total = loss + penalty() if penalty else loss
                descend(opt, total, f"LoFiT {desc}", epoch, "lower lr (or beta) and try again")
                losses.append(float(loss.detach()))
            history.append(sum(losses) / len(losses))
    return history


def _head_sites(layout, layers) -> list[Site]:
    return [Site(l, SiteKind.HEAD_OUT, h) for l in layers for h in range(layout.n_heads)]


def select_heads(lm: LoadedModel, items: list[Item], ref: torch.Tensor, layers, cfg: LofitConfig, pad_id: int,
                 progress: bool) -> tuple[list[Site], dict[Site, float], list[float]]:
    """LoFiT step 1: train a scaling vector per head under an L1 penalty; the top ``cfg.heads`` by norm."""
    sites = _head_sites(lm.layout, layers)
    dim = lm.layout.site_dim(sites[0])
    scales = torch.zeros(len(sites), dim, requires_grad=True)

    def scaler(i):  # z * (1 + a), written so a small a survives bf16 (1 + a would round to 1)
        return lambda z: z + z * scales[i].to(device=z.device, dtype=z.dtype)

    ivs = [Intervention(s, Lambda(scaler(i), dim)) for i, s in enumerate(sites)]
    history = _train(lm, items, ref, ivs, [scales], lambda: cfg.l1 * scales.abs().sum(), cfg.select_epochs,
                     cfg.select_lr, cfg, pad_id, "LoFiT head selection", progress)
    norms = {s: float(n) for s, n in zip(sites, scales.detach().norm(dim=-1))}
    ranked = sorted(norms, key=lambda s: -norms[s])
    if norms[ranked[cfg.heads - 1]] == 0:
        raise SteerscaleError(f"LoFiT head selection left fewer than {cfg.heads} heads with a non-zero scaling",
                              "lower l1, raise select_lr or select_epochs, or ask for fewer heads")
    return sorted(ranked[: cfg.heads]), norms, history


def fit_lofit(lm: LoadedModel, pairs, config: LofitConfig | None = None, layers="auto", sites: list[Site] | None = None,
              chat: bool | None = None, progress: bool = True, **knobs) -> SteeringVector:
    """Learn LoFiT offsets from contrastive prompt pairs (a JSONL path, dicts or ``ContrastPair`` list).

    ``layers``: where heads may be chosen (``auto`` = every layer, or a spec as in ``extract``). ``sites``: skip
    step 1 and train offsets on these ``head_out`` sites. ``knobs`` override ``LofitConfig`` fields."""
    cfg = LofitConfig.build(config, **knobs)
    pairs = as_pairs(pairs, "LoFiT")
    layout = lm.layout
    chosen_layers = parse_layers(layers, layout.n_layers)
    layers = range(layout.n_layers) if chosen_layers == "auto" else chosen_layers
    if sites is None and cfg.heads > len(layers) * layout.n_heads:
        raise SteerscaleError(f"LoFiT asked for {cfg.heads} heads, but layers {list(layers)} have only "
                              f"{len(layers) * layout.n_heads}", "ask for fewer heads or allow more layers")
    items = pair_items(lm.tokenizer, pairs, chat)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ref = _reference(lm, items, pad_id, cfg)

    norms, select_history = {}, []
    if sites is None:
        if cfg.select_epochs == 0:
            raise SteerscaleError("LoFiT with select_epochs=0 needs the heads to train", "pass sites=[Site(...), ...]")
        heads, norms, select_history = select_heads(lm, items, ref, layers, cfg, pad_id, progress)
    else:
        heads = sorted(Site.parse(h) if isinstance(h, str) else h for h in sites)
        if not heads or len(set(heads)) != len(heads):
            raise SteerscaleError(f"LoFiT sites must be distinct head_out sites, got {[s.key() for s in heads]}",
                                  "name each head once, or pass sites=None to select heads by training")
        for s in heads:
            layout.locate(s)
            if s.kind is not SiteKind.HEAD_OUT:
                raise SteerscaleError(f"LoFiT trains per-head offsets; {s.key()} is not a head_out site")

    dim = layout.site_dim(heads[0])
    offsets = [torch.zeros(dim, requires_grad=True) for _ in heads]
    ivs = [Intervention(s, Affine(bias=v)) for s, v in zip(heads, offsets)]
    history = _train(lm, items, ref, ivs, offsets, None, cfg.epochs, cfg.lr, cfg, pad_id, "LoFiT offsets", progress)

    directions = {s: v.detach().clone() for s, v in zip(heads, offsets)}
    return SteeringVector(
        directions,
        model_name=lm.name,
        model_fingerprint=fingerprint(layout),
        method=NAME,
        metadata={
            "site_kind": "head_out",
            "layer_convention": "0-based block index; head_out = input of the attention output projection, per head",
            "layers": "auto" if chosen_layers == "auto" else list(chosen_layers),
            "n_pairs": len(pairs),
            "data_hash": pairs_hash(pairs),
            "data": "pairs",
            "lofit": {**asdict(cfg), "loss": cfg.loss.value},
            "loss_history": history,
            "select_loss_history": select_history,
            "per_site": {s.key(): {"selection_norm": norms.get(s), "offset_norm": float(directions[s].norm())}
                         for s in heads},
            "selection_norms": {s.key(): round(n, 6) for s, n in norms.items()},  # every candidate head
        },
    )
