"""Per-token gating (TruthPrInt-style): fit a probe that scores each generated token, and gate steering with it.

``fit_token_gate`` reads hidden states at one site over the completion tokens of labelled ``(prompt, completion,
label)`` examples (label 1: the continuation the gate should catch, e.g. an untruthful answer) and fits an
L2-regularised logistic probe on them (``methods.probe.fit_logistic``). The positions read are the ones a gate
sees while generating: from the last prompt token (whose hidden state predicts the first completion token) to
the completion's last-but-one token. ``gated(interventions, gate)`` attaches the gate to edits: each row is then
steered from the first token at which the probe crosses the threshold (``engine.token_gates``, where the latch and
its exactness under the KV cache are described). A fitted gate is a ``FittedTokenGate``: it saves as safetensors +
JSON and is checked against the model it was fitted on, like every artifact (``steer.artifacts``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch

from ..engine.capture import Readout, capture, tokenize
from ..engine.generation import format_prompt
from ..engine.runtime import Intervention
from ..engine.token_gates import TokenGate
from ..errors import SteerscaleError
from ..models.layout import ModelLayout
from ..models.loading import LoadedModel
from ..models.sites import Site
from . import artifacts
from .conditional import split_labelled
from .methods.probe import fit_logistic

FORMAT = "steerscale.gate/1"


def gated(interventions: Sequence[Intervention], gate: TokenGate) -> list[Intervention]:
    """The same edits, each applied only from the token at which ``gate`` fires (per row)."""
    return [Intervention(iv.site, iv.edit, iv.scope, iv.rows, gate) for iv in interventions]


class FittedTokenGate(TokenGate, artifacts.SavedArtifact):
    """A ``TokenGate`` with the artifact interface: ``save``, ``load`` and ``check`` (what ``fit_token_gate``
    returns and ``load_gate`` reads)."""

    FORMAT: ClassVar[str] = FORMAT
    WHAT: ClassVar[str] = "token gate"
    REMAKE: ClassVar[str] = "refit the gate"

    @classmethod
    def of(cls, gate: TokenGate) -> "FittedTokenGate":
        """``gate`` with the artifact interface (itself when it has it)."""
        if isinstance(gate, cls):
            return gate
        return cls(gate.site, gate.weight, gate.bias, gate.threshold, gate.invert, dict(gate.metadata))

    def to_file(self) -> tuple[dict[str, torch.Tensor], dict]:
        header = {"site": self.site.key(), "bias": self.bias, "threshold": self.threshold, "invert": self.invert,
                  "metadata": self.metadata}
        return {"weight": self.weight}, header

    @classmethod
    def from_file(cls, tensors: dict[str, torch.Tensor], h: dict) -> "FittedTokenGate":
        return cls(Site.parse(h["site"]), tensors["weight"], float(h.get("bias", 0.0)), float(h.get("threshold", 0.5)),
                   bool(h.get("invert", False)), dict(h.get("metadata") or {}))

    def check(self, layout: ModelLayout) -> None:
        meta = self.metadata
        artifacts.check_model("token gate", meta.get("model_name", ""), meta.get("model_fingerprint", ""), layout)
        artifacts.check_site("gate", layout, self.site, self.dim, "fit the gate on this model")


# The function names of the first release, kept for scripts that call them.
def save_gate(gate: TokenGate, path: str | Path) -> Path:
    return FittedTokenGate.of(gate).save(path)


def load_gate(path: str | Path, layout: ModelLayout | None = None) -> FittedTokenGate:
    """Read a gate file; with ``layout``, refuse one fitted on a model of another shape."""
    return FittedTokenGate.load(path, layout)


def check_gate(gate: TokenGate, layout: ModelLayout) -> None:
    FittedTokenGate.of(gate).check(layout)


def completion_positions(tokenizer, examples, chat: bool | None) -> tuple[list[str], list[tuple[int, int]]]:
    """Full texts and, per text, the real-token span a gate reads: last prompt token .. last-but-one token."""
    texts, spans = [], []
    count = lambda text: int(tokenize(tokenizer, [text], "cpu").attention_mask.sum())  # noqa: E731 (as capture reads it)
    for i, (prompt, completion, _) in enumerate(examples):
        head = format_prompt(tokenizer, prompt, chat)
        n_prompt, n_total = count(head), count(head + completion)
        if n_total <= n_prompt:
            raise SteerscaleError(f"example {i}: the completion adds no tokens ({completion[:60]!r})",
                                  "give each example a non-empty completion")
        texts.append(head + completion)
        spans.append((n_prompt - 1, n_total - 1))
    return texts, spans


def fit_token_gate(lm: LoadedModel, examples: Sequence[tuple[str, str, int]], site: Site | str,
                   threshold: float | str = "auto", C: float = 0.1, holdout: float = 0.2, seed: int = 0,
                   chat: bool | None = None, batch_size: int = 16, progress: bool = True) -> TokenGate:
    """A token gate (a ``FittedTokenGate``) at ``site`` from ``(prompt, completion, label)`` examples; label 1 marks completions whose
    tokens should switch steering on. ``holdout`` of each class is kept out of the fit; on it the per-token
    accuracy and the fraction of completions the gate fires on, by label, are recorded in ``metadata``.

    ``threshold="auto"``: a gate latches on the first token above the threshold, so what matters is each
    completion's highest token score; the threshold is the one that best separates label-1 from label-0
    completions by that score on the held-out part (largest fire rate difference, Youden's J). A number: used
    as given."""
    site = Site.parse(site) if isinstance(site, str) else site
    examples = [(p, c, int(y)) for p, c, y in examples]
    if {y for *_, y in examples} - {0, 1}:
        raise SteerscaleError("gate labels must be 0 or 1")
    pos = [i for i, e in enumerate(examples) if e[2] == 1]
    neg = [i for i, e in enumerate(examples) if e[2] == 0]
    tr_p, se_p = split_labelled(len(pos), holdout, seed, "label-1 examples")
    tr_n, se_n = split_labelled(len(neg), holdout, seed + 1, "label-0 examples")
    lm.layout.locate(site)
    texts, spans = completion_positions(lm.tokenizer, examples, chat)
    acts = capture(lm.model, lm.tokenizer, lm.layout, texts, [site], Readout.ALL, batch_size=batch_size,
                   progress=progress, desc="reading completions")[site]
    rows = [acts[i][s:e].float() for i, (s, e) in enumerate(spans)]

    def stack(idx):
        ids = [pos[j] for j in idx[0]] + [neg[j] for j in idx[1]]
        x = torch.cat([rows[i] for i in ids])
        y = torch.cat([torch.full((rows[i].shape[0],), float(examples[i][2])) for i in ids])
        return x, y, ids

    x, y, _ = stack((tr_p, tr_n))
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    w, b = fit_logistic(((x - mean) / std)[None], y, C=C)
    weight = (w[0] / std.double()).float()
    bias = float(b[0] - (w[0] * (mean / std).double()).sum())
    if not (torch.isfinite(weight).all() and math.isfinite(bias)):
        raise SteerscaleError("the gate probe did not converge (non-finite weights)", "lower C or give more data")
    xs, ys, held = stack((se_p, se_n))
    probe = TokenGate(site, weight, bias, 0.5)
    if threshold == "auto":
        peak = np.array([float(probe.probability(rows[i][None]).max()) for i in held])
        labels = np.array([examples[i][2] for i in held])
        cands = np.unique(peak)
        cands = (cands[:-1] + cands[1:]) / 2 if len(cands) > 1 else cands
        j = [(peak[labels == 1] > t).mean() - (peak[labels == 0] > t).mean() for t in cands]
        threshold = float(min(max(cands[int(np.argmax(j))], 1e-6), 1 - 1e-6))
    gate = FittedTokenGate(site, weight, bias, float(threshold))
    acc = float(((probe.probability(xs[None])[0] > 0.5).float() == ys).float().mean())
    fired = {lab: float(np.mean([bool(gate.fires(rows[i][None]).any()) for i in held if examples[i][2] == lab]))
             for lab in (0, 1)}
    gate.metadata = {"model_name": lm.name, "model_fingerprint": artifacts.fingerprint(lm.layout),
                     "n_examples": len(examples), "n_tokens": int(x.shape[0]), "C": C, "seed": seed,
                     "holdout_token_accuracy": acc, "holdout_fire_rate": {"label_0": fired[0], "label_1": fired[1]},
                     "chat": chat}
    return gate
