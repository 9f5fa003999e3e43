"""A learned steering controller: a small network reads the prompt and sets how strongly, and at which layers, a
fixed direction is added.

``SteeringController`` holds a ``SteeringVector`` (the fixed direction at each edit site, e.g. the refusal
direction from harmful vs harmless prompts), the sites it reads, and a two-layer network: features are each read
site's prompt activation (mean over real tokens), standardised with training statistics and concatenated; the
network outputs a global strength ``max_strength * sigmoid(o_0)`` and one weight ``sigmoid(o_s)`` per edit site,
and row b gets ``strength_b * weight_{b,s} * direction_s`` at site s. It is an ``engine.prompt_rules.PromptRule``:
``generate(rules=[...])``, ``LocalBackend(rules=...)`` and the server's per-request ``controller`` field run it.

``train_controller`` learns the network end to end through the frozen model: on prompts that should be steered
(label 1) the loss is the negative log-likelihood of a target completion (for refusal: a refusal sentence), on
prompts that should not (label 0) that of the model's own unsteered greedy completion, so steering that changes
an unsteered answer costs loss and the network learns to hold back on those prompts. Each step runs the model
with the controller's edits through the ordinary hook runtime (teacher-forced scoring, ``engine.choices``); only
the network's few thousand parameters learn, and the model's weights and ``requires_grad`` flags are left as they
were, also when training stops on a non-finite loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch
from tqdm.auto import tqdm

from ..engine.capture import Readout, capture, tokenize
from ..engine.choices import build_items, choice_logprob_sums, head_is_separable
from ..engine.generation import format_prompt, generate
from ..engine.ops import Add
from ..engine.prompt_rules import PromptRule, Read, read_prompts
from ..engine.runtime import Intervention, intervene
from ..engine.scope import ALL_TOKENS, Scope, TokenScope
from ..errors import SteerscaleError
from ..models.layout import ModelLayout
from ..models.loading import LoadedModel
from ..models.sites import Site
from . import artifacts
from .conditional import prefix_spans, split_labelled
from .training import descend, frozen
from .vector import SteeringVector

FORMAT = "steerscale.controller/1"
_NET = ("w1", "b1", "w2", "b2", "feature_mean", "feature_std")
REFUSAL_TARGET = "I'm sorry, but I can't help with that."


@dataclass(eq=False)
class SteeringController(PromptRule, artifacts.SavedArtifact):
    """Per-row strength and per-site weights of ``vector``, predicted from the prompt's activations at ``inputs``."""

    FORMAT: ClassVar[str] = FORMAT
    WHAT: ClassVar[str] = "steering controller"
    REMAKE: ClassVar[str] = "retrain the controller"

    vector: SteeringVector
    inputs: Sequence[Site]
    net: dict[str, torch.Tensor]
    max_strength: float = 8.0
    readout: Readout = Readout.MEAN
    scope: TokenScope = ALL_TOKENS
    model_name: str = ""
    model_fingerprint: str = ""
    metadata: dict = field(default_factory=dict)
    gain: float = 1.0  # a run-time multiplier of the strength it sets (a request's scale); not saved
    prefix: tuple[int, ...] = ()  # the chat template's fixed start, left out of a mean readout (see Read)

    def __post_init__(self):
        if not isinstance(self.vector, SteeringVector):
            raise SteerscaleError(f"a controller steers a SteeringVector, got {type(self.vector).__name__}")
        self.inputs = tuple(s if isinstance(s, Site) else Site.parse(s) for s in self.inputs)
        if not self.inputs:
            raise SteerscaleError("a controller needs at least one site to read")
        missing = [k for k in _NET if k not in self.net]
        if missing:
            raise SteerscaleError(f"controller network lacks {', '.join(missing)}", "the file is damaged; retrain it")
        self.net = {k: torch.as_tensor(self.net[k], dtype=torch.float32) for k in _NET}
        shapes = {k: tuple(t.shape) for k, t in self.net.items()}
        hidden, n_features = shapes["w1"] if len(shapes["w1"]) == 2 else (0, 0)
        n_out = 1 + len(self.vector.directions)
        want = {"w1": (hidden, n_features), "b1": (hidden,), "w2": (n_out, hidden), "b2": (n_out,),
                "feature_mean": (n_features,), "feature_std": (n_features,)}
        if not hidden or shapes != want:
            raise SteerscaleError(f"controller network shapes {shapes} do not fit its vector ({n_out - 1} sites)",
                                  "the file is damaged; retrain it")
        if not all(torch.isfinite(t).all() for t in self.net.values()) or not (self.net["feature_std"] > 0).all():
            raise SteerscaleError("controller network contains NaN, inf or a zero feature scale",
                                  "retrain it (lower the learning rate)")
        self.max_strength = float(self.max_strength)
        if not (math.isfinite(self.max_strength) and self.max_strength > 0):
            raise SteerscaleError(f"max_strength must be a positive finite number, got {self.max_strength}")
        reads = [Read(s, self.readout, self.prefix) for s in self.inputs]  # checks sites, readout and prefix
        self.readout, self.prefix = reads[0].readout, reads[0].prefix
        self.scope = TokenScope.parse(self.scope)
        self.gain = float(self.gain)
        if not math.isfinite(self.gain):
            raise SteerscaleError(f"controller gain must be finite, got {self.gain}")

    @property
    def reads(self) -> tuple[Read, ...]:
        return tuple(Read(s, self.readout, self.prefix) for s in self.inputs)

    @property
    def edit_sites(self) -> list[Site]:
        return list(self.vector.directions)

    def outputs(self, readings: dict[Read, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(strength (rows,), weights (rows, edit sites)); differentiable in the network's tensors."""
        x = torch.cat([readings[r].float() for r in self.reads], dim=-1)
        n = self.net
        x = (x - n["feature_mean"]) / n["feature_std"]
        o = torch.tanh(x @ n["w1"].T + n["b1"]) @ n["w2"].T + n["b2"]
        return self.gain * self.max_strength * torch.sigmoid(o[:, 0]), torch.sigmoid(o[:, 1:])

    def scales(self, readings: dict[Read, torch.Tensor]) -> torch.Tensor:
        """(rows, edit sites): the multiplier of each site's direction in each row."""
        strength, weights = self.outputs(readings)
        return strength[:, None] * weights

    def site_scales(self, readings):
        s = self.scales(readings).detach()
        return {site: (self.vector.directions[site], s[:, i]) for i, site in enumerate(self.edit_sites)}

    def check(self, layout: ModelLayout) -> None:
        artifacts.check_model("controller", self.model_name, self.model_fingerprint, layout)
        self.vector.check_compatible(layout)
        for s in self.inputs:
            layout.locate(s)
        width = sum(layout.site_dim(s) for s in self.inputs)
        if width != self.net["w1"].shape[1]:
            raise SteerscaleError(f"controller reads {self.net['w1'].shape[1]} features, this model's input sites "
                                  f"give {width}", "train a controller on this model")

    def __repr__(self) -> str:
        return (f"SteeringController(inputs={[s.key() for s in self.inputs]}, "
                f"edits={[s.key() for s in self.edit_sites]}, "
                f"max_strength={self.max_strength}, model={self.model_name!r})")

    # -- files (save, load: artifacts.SavedArtifact) ----------------------------------------------------------
    def to_file(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"net.{k}": v for k, v in self.net.items()}
        tensors.update({f"direction.{s.key()}": v for s, v in self.vector.directions.items()})
        header = {"inputs": [s.key() for s in self.inputs], "max_strength": self.max_strength,
                  "readout": self.readout.value, "prefix": list(self.prefix), "scope": self.scope.text(),
                  "model_name": self.model_name,
                  "model_fingerprint": self.model_fingerprint, "metadata": self.metadata,
                  "vector": {"method": self.vector.method, "model_name": self.vector.model_name,
                             "model_fingerprint": self.vector.model_fingerprint}}
        return tensors, header

    @classmethod
    def from_file(cls, tensors: dict[str, torch.Tensor], h: dict) -> "SteeringController":
        directions = {Site.parse(k.removeprefix("direction.")): v for k, v in tensors.items()
                      if k.startswith("direction.")}
        v = dict(h.get("vector") or {})
        vector = SteeringVector(directions, str(v.get("model_name", "")), str(v.get("model_fingerprint", "")),
                                str(v.get("method", "custom")))
        net = {k.removeprefix("net."): t for k, t in tensors.items() if k.startswith("net.")}
        return cls(vector, list(h["inputs"]), net, float(h.get("max_strength", 8.0)), h.get("readout", "mean"),
                   h.get("scope", "all"), str(h.get("model_name", "")), str(h.get("model_fingerprint", "")),
                   dict(h.get("metadata") or {}), prefix=tuple(h.get("prefix", ())))


# -- training ----------------------------------------------------------------------------------------------------
def _init_net(n_features: int, hidden: int, n_sites: int, mean, std, generator) -> dict[str, torch.Tensor]:
    w1 = torch.randn(hidden, n_features, generator=generator) / math.sqrt(n_features)
    w2 = torch.randn(1 + n_sites, hidden, generator=generator) * 0.01
    return {"w1": w1, "b1": torch.zeros(hidden), "w2": w2, "b2": torch.zeros(1 + n_sites),
            "feature_mean": mean, "feature_std": std}


def train_controller(lm: LoadedModel, vector: SteeringVector, positive: Sequence[str], negative: Sequence[str],
                     inputs: Sequence[Site | str] | None = None, target: str = REFUSAL_TARGET,
                     max_strength: float = 8.0, hidden: int = 32, epochs: int = 3, lr: float = 3e-3,
                     batch_size: int = 16, negative_tokens: int = 16, readout: Readout | str = Readout.MEAN,
                     scope: TokenScope | str = ALL_TOKENS, chat: bool | None = None, seed: int = 0,
                     holdout: float = 0.0, progress: bool = True) -> SteeringController:
    """Train a controller for ``vector``: steer ``positive`` prompts toward ``target``, leave ``negative`` prompts'
    own answers (their first ``negative_tokens`` greedy tokens) as they are.

    ``inputs``: sites whose prompt activations the network reads (default: the vector's first site's layer).
    ``holdout`` > 0 keeps that fraction of each class out of training and reports the controller's mean strength
    on it in ``metadata["holdout"]``."""
    positive, negative = list(positive), list(negative)
    if min(len(positive), len(negative)) < 2:
        raise SteerscaleError(f"too few labelled examples: {len(positive)} positive and {len(negative)} negative "
                              "prompts", "give at least 2 of each")
    for name, value in (("epochs", epochs), ("hidden", hidden), ("batch_size", batch_size),
                        ("negative_tokens", negative_tokens)):
        if int(value) < 1:
            raise SteerscaleError(f"{name} must be at least 1, got {value}")
    if not (math.isfinite(lr) and lr > 0):
        raise SteerscaleError(f"lr must be a positive finite number, got {lr}")
    if not isinstance(target, str) or not target.strip():
        raise SteerscaleError("the positive target completion is empty", "pass target='...' (e.g. a refusal)")
    if TokenScope.parse(scope).kind is not Scope.ALL:
        raise SteerscaleError(f"a controller trains with scope 'all', got {scope!r}: its teacher-forced passes have "
                              "no generated part to tell apart", "train with scope='all' (the default), then "
                              "dataclasses.replace(controller, scope=...) to apply it elsewhere")
    Read(Site(0), readout)  # a readout a rule can use, checked before any model work
    layout = lm.layout
    vector.check_compatible(layout)
    inputs = tuple(Site.parse(s) if isinstance(s, str) else s for s in (inputs or [Site(vector.layers[0])]))
    for s in inputs:
        layout.locate(s)
    held = {}
    if holdout:
        tr_p, se_p = split_labelled(len(positive), holdout, seed, "positive prompts")
        tr_n, se_n = split_labelled(len(negative), holdout, seed + 1, "negative prompts")
        held = {"positive": [positive[i] for i in se_p], "negative": [negative[i] for i in se_n]}
        positive, negative = [positive[i] for i in tr_p], [negative[i] for i in tr_n]
    prompts = positive + negative
    labels = torch.tensor([1] * len(positive) + [0] * len(negative))

    # the negatives' own answers: what the controller must leave alone
    answers = []
    for i in tqdm(range(0, len(negative), batch_size), desc="unsteered answers", disable=not progress, unit="batch"):
        outs = generate(lm.model, lm.tokenizer, layout, negative[i: i + batch_size], max_new_tokens=negative_tokens,
                        chat=chat)
        answers += [o.text if o.text.strip() else (lm.tokenizer.eos_token or ".") for o in outs]
    items = build_items(lm.tokenizer, prompts, [[target]] * len(positive) + [[a] for a in answers], chat)
    texts = [format_prompt(lm.tokenizer, p, chat) for p in prompts]
    prefix, spans = prefix_spans(lm.tokenizer, texts, readout, chat)
    feats = capture(lm.model, lm.tokenizer, layout, texts, inputs, readout, spans, batch_size=batch_size,
                    progress=progress, desc="reading prompts")
    x = torch.cat([feats[s].float() for s in inputs], dim=-1)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-4)
    gen = torch.Generator().manual_seed(seed)
    net = _init_net(x.shape[1], hidden, len(vector.directions), mean, std, gen)
    params = [net[k].requires_grad_() for k in ("w1", "b1", "w2", "b2")]
    ctl = SteeringController(vector, inputs, net, max_strength, readout, scope, lm.name, artifacts.fingerprint(layout),
                             prefix=prefix)
    opt = torch.optim.Adam(params, lr=lr)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    sites = ctl.edit_sites
    history = []
    head_is_separable(lm.model)  # checked once outside the training hooks, so the scorer takes its fast path
    with frozen(lm.model):
        for epoch in range(epochs):
            order = torch.randperm(len(items), generator=gen).tolist()
            losses = []
            for start in tqdm(range(0, len(order), batch_size), desc=f"controller (epoch {epoch + 1}/{epochs})",
                              disable=not progress, unit="batch"):
                idx = order[start: start + batch_size]
                s = ctl.scales({r: feats[r.site][idx] for r in ctl.reads})
                edits = [Intervention(site, Add(vector.directions[site], s[:, j], preserve_norm=vector.preserve_norm),
                                      ctl.scope)
                         for j, site in enumerate(sites)]
                chunk = [items[i] for i in idx]
                with intervene(layout, edits):
                    sums = choice_logprob_sums(lm.model, chunk, pad_id)[:, 0]
                n_tok = torch.tensor([len(it.choices[0]) for it in chunk], dtype=sums.dtype)
                loss = -(sums / n_tok).mean()
                descend(opt, loss, "controller training", epoch,
                        "lower lr or max_strength and train again (the model is unchanged)")
                losses.append(float(loss.detach()))
            history.append(sum(losses) / len(losses))
    net = {k: v.detach() for k, v in net.items()}
    if not all(torch.isfinite(t).all() for t in net.values()):
        raise SteerscaleError("controller training diverged (non-finite weights)", "lower lr and train again")
    ctl = SteeringController(vector, inputs, net, max_strength, readout, scope, lm.name, artifacts.fingerprint(layout),
                             prefix=prefix)
    with torch.no_grad():
        strength = ctl.outputs({r: feats[r.site] for r in ctl.reads})[0]
    ctl.metadata = {
        "method": "controller", "target": target, "n_positive": len(positive), "n_negative": len(negative),
        "epochs": epochs, "lr": lr, "hidden": hidden, "batch_size": batch_size, "negative_tokens": negative_tokens,
        "seed": seed, "loss_history": history, "chat": chat,
        "train_strength": {"positive": float(strength[labels == 1].mean()),
                           "negative": float(strength[labels == 0].mean())},
    }
    if held:
        hp = [format_prompt(lm.tokenizer, p, chat) for p in held["positive"] + held["negative"]]
        batch = tokenize(lm.tokenizer, hp, lm.device)
        hf = read_prompts(lm.model, layout, batch, [ctl])[0]  # read as at run time
        with torch.no_grad():
            st = ctl.outputs(hf)[0]
        n = len(held["positive"])
        ctl.metadata["holdout"] = {"fraction": holdout, "positive_strength": float(st[:n].mean()),
                                   "negative_strength": float(st[n:].mean())}
    return ctl
