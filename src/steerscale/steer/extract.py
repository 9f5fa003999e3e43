"""From contrastive data to a ``SteeringVector``: read activations, choose layers/heads, fit a direction.

Pipeline: ``pair_texts`` (chat template for prompt pairs) -> ``collect`` (one capture pass over all candidate
sites) -> ``sweep`` (held-out probe accuracy per layer, or per head for ITI) -> the method's ``fit`` per chosen site.

``layers="auto"`` picks the layer with the best held-out probe accuracy, ties (within one point) broken toward
the middle of the network, where steering is usually most effective. ITI picks the top-K heads over the given
(or all) layers by held-out probe accuracy, as in Li et al. 2023.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine.capture import Readout, capture
from ..engine.generation import format_prompt
from ..errors import SteerscaleError
from ..models.loading import LoadedModel
from ..models.sites import Site, SiteKind
from .grains import GrainsConfig, fit_grains
from .layers import best_layer, parse_layers
from .lofit import LofitConfig, fit_lofit
from .methods import METHODS, get_method
from .methods.iti import fit as _iti_direction  # noqa: F401 (re-exported for bench/truthfulqa_steering.py)
from .methods.probe import probe_accuracies
from .pairs import ContrastPair, as_pairs, load_labelled, pairs_hash
from .vector import SteeringVector, fingerprint


@dataclass
class PairTexts:
    positive: list[str]
    negative: list[str]
    positive_spans: list[tuple[int, int]] | None  # completion token span (real-token indices) per text
    negative_spans: list[tuple[int, int]] | None


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pair_texts(tokenizer, pairs: list[ContrastPair], chat: bool | None = None) -> PairTexts:
    """Full texts for each side; for prompt pairs also the completion's token span (for mean readouts).

    A pair whose two sides tokenize identically carries no contrast (its difference is exactly zero) and is an
    error, named by its index."""
    pos, neg, pos_spans, neg_spans = [], [], [], []
    for i, p in enumerate(pairs):
        prefix = format_prompt(tokenizer, p.prompt, chat) if p.prompt is not None else ""
        start = len(_ids(tokenizer, prefix)) if prefix else 0
        ids = [_ids(tokenizer, prefix + side) for side in (p.positive, p.negative)]
        if ids[0] == ids[1]:
            raise SteerscaleError(f"pair {i}: positive and negative texts tokenize identically ({p.positive[:60]!r})",
                                  "each pair must differ in the behaviour to steer; fix or drop that line")
        for side, texts, spans, n in ((p.positive, pos, pos_spans, len(ids[0])), (p.negative, neg, neg_spans, len(ids[1]))):
            texts.append(prefix + side)
            spans.append((start, max(start + 1, n)))
    return PairTexts(pos, neg, pos_spans, neg_spans)


def labelled_texts(tokenizer, examples: list[tuple[str, int]], max_ratio: float = 4.0) -> PairTexts:
    """Class-1 texts as the positive side and class-0 texts as the negative side (unpaired)."""
    pos = [t for t, y in examples if y == 1]
    neg = [t for t, y in examples if y == 0]
    if min(len(pos), len(neg)) < 2:
        raise SteerscaleError(f"labelled data has {len(pos)} examples of label 1 and {len(neg)} of label 0",
                              "give at least 2 examples of each label")
    if max(len(pos), len(neg)) > max_ratio * min(len(pos), len(neg)):
        raise SteerscaleError(
            f"labels are unbalanced: {len(pos)} of label 1 vs {len(neg)} of label 0 (more than {max_ratio:g}:1)",
            "a probe would mostly learn the base rate; subsample the larger class")
    spans = lambda texts: [(0, len(_ids(tokenizer, t))) for t in texts]  # noqa: E731
    return PairTexts(pos, neg, spans(pos), spans(neg))


def collect(lm: LoadedModel, texts: PairTexts, sites: list[Site], read: Readout | str = Readout.LAST,
            batch_size: int = 16, progress: bool = True) -> tuple[dict[Site, torch.Tensor], dict[Site, torch.Tensor]]:
    """Activations ``(n_pairs, dim)`` of positive and negative texts at every site, in one capture pass."""
    read = Readout(read)
    if read is Readout.ALL:
        raise SteerscaleError("extraction reads one vector per text", "use read='last' or read='mean'")
    n = len(texts.positive)
    spans = (texts.positive_spans + texts.negative_spans) if read is Readout.MEAN else None
    acts = capture(lm.model, lm.tokenizer, lm.layout, texts.positive + texts.negative, sites, read, spans=spans,
                   batch_size=batch_size, progress=progress, desc="reading activations")
    return {s: a[:n] for s, a in acts.items()}, {s: a[n:] for s, a in acts.items()}


@dataclass
class Sweep:
    """Held-out probe accuracy per site: what ``layers='auto'`` and ITI head selection decide on."""

    accuracy: dict[Site, float]
    chosen: list[Site] = field(default_factory=list)

    def table(self) -> list[dict]:
        return [{"site": s.key(), "layer": s.layer, "head": s.head, "accuracy": round(a, 4), "chosen": s in self.chosen}
                for s, a in sorted(self.accuracy.items())]


def sweep(pos: dict[Site, torch.Tensor], neg: dict[Site, torch.Tensor], holdout: float = 0.3, seed: int = 0) -> dict[Site, float]:
    """Held-out probe accuracy per site; sites of one width are fitted together in one batched solve."""
    out: dict[Site, float] = {}
    by_width: dict[tuple, list[Site]] = {}
    for s in pos:
        by_width.setdefault((pos[s].shape, neg[s].shape), []).append(s)
    for sites in by_width.values():
        accs = probe_accuracies([pos[s] for s in sites], [neg[s] for s in sites], holdout, seed)
        out.update({s: a[0] for s, a in zip(sites, accs)})
    return {s: out[s] for s in pos}


def pick_layer(accuracy: dict[Site, float], n_layers: int) -> Site:
    """The residual site ``layers=auto`` picks (``steer.layers.best_layer``'s rule)."""
    by_layer = {s.layer: s for s in accuracy}
    return by_layer[best_layer({s.layer: a for s, a in accuracy.items()}, n_layers)]


def extract(
    lm: LoadedModel,
    pairs,
    method: str = "caa",
    layers="auto",
    read: Readout | str = Readout.LAST,
    iti_heads: int = 16,
    holdout: float = 0.3,
    seed: int = 0,
    batch_size: int = 16,
    chat: bool | None = None,
    progress: bool = True,
    return_sweep: bool = False,
    train: str | dict | None = None,
):
    """Extract a steering vector from contrastive ``pairs`` (a JSONL path, dicts or ``ContrastPair`` list).

    ``method``: ``caa``, ``pca`` (= ``pca_diff``), ``pca_center``, ``probe`` (residual stream, resid_post),
    ``iti`` (per attention head), ``lofit`` (learned per-head offsets, ``steer.lofit``; ``iti_heads`` heads,
    ``train`` its other knobs, e.g. ``"epochs=3,lr=0.01"``) or ``grains`` (gradient-attributed residual
    directions, ``steer.grains``; ``train`` its knobs, e.g. ``"k=5,steps=32"``). ``layers``: ``auto`` or explicit (see
    ``parse_layers``); for residual methods with explicit layers one direction is fitted per layer.
    """
    pairs = as_pairs(pairs, "extraction")
    fitted_on_the_model = {  # methods that fit by running the model (training, attribution), not on activations
        "lofit": lambda: fit_lofit(lm, pairs, layers=layers, chat=chat, progress=progress,
                                   **{"heads": iti_heads, "seed": seed, **LofitConfig.parse(train)}),
        "grains": lambda: fit_grains(lm, pairs, layers=layers, chat=chat, progress=progress,
                                     **{"seed": seed, "holdout": holdout, **GrainsConfig.parse(train)}),
    }  # batch_size: each has its own knob
    fit = fitted_on_the_model.get(METHODS.canonical(method))
    if fit is not None:
        if return_sweep:
            raise SteerscaleError(f"{method} chooses where to steer by its own fitting, not by a probe sweep",
                                  "run the sweep with method caa or iti, or drop return_sweep")
        return fit()
    texts = pair_texts(lm.tokenizer, pairs, chat)
    data = {"n_pairs": len(pairs), "data_hash": pairs_hash(pairs), "data": "pairs"}
    return _extract(lm, texts, data, method, layers, read, iti_heads, holdout, seed, batch_size, progress, return_sweep)


def extract_labelled(lm: LoadedModel, examples, method: str = "caa", layers="auto", read: Readout | str = Readout.MEAN,
                     iti_heads: int = 16, holdout: float = 0.3, seed: int = 0, batch_size: int = 16,
                     progress: bool = True, return_sweep: bool = False):
    """Like ``extract`` for labelled texts (a ``{"text", "label"}`` JSONL path or ``(text, label)`` tuples):
    label 1 is the side a positive scale moves toward. Methods that need pairs (``pca_diff``, ``pca_center``)
    are refused; ``caa`` is the difference of class means, ``probe`` and ``iti`` fit on the classes."""
    examples = examples if isinstance(examples, list) and examples and isinstance(examples[0], tuple) else load_labelled(examples)
    if get_method(method).PAIRED_ONLY:
        raise SteerscaleError(f"method {method!r} needs contrastive pairs, not labelled texts",
                              "use caa, probe or iti with labelled data, or write the data as pairs")
    texts = labelled_texts(lm.tokenizer, examples)
    blob = json.dumps(examples).encode()
    data = {"n_examples": len(examples), "data_hash": hashlib.sha256(blob).hexdigest()[:16], "data": "labelled"}
    return _extract(lm, texts, data, method, layers, read, iti_heads, holdout, seed, batch_size, progress, return_sweep)


def _extract(lm, texts: PairTexts, data: dict, method, layers, read, iti_heads, holdout, seed, batch_size, progress,
             return_sweep):
    layout = lm.layout
    chosen_layers = parse_layers(layers, layout.n_layers)
    candidate_layers = range(layout.n_layers) if chosen_layers == "auto" else chosen_layers
    fitter = get_method(method)
    per_head = getattr(fitter, "PER_HEAD", False)  # ITI
    if per_head:
        sites = [Site(l, SiteKind.HEAD_OUT, h) for l in candidate_layers for h in range(layout.n_heads)]
    else:
        sites = [Site(l) for l in candidate_layers]
    pos, neg = collect(lm, texts, sites, read, batch_size, progress)

    accuracy: dict[Site, float] = {}
    if per_head:
        accuracy = sweep(pos, neg, holdout, seed)
        k = min(iti_heads, len(sites))
        chosen = sorted(sorted(accuracy, key=lambda s: -accuracy[s])[:k])
    elif chosen_layers == "auto":
        accuracy = sweep(pos, neg, holdout, seed)
        chosen = [pick_layer(accuracy, layout.n_layers)]
    else:
        chosen = sites

    directions, per_site = {}, {}
    for s in chosen:
        directions[s], per_site[s.key()] = fitter.fit(pos[s], neg[s])
        if per_head:
            per_site[s.key()]["probe_accuracy"] = accuracy[s]
    vector = SteeringVector(
        directions,
        model_name=lm.name,
        model_fingerprint=fingerprint(layout),
        method=fitter.NAME,
        metadata={
            "site_kind": "head_out" if per_head else "resid_post",
            "layer_convention": "0-based block index; resid_post = output of the block",
            "layers": "auto" if chosen_layers == "auto" else chosen_layers,
            "read": Readout(read).value,
            **data,
            "holdout": holdout,
            "seed": seed,
            "iti_heads": iti_heads if per_head else None,
            "per_site": per_site,
            "sweep": {s.key(): a for s, a in accuracy.items()},
        },
    )
    return (vector, Sweep(accuracy, chosen)) if return_sweep else vector


def sweep_plot(sweep_result: Sweep, path, title: str = "probe accuracy by site") -> None:
    """Line plot per layer (residual) or a layer x head heatmap (ITI), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = sweep_result.accuracy
    heads = [s for s in acc if s.head is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if heads:
        n_l = max(s.layer for s in heads) + 1
        n_h = max(s.head for s in heads) + 1
        grid = np.full((n_l, n_h), np.nan)
        for s in heads:
            grid[s.layer, s.head] = acc[s]
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
        fig.colorbar(im, ax=ax, label="held-out probe accuracy")
        for s in sweep_result.chosen:
            ax.plot(s.head, s.layer, "r+", markersize=8)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    else:
        sites = sorted(acc)
        ax.plot([s.layer for s in sites], [acc[s] for s in sites], marker="o")
        for s in sweep_result.chosen:
            ax.axvline(s.layer, color="r", linestyle="--", label=f"chosen layer {s.layer}")
        ax.set_xlabel("layer (resid_post)")
        ax.set_ylabel("held-out probe accuracy")
        ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
