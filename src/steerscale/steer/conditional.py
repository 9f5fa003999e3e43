"""Conditional activation steering (CAST, Lee et al. 2024): steer a prompt only when a condition read from it holds.

A ``Condition`` is a direction at one residual site with a threshold: the prompt's activation there (the mean
over its real tokens by default), centred on the training mean, has a cosine similarity with the direction that
is greater (or less) than the threshold. ``fit_condition`` learns it from labelled prompts (label 1: the
condition should hold, e.g. harmful requests): the direction is the difference of the class means on a fitting
split, and the layer, threshold and comparison are chosen by a grid search on F1 on a held-out selection split.
``ConditionalSteering`` adds a behaviour vector to the rows whose conditions hold (``any`` or ``all`` of
several); it is an ``engine.prompt_rules.PromptRule``, so ``generate(rules=[...])``, ``LocalBackend(rules=...)``
and the server's per-request ``condition`` field run it with per-row decisions in one batch.

CAST's paper reads the condition as the cosine between the hidden state and its projection on a PCA direction;
here the direction is the class-mean difference and the activation is centred first, which separates classes
whose means differ mostly along one direction without a PCA step (reported F1 per layer in the artifact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar, Sequence

import numpy as np
import torch

from ..engine.capture import Readout, capture, tokenize
from ..engine.generation import format_prompt
from ..engine.prompt_rules import PromptRule, Read
from ..engine.scope import ALL_TOKENS, TokenScope
from ..errors import SteerscaleError
from ..models.layout import ModelLayout
from ..models.loading import LoadedModel
from ..models.sites import Site
from . import artifacts
from .layers import parse_layers
from .vector import SteeringVector

FORMAT = "steerscale.condition/1"


class Comparison(str, Enum):
    GREATER = "greater"  # the condition holds when the similarity is above the threshold
    LESS = "less"


class Combine(str, Enum):
    ANY = "any"  # steer when at least one condition holds
    ALL = "all"  # steer only when every condition holds


@dataclass(eq=False)
class Condition(artifacts.SavedArtifact):
    """``cos(reading - mean, direction) > threshold`` (or ``<`` with ``Comparison.LESS``) at ``site``."""

    FORMAT: ClassVar[str] = FORMAT
    WHAT: ClassVar[str] = "condition"
    REMAKE: ClassVar[str] = "refit the condition"

    site: Site
    direction: torch.Tensor
    mean: torch.Tensor
    threshold: float
    comparison: Comparison = Comparison.GREATER
    readout: Readout = Readout.MEAN
    model_name: str = ""
    model_fingerprint: str = ""
    metadata: dict = field(default_factory=dict)
    prefix: tuple[int, ...] = ()  # the chat template's fixed start, left out of a mean readout (see Read)

    def __post_init__(self):
        self.site = self.site if isinstance(self.site, Site) else Site.parse(self.site)
        self.direction = torch.as_tensor(self.direction, dtype=torch.float32).detach().cpu()
        self.mean = torch.as_tensor(self.mean, dtype=torch.float32).detach().cpu()
        if self.direction.dim() != 1 or self.mean.shape != self.direction.shape:
            raise SteerscaleError(f"condition direction and mean must be 1-D of one size, got "
                                  f"{tuple(self.direction.shape)} and {tuple(self.mean.shape)}")
        if not (torch.isfinite(self.direction).all() and torch.isfinite(self.mean).all()) or self.direction.norm() == 0:
            raise SteerscaleError("condition direction must be finite and non-zero, and its mean finite",
                                  "refit the condition (its classes may not differ at this site)")
        self.direction = self.direction / self.direction.norm()
        self.threshold = float(self.threshold)
        if not math.isfinite(self.threshold):
            raise SteerscaleError(f"condition threshold must be finite, got {self.threshold}")
        self.comparison = Comparison(self.comparison)
        read = Read(self.site, self.readout, self.prefix)  # checks the site, readout and prefix
        self.readout, self.prefix = read.readout, read.prefix

    @property
    def read(self) -> Read:
        return Read(self.site, self.readout, self.prefix)

    def similarity(self, readings: torch.Tensor) -> torch.Tensor:
        """(rows,) cosine similarity of each centred reading with the direction."""
        x = readings.float() - self.mean
        return (x @ self.direction) / x.norm(dim=-1).clamp_min(1e-8)

    def holds(self, readings: torch.Tensor) -> torch.Tensor:
        sim = self.similarity(readings)
        return sim > self.threshold if self.comparison is Comparison.GREATER else sim < self.threshold

    def check(self, layout: ModelLayout) -> None:
        artifacts.check_model("condition", self.model_name, self.model_fingerprint, layout)
        artifacts.check_site("condition", layout, self.site, self.direction.shape[0], "fit it on this model")

    def __repr__(self) -> str:
        op = ">" if self.comparison is Comparison.GREATER else "<"
        return f"Condition({self.site.key()}: cos {op} {self.threshold:.3f}, model={self.model_name!r})"

    # -- files (save, load: artifacts.SavedArtifact) ----------------------------------------------------------
    def to_file(self) -> tuple[dict[str, torch.Tensor], dict]:
        header = {"site": self.site.key(), "threshold": self.threshold, "comparison": self.comparison.value,
                  "readout": self.readout.value, "prefix": list(self.prefix), "model_name": self.model_name,
                  "model_fingerprint": self.model_fingerprint, "metadata": self.metadata}
        return {"direction": self.direction, "mean": self.mean}, header

    @classmethod
    def from_file(cls, tensors: dict[str, torch.Tensor], h: dict) -> "Condition":
        return cls(Site.parse(h["site"]), tensors["direction"], tensors["mean"], float(h["threshold"]),
                   h.get("comparison", "greater"), h.get("readout", "mean"), str(h.get("model_name", "")),
                   str(h.get("model_fingerprint", "")), dict(h.get("metadata") or {}), tuple(h.get("prefix", ())))


@dataclass(eq=False)
class ConditionalSteering(PromptRule):
    """Add ``scale * vector`` to the rows whose prompt meets the conditions (``combine``: any or all of them)."""

    vector: SteeringVector
    conditions: Sequence[Condition]
    scale: float = 1.0
    combine: Combine = Combine.ANY
    scope: TokenScope = ALL_TOKENS

    def __post_init__(self):
        if isinstance(self.conditions, Condition):
            self.conditions = [self.conditions]
        self.conditions = list(self.conditions)
        if not self.conditions or not all(isinstance(c, Condition) for c in self.conditions):
            raise SteerscaleError("conditional steering needs one or more Condition objects",
                                  "fit one with fit_condition(...) or Condition.load(path)")
        if not isinstance(self.vector, SteeringVector):
            raise SteerscaleError(f"conditional steering needs a SteeringVector, got {type(self.vector).__name__}")
        self.scale = float(self.scale)
        if not math.isfinite(self.scale):
            raise SteerscaleError(f"scale must be finite, got {self.scale}")
        self.combine = Combine(self.combine)
        self.scope = TokenScope.parse(self.scope)

    @property
    def reads(self) -> tuple[Read, ...]:
        return tuple(dict.fromkeys(c.read for c in self.conditions))

    def decide(self, readings: dict[Read, torch.Tensor]) -> torch.Tensor:
        """(rows,) bool: whether each row is steered."""
        held = torch.stack([c.holds(readings[c.read]) for c in self.conditions])
        return held.any(0) if self.combine is Combine.ANY else held.all(0)

    def site_scales(self, readings):
        on = self.decide(readings).float() * self.scale
        return {site: (direction, on) for site, direction in self.vector.directions.items()}

    def check(self, layout: ModelLayout) -> None:
        self.vector.check_compatible(layout)
        for c in self.conditions:
            c.check(layout)


# -- fitting -----------------------------------------------------------------------------------------------------
def split_labelled(n: int, holdout: float, seed: int, what: str, minimum: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Fit / select indices of ``n`` examples of one class; too few for either side is an error."""
    if not 0 < holdout < 1:
        raise SteerscaleError(f"holdout must be between 0 and 1, got {holdout}")
    order = np.random.default_rng(seed).permutation(n)
    n_sel = int(round(n * holdout))
    if n_sel < minimum or n - n_sel < minimum:
        raise SteerscaleError(f"too few labelled examples: {n} {what} give {n - n_sel} to fit and {n_sel} to select "
                              f"on (at least {minimum} each)",
                              f"give at least {math.ceil(minimum / min(holdout, 1 - holdout))} {what}")
    return order[n_sel:], order[:n_sel]


def f1_grid(pos: np.ndarray, neg: np.ndarray, n_thresholds: int = 101) -> tuple[float, float, Comparison, dict]:
    """Best (F1, threshold, comparison) for scores ``pos`` (should hold) and ``neg`` (should not), over thresholds
    midway between sorted unique scores (at most ``n_thresholds`` of them) and both comparisons."""
    scores = np.unique(np.concatenate([pos, neg]))
    mids = (scores[:-1] + scores[1:]) / 2 if len(scores) > 1 else scores
    if len(mids) > n_thresholds:
        mids = np.quantile(mids, np.linspace(0, 1, n_thresholds))
    best = (-1.0, 0.0, Comparison.GREATER, {})
    for comp in Comparison:
        for t in mids:
            tp = (pos > t).sum() if comp is Comparison.GREATER else (pos < t).sum()
            fp = (neg > t).sum() if comp is Comparison.GREATER else (neg < t).sum()
            f1 = 2 * tp / (len(pos) + tp + fp) if tp else 0.0
            if f1 > best[0]:
                best = (float(f1), float(t), comp, {"precision": float(tp / (tp + fp)), "recall": float(tp / len(pos)),
                                                    "false_positive_rate": float(fp / len(neg))})
    return best


def fit_condition(lm: LoadedModel, positive: Sequence[str], negative: Sequence[str], layers="auto",
                  readout: Readout | str = Readout.MEAN, holdout: float = 0.3, seed: int = 0, chat: bool | None = None,
                  batch_size: int = 16, progress: bool = True) -> Condition:
    """Learn when to steer: ``positive`` prompts (the condition should hold) vs ``negative`` prompts.

    Prompts are chat-formatted as generation formats them. Each class is split into a fitting part and a
    selection part (``holdout``); for every candidate layer (``auto``: all) the direction is the fitting part's
    class-mean difference and the threshold and comparison maximise F1 on the selection part; the best layer
    wins (ties: the earlier layer, whose reading pass is cheaper). The per-layer F1 is kept in the metadata."""
    positive, negative = list(positive), list(negative)
    readout = Read(Site(0), readout).readout  # one a condition can use, checked before any model work
    tr_p, se_p = split_labelled(len(positive), holdout, seed, "positive prompts")
    tr_n, se_n = split_labelled(len(negative), holdout, seed + 1, "negative prompts")
    layout = lm.layout
    chosen = parse_layers(layers, layout.n_layers)
    sites = [Site(layer) for layer in (range(layout.n_layers) if chosen == "auto" else chosen)]
    texts = [format_prompt(lm.tokenizer, t, chat) for t in positive + negative]
    prefix, spans = prefix_spans(lm.tokenizer, texts, readout, chat)
    acts = capture(lm.model, lm.tokenizer, layout, texts, sites, readout, spans, batch_size=batch_size,
                   progress=progress, desc="reading prompts")
    grid, best = {}, None
    for site in sites:
        x = acts[site].float()
        xp, xn = x[: len(positive)], x[len(positive):]
        mean = (xp[tr_p].mean(0) + xn[tr_n].mean(0)) / 2
        direction = xp[tr_p].mean(0) - xn[tr_n].mean(0)
        if direction.norm() == 0:
            continue
        probe = Condition(site, direction, mean, 0.0, readout=readout)
        f1, t, comp, stats = f1_grid(probe.similarity(xp[se_p]).numpy(), probe.similarity(xn[se_n]).numpy())
        grid[site.key()] = {"f1": round(f1, 4), "threshold": t, "comparison": comp.value,
                            **{k: round(v, 4) for k, v in stats.items()}}
        if best is None or f1 > best[0] + 1e-9:
            best = (f1, site, direction, mean, t, comp, stats)
    if best is None:
        raise SteerscaleError("the two prompt sets give identical activations at every layer",
                              "check that the positive and negative prompts differ")
    f1, site, direction, mean, t, comp, stats = best
    meta = {"f1": f1, **stats, "n_positive": len(positive), "n_negative": len(negative), "holdout": holdout,
            "seed": seed, "grid": grid, "method": "cast", "chat": chat}
    return Condition(site, direction, mean, t, comp, readout, lm.name, artifacts.fingerprint(layout), meta, prefix)


def template_prefix(tokenizer, chat: bool | None = None) -> tuple[int, ...]:
    """The token ids every prompt formatted with ``tokenizer``'s chat template starts with (the system prompt and
    the user's role header); empty without a template. Read off two different one-word prompts."""
    a, b = (tokenize(tokenizer, [format_prompt(tokenizer, w, chat)], "cpu").input_ids[0].tolist()
            for w in ("one", "two"))
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return tuple(a[:n])


def prefix_spans(tokenizer, texts: list[str], readout: Readout, chat: bool | None
                 ) -> tuple[tuple[int, ...], list[tuple[int, int]] | None]:
    """For a mean readout: the template's prefix and the capture spans that leave it out of ``texts``, exactly as
    ``Read.spans`` will at run time."""
    if Readout(readout) is not Readout.MEAN:
        return (), None
    prefix = template_prefix(tokenizer, chat)
    if not prefix:
        return (), None
    read = Read(Site(0), Readout.MEAN, prefix)
    return prefix, [read.spans(tokenize(tokenizer, [t], "cpu"))[0] for t in texts]


def grid_plot(condition: Condition, path) -> None:
    """F1 on the selection split per layer (the grid search's result), the chosen layer marked; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = condition.metadata.get("grid") or {}
    if not grid:
        raise SteerscaleError("this condition has no grid search in its metadata", "fit it with fit_condition")
    layers = sorted((Site.parse(k).layer, v["f1"]) for k, v in grid.items())
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([x for x, _ in layers], [y for _, y in layers], marker="o")
    ax.axvline(condition.site.layer, color="r", linestyle="--", label=f"chosen: layer {condition.site.layer}")
    ax.set_xlabel("layer (resid_post)")
    ax.set_ylabel("F1 on the selection split")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title("CAST condition: grid search")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



def prompt_direction(lm: LoadedModel, positive: Sequence[str], negative: Sequence[str], layers,
                     readout: Readout | str = Readout.LAST, chat: bool | None = None, batch_size: int = 16,
                     progress: bool = True) -> SteeringVector:
    """The difference of the two prompt sets' mean activations (chat-formatted prompts, the last token by default)
    at each of ``layers`` (resid_post): e.g. the refusal direction of Arditi et al. from harmful vs harmless
    instructions, the behaviour vector CAST and controllers add."""
    positive, negative = list(positive), list(negative)
    if min(len(positive), len(negative)) < 2:
        raise SteerscaleError(f"too few labelled examples: {len(positive)} positive and {len(negative)} negative "
                              "prompts", "give at least 2 of each")
    chosen = parse_layers(layers, lm.layout.n_layers)
    if chosen == "auto":
        raise SteerscaleError("prompt_direction needs explicit layers", "e.g. layers='10' or '8-12'")
    sites = [Site(layer) for layer in chosen]
    texts = [format_prompt(lm.tokenizer, t, chat) for t in positive + negative]
    acts = capture(lm.model, lm.tokenizer, lm.layout, texts, sites, readout, batch_size=batch_size,
                   progress=progress, desc="reading prompts")
    n = len(positive)
    directions = {s: acts[s][:n].float().mean(0) - acts[s][n:].float().mean(0) for s in sites}
    return SteeringVector(directions, lm.name, artifacts.fingerprint(lm.layout), "prompt_mean_diff",
                          {"n_positive": n, "n_negative": len(negative), "read": Readout(readout).value,
                           "layers": list(chosen), "chat": chat})
