"""From contrastive data to a ``SteeringVector``: read activations, choose layers/heads, fit a direction.

Pipeline: ``pair_texts`` (chat template for prompt pairs) -> ``collect`` (one capture pass over all candidate
sites) -> ``sweep`` (held-out probe accuracy per layer, or per head for a per-head method) -> the method's ``fit``
per chosen site. What a method needs (activations or the model, pairs or labelled texts, per-head sites, knobs) is
read from its entry in ``steer.methods.METHODS`` (a ``steer.capabilities.Capability``); no method is named here.

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
from .capabilities import Capability, Data, Reads, names_with, train_knobs
from .layers import best_layer, parse_layers
from .methods import DEFAULT_METHOD, METHODS
from .methods.iti import fit as _iti_direction  # noqa: F401 (its first import path, used by bench/truthfulqa_steering.py)
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
    method: str = DEFAULT_METHOD,
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

    ``method``: a name in ``steer.methods.METHODS`` (docs/steering.md lists them). ``iti_heads``: how many heads
    a per-head method steers. ``train``: the knobs of a method that trains, e.g. ``"epochs=3,lr=0.01"`` (its
    entry's ``knobs`` dataclass; a method without knobs refuses them). ``layers``: ``auto`` or explicit (see
    ``parse_layers``); for residual methods with explicit layers one direction is fitted per layer.
    """
    pairs = as_pairs(pairs, "extraction")
    name, cap = METHODS.canonical(method), METHODS[method]
    knobs = train_knobs(METHODS, method, train)
    if cap.reads is Reads.MODEL:
        if return_sweep:
            raise SteerscaleError(f"{name} chooses where to steer by its own fitting, not by a probe sweep",
                                  "run probe_sweep (or a method that reads activations) for the sweep, or "
                                  "drop return_sweep")
        shared = {"heads": iti_heads, "seed": seed, "holdout": holdout}  # batch_size: each has its own knob
        return cap.fit(lm, pairs, layers=layers, chat=chat, progress=progress,
                       **{**{k: shared[k] for k in cap.settings}, **knobs})
    texts, data = _pair_data(lm, pairs, chat)
    return _extract(lm, texts, data, name, cap, knobs, layers, read, iti_heads, holdout, seed, batch_size, progress,
                    return_sweep)


def extract_labelled(lm: LoadedModel, examples, method: str = DEFAULT_METHOD, layers="auto", read: Readout | str = Readout.MEAN,
                     iti_heads: int = 16, holdout: float = 0.3, seed: int = 0, batch_size: int = 16,
                     progress: bool = True, return_sweep: bool = False, train: str | dict | None = None):
    """Like ``extract`` for labelled texts (a ``{"text", "label"}`` JSONL path or ``(text, label)`` tuples):
    label 1 is the side a positive scale moves toward. Methods whose entry does not take labelled texts (those
    that need pairs, and those that fit on the model) are refused; the mean-difference method is then the
    difference of class means."""
    name, cap = METHODS.canonical(method), METHODS[method]
    if not cap.accepts(Data.LABELLED):
        raise SteerscaleError(f"method {name!r} needs contrastive pairs, not labelled texts",
                              f"use {' or '.join(labelled_methods())} with labelled data, or write the data as pairs")
    if cap.reads is not Reads.ACTIVATIONS:
        raise SteerscaleError(f"method {name!r} fits on the model; labelled texts are read only by methods that fit "
                              "on activations", f"use {' or '.join(labelled_methods())}")
    knobs = train_knobs(METHODS, method, train)
    texts, data = _labelled_data(lm, examples)
    return _extract(lm, texts, data, name, cap, knobs, layers, read, iti_heads, holdout, seed, batch_size, progress,
                    return_sweep)


def labelled_methods() -> list[str]:
    """The methods that fit on labelled texts (from their registry entries)."""
    return names_with(METHODS, lambda c: c.accepts(Data.LABELLED) and c.reads is Reads.ACTIVATIONS)


def probe_sweep(lm: LoadedModel, pairs=None, labelled=None, per_head: bool = False, read: Readout | str = Readout.LAST,
                heads: int = 16, holdout: float = 0.3, seed: int = 0, batch_size: int = 16, chat: bool | None = None,
                progress: bool = True) -> Sweep:
    """Held-out probe accuracy at every layer (or, ``per_head``, every attention head) for contrastive ``pairs`` or
    ``labelled`` texts, and the sites ``layers="auto"`` (or a per-head method's ``heads`` choice) would take. No
    direction is fitted."""
    if (pairs is None) == (labelled is None):
        raise SteerscaleError("a probe sweep reads contrastive pairs or labelled texts", "give one of them")
    texts, _ = _pair_data(lm, as_pairs(pairs, "sweep"), chat) if pairs is not None else _labelled_data(lm, labelled)
    sites, chosen_layers = _candidates(lm.layout, "auto", per_head)
    pos, neg = collect(lm, texts, sites, read, batch_size, progress)
    return _choose(pos, neg, sites, chosen_layers, per_head, heads, holdout, seed, lm.layout.n_layers)


def _pair_data(lm: LoadedModel, pairs: list[ContrastPair], chat) -> tuple[PairTexts, dict]:
    return (pair_texts(lm.tokenizer, pairs, chat),
            {"n_pairs": len(pairs), "data_hash": pairs_hash(pairs), "data": "pairs"})


def _labelled_data(lm: LoadedModel, examples) -> tuple[PairTexts, dict]:
    examples = examples if isinstance(examples, list) and examples and isinstance(examples[0], tuple) else load_labelled(examples)
    blob = json.dumps(examples).encode()
    return (labelled_texts(lm.tokenizer, examples),
            {"n_examples": len(examples), "data_hash": hashlib.sha256(blob).hexdigest()[:16], "data": "labelled"})


def _candidates(layout, layers, per_head: bool) -> tuple[list[Site], list[int] | str]:
    """The sites a method reads (every head of the candidate layers, or their residual stream) and the parsed
    layer choice."""
    chosen_layers = parse_layers(layers, layout.n_layers)
    candidate_layers = range(layout.n_layers) if chosen_layers == "auto" else chosen_layers
    if per_head:
        return [Site(l, SiteKind.HEAD_OUT, h) for l in candidate_layers for h in range(layout.n_heads)], chosen_layers
    return [Site(l) for l in candidate_layers], chosen_layers


def _choose(pos, neg, sites: list[Site], chosen_layers, per_head: bool, heads: int, holdout: float, seed: int,
            n_layers: int) -> Sweep:
    """Where to steer: the top ``heads`` heads by held-out probe accuracy, the ``auto`` layer, or every given
    layer (no sweep)."""
    if per_head:
        accuracy = sweep(pos, neg, holdout, seed)
        k = min(heads, len(sites))
        return Sweep(accuracy, sorted(sorted(accuracy, key=lambda s: -accuracy[s])[:k]))
    if chosen_layers == "auto":
        accuracy = sweep(pos, neg, holdout, seed)
        return Sweep(accuracy, [pick_layer(accuracy, n_layers)])
    return Sweep({}, list(sites))


def _extract(lm, texts: PairTexts, data: dict, name: str, cap: Capability, knobs: dict, layers, read, heads, holdout,
             seed, batch_size, progress, return_sweep):
    layout = lm.layout
    per_head = cap.per_head
    sites, chosen_layers = _candidates(layout, layers, per_head)
    pos, neg = collect(lm, texts, sites, read, batch_size, progress)
    where = _choose(pos, neg, sites, chosen_layers, per_head, heads, holdout, seed, layout.n_layers)
    accuracy, chosen = where.accuracy, where.chosen

    directions, per_site = {}, {}
    for s in chosen:
        directions[s], per_site[s.key()] = cap.fit(pos[s], neg[s], **knobs)
        if per_head:
            per_site[s.key()]["probe_accuracy"] = accuracy[s]
    vector = SteeringVector(
        directions,
        model_name=lm.name,
        model_fingerprint=fingerprint(layout),
        method=name,
        metadata={
            "site_kind": cap.sites.value,
            "layer_convention": "0-based block index; resid_post = output of the block",
            "layers": "auto" if chosen_layers == "auto" else chosen_layers,
            "read": Readout(read).value,
            **data,
            "holdout": holdout,
            "seed": seed,
            "iti_heads": heads if per_head else None,
            "per_site": per_site,
            "sweep": {s.key(): a for s, a in accuracy.items()},
            **({"train": knobs} if knobs else {}),
        },
    )
    return (vector, where) if return_sweep else vector


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
