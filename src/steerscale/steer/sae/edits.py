"""Steering with SAE features: a feature's decoder row as a ``SteeringVector`` (runs wherever vectors run), and
clamping a feature's activation as an ``Edit`` the hook runtime runs like any other.

Clamping (Neuronpedia's "clamp", Templeton et al. 2024): encode the activation, set the feature to ``value``,
decode, and keep the SAE's reconstruction error, so nothing but that feature changes::

    h' = decode(f with f_i := value) + (h - decode(f)) = h + (value - f_i(h)) * d_i

where ``d_i`` is what one unit of the feature adds (its decoder row, times the input's normalisation scale for
SAEs that normalise). ``ClampFeature`` subclasses ``engine.ops.Edit``; ``engine.ops.apply_edit`` only calls
``edit(h)``, so the runtime (``intervene``, ``generate``, ``LocalBackend``, the server's scheduler) runs it with
no change to the engine. For ReLU and JumpReLU SAEs only the clamped features' encoder columns are computed
(a feature's activation depends on its own pre-activation alone); TopK needs every pre-activation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...engine.ops import Edit, check_scale
from ...engine.plan import FeatureClamp
from ...engine.runtime import Intervention
from ...engine.scope import ALL_TOKENS, TokenScope
from ...errors import SteerscaleError
from ...models.layout import ModelLayout
from ..artifacts import fingerprint
from ..vector import SteeringVector
from .core import ARCHITECTURES, SAE


def _features(sae: SAE, features) -> list[int]:
    items = [features] if isinstance(features, int) else list(features)
    if not items:
        raise SteerscaleError("no feature to clamp", "name at least one feature index")
    return [sae.check_feature(f) for f in items]


@dataclass(eq=False)
class ClampFeature(Edit):
    """Set SAE ``features`` to ``values`` (one per feature; each a float, or per row ``(batch,)``), keeping the
    reconstruction error. ``value=0`` ablates the feature; clamping a feature to its own activation is the
    identity. Tokens with massive activations (norm over ``outlier_factor`` x the median of the pass, such as the
    attention-sink first token) are left alone: the SAE never saw such tokens, so its encoding there means
    nothing (0: clamp every token)."""

    sae: SAE
    features: int | list[int]
    values: float | list = 0.0
    outlier_factor: float = 10.0
    preserve_norm: bool = False
    #: leave alone tokens whose norm passes this fixed cap instead (the rule of a server's batched rows, where one
    #: row must not depend on the others: ``ClampableSAE``)
    norm_cap: float | None = None
    _idx: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self.features = _features(self.sae, self.features)
        values = self.values if isinstance(self.values, (list, tuple)) else [self.values] * len(self.features)
        if len(values) != len(self.features):
            raise SteerscaleError(f"{len(values)} clamp values for {len(self.features)} features",
                                  "give one value per feature, or one value for all")
        self.values = [check_scale(v, f"clamp value of feature {f}") for f, v in zip(self.features, values)]
        self._idx = torch.tensor(self.features)

    @property
    def dim(self) -> int:
        return self.sae.d_in

    def _targets(self, h: torch.Tensor) -> torch.Tensor:
        """``(batch or 1, 1, n_features)`` target activations."""
        cols = []
        for v in self.values:
            v = v.to(device=h.device, dtype=h.dtype)
            if v.dim() == 1:
                if v.shape[0] != h.shape[0]:
                    raise SteerscaleError(f"per-row clamp value has {v.shape[0]} rows but the batch has {h.shape[0]}",
                                          "give one value per sequence in the batch")
                v = v[:, None]
            cols.append(v.expand(h.shape[0], 1) if v.dim() == 2 else v.reshape(1, 1).expand(h.shape[0], 1))
        return torch.cat(cols, -1)[:, None, :]

    def __call__(self, h):
        sae = self.sae
        idx = self._idx.to(h.device)
        xn, scale, _ = sae.normalize(h)
        if ARCHITECTURES[sae.architecture].separable:
            current = sae.activate_columns(sae.pre_acts(xn, idx), idx)
        else:
            current = sae.activate(sae.pre_acts(xn))[..., idx]
        delta = self._targets(h) - current  # (batch, seq, n)
        rows = sae.param("W_dec", h)[idx]
        if sae.rescale_acts_by_decoder_norm:
            rows = rows / sae.decoder_norms(h)[idx, None]
        out = h + (delta @ rows) * scale
        if self.norm_cap is not None:
            return torch.where(h.norm(dim=-1, keepdim=True) > self.norm_cap, h, out)
        return out if not self.outlier_factor else keep_outliers(h, out, self.outlier_factor)


def keep_outliers(h: torch.Tensor, edited: torch.Tensor, factor: float) -> torch.Tensor:
    """``edited``, except at tokens whose norm in ``h`` is over ``factor`` times the median: those keep ``h``."""
    norms = h.norm(dim=-1, keepdim=True)
    return torch.where(norms > factor * norms.flatten().median(), h, edited)


@dataclass(eq=False)
class Splice(Edit):
    """Replace the activation by the SAE's reconstruction (how much of the model's loss the SAE keeps). Tokens
    with massive activations (norm over ``outlier_factor`` x the median of the pass; the attention-sink first
    token among them) keep theirs: SAEs are trained without them (``train.drop_outliers``), as SAELens leaves
    out special tokens."""

    sae: SAE
    outlier_factor: float = 10.0
    preserve_norm: bool = False

    @property
    def dim(self) -> int:
        return self.sae.d_in

    def __call__(self, h):
        out = self.sae.reconstruct(h)
        return out if not self.outlier_factor else keep_outliers(h, out, self.outlier_factor)


def clamp_interventions(sae: SAE, features, values=0.0, scope: TokenScope | str = ALL_TOKENS,
                        layout: ModelLayout | None = None) -> list[Intervention]:
    """One intervention clamping ``features`` at the SAE's site (checked against ``layout`` when given)."""
    if layout is not None:
        sae.check(layout)
    return [Intervention(sae.site, ClampFeature(sae, features, values), TokenScope.parse(scope))]


@dataclass(frozen=True, eq=False)
class ClampableSAE:
    """An SAE as a server registers it (``steerscale serve --sae NAME=DIR``): its features steer as vectors
    (``vector``) and clamp per request inside the steering plan (``clamp``: an ``engine.plan.FeatureClamp``).
    ``norm_cap`` replaces ``ClampFeature``'s median-of-the-pass outlier rule with a fixed one, so a row's clamp
    does not depend on the other rows of its batch: ``outlier_factor`` x the median token norm at the site over
    reference texts (``measure``)."""

    sae: SAE
    norm_cap: float
    name: str = ""

    @classmethod
    def measure(cls, sae: SAE, model, tokenizer, layout: ModelLayout, texts, outlier_factor: float = 10.0,
                name: str = "") -> "ClampableSAE":
        from ...engine.capture import capture

        sae.check(layout)
        acts = capture(model, tokenizer, layout, list(texts), [sae.site], readout="all")[sae.site]
        norms = torch.cat([a.float().norm(dim=-1) for a in acts])
        return cls(sae, float(outlier_factor * norms.median()), name)

    def check(self, layout: ModelLayout) -> None:
        self.sae.check(layout)

    def vector(self, feature: int) -> SteeringVector:
        """One unit of ``feature`` (Neuronpedia's additive strength 1)."""
        return feature_vector(self.sae, feature, source=self.name)

    def clamp(self, feature: int) -> FeatureClamp:
        """``feature`` as a steering plan clamps it: ReLU and JumpReLU SAEs without input normalisation (the
        activation is then one dot product of the stream, which a plan's per-token tables express)."""
        sae = self.sae
        feature = sae.check_feature(feature)
        if not ARCHITECTURES[sae.architecture].separable or sae.normalize_activations != "none":
            raise SteerscaleError(
                f"SAE {self.name or sae!r} ({sae.architecture}, normalize_activations={sae.normalize_activations}) "
                "cannot clamp inside a steering plan", "clamping runs per row for ReLU and JumpReLU SAEs without "
                "input normalisation; add the feature as a vector instead (op 'add'), or clamp locally with "
                "steerscale sae / ClampFeature")
        enc = sae.W_enc[:, feature]
        bias = float(sae.b_enc[feature]) - (float(sae.b_dec @ enc) if sae.apply_b_dec_to_input else 0.0)
        dec = sae.W_dec[feature]
        if sae.rescale_acts_by_decoder_norm:
            n = float(dec.norm().clamp_min(1e-8))
            enc, bias, dec = enc * n, bias * n, dec / n
        threshold = max(float(sae.threshold[feature]), 0.0) if sae.architecture == "jumprelu" else 0.0
        return FeatureClamp(sae.site, enc.clone(), bias, threshold, dec.clone(), self.norm_cap,
                            f"{self.name}#{feature}")

    def card(self) -> dict:
        return {"object": "sae", "site": self.sae.site.key(), "architecture": self.sae.architecture,
                "d_sae": self.sae.d_sae, "model_name": self.sae.model_name, "norm_cap": round(self.norm_cap, 4)}


def feature_vector(sae: SAE, features, layout: ModelLayout | None = None, normalize: bool = False,
                   source: str = "") -> SteeringVector:
    """A steering vector along SAE ``features``' decoder rows (summed when several), at the SAE's site: scale 1
    adds one unit of activation of each (Neuronpedia's additive steering ``strength``). ``normalize``: a unit
    vector instead. With ``layout`` the vector carries that model's fingerprint."""
    feats = _features(sae, features)
    direction = sum(sae.output_direction(f) for f in feats)
    if normalize:
        direction = direction / direction.norm().clamp_min(1e-8)
    if layout is not None:
        sae.check(layout)
    meta = {"sae": source, "features": feats, "hook_name": sae.hook_name, "sae_architecture": sae.architecture,
            "d_sae": sae.d_sae, "normalized": normalize}
    if sae.normalize_activations != "none":
        meta["note"] = (f"the SAE normalises its input ({sae.normalize_activations}); the decoder row is in normalised "
                        "units, so scale 1 is not one unit of activation")
    return SteeringVector({sae.site: direction.clone()}, sae.model_name, fingerprint(layout) if layout else "",
                          "sae_feature", meta)
