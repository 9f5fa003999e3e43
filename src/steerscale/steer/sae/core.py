"""A sparse autoencoder (SAE) over one site's activations, in SAELens' terms and on-disk format.

``SAE`` holds ``W_enc (d_in, d_sae)``, ``b_enc (d_sae)``, ``W_dec (d_sae, d_in)``, ``b_dec (d_in)`` and, for
JumpReLU, ``threshold (d_sae)``. Encoding follows SAELens (read from its ``saes/*_sae.py``, version 6):

* input: ``x`` normalised as ``normalize_activations`` says (``none``; ``constant_norm_rescale``: scaled to norm
  ``sqrt(d_in)``; ``layer_norm``: centred and divided by its std), minus ``b_dec`` when ``apply_b_dec_to_input``;
* pre-activations ``z = x' @ W_enc + b_enc`` (TopK with ``rescale_acts_by_decoder_norm``: times each row's
  decoder norm);
* ``standard``: ``relu(z)``; ``jumprelu``: ``relu(z) * (z > threshold)``; ``topk``: the ``k`` largest ``z``
  kept (then ReLU), the rest zero;
* decoding ``f @ W_dec + b_dec`` (TopK with rescaling: ``f`` divided by the decoder norms first), then the
  normalisation undone.

The architectures are a registry (``ARCHITECTURES``): each says how pre-activations become feature activations.
Files: a folder with ``cfg.json`` and ``sae_weights.safetensors`` (``load_sae`` / ``SAE.save``); SAELens hook
names (``blocks.12.hook_resid_post``, or an HF module path such as ``model.layers.12``) map to steerscale sites.
Nothing is read with pickle.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ...errors import SteerscaleError
from ...models.layout import ModelLayout
from ...models.sites import Site, SiteKind
from ...registry import Registry
from ...version import __version__

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# The cfg.json layout written here is SAELens 6's (``metadata`` nested); SAELens reads older files through its
# pre-6 conversion when this is missing or below 6, so the number states which layout the file has.
SAELENS_FORMAT_VERSION = "6.0.0"
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")


# -- architectures -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    """How pre-activations ``z`` become feature activations; ``tensors``: the extra weights the file must hold."""

    activate: Callable[["SAE", torch.Tensor], torch.Tensor]
    tensors: tuple[str, ...] = ()
    #: whether one feature's activation depends only on its own pre-activation (not TopK's competition), so a
    #: clamp can compute just the clamped columns
    separable: bool = True


def _relu(sae: "SAE", z: torch.Tensor) -> torch.Tensor:
    return torch.relu(z)


def _jumprelu(sae: "SAE", z: torch.Tensor) -> torch.Tensor:
    threshold = sae.param("threshold", z)
    return torch.relu(z) * (z > threshold).to(z.dtype)


def _topk(sae: "SAE", z: torch.Tensor) -> torch.Tensor:
    k = min(sae.k, z.shape[-1])
    values, indices = torch.topk(z, k, dim=-1, sorted=False)
    return torch.zeros_like(z).scatter(-1, indices, torch.relu(values))


ARCHITECTURES: Registry[Architecture] = Registry("SAE architecture")
ARCHITECTURES.add("standard", Architecture(_relu), "ReLU features (SAELens 'standard'; trained with an L1 penalty)")
ARCHITECTURES.add("jumprelu", Architecture(_jumprelu, ("threshold",)),
                  "ReLU with a learned per-feature threshold (Gemma Scope)")
ARCHITECTURES.add("topk", Architecture(_topk, separable=False), "the k largest pre-activations per token")


# -- hook names ------------------------------------------------------------------------------------------------
_TL_KINDS = {"hook_resid_pre": SiteKind.RESID_PRE, "hook_resid_post": SiteKind.RESID_POST,
             "hook_attn_out": SiteKind.ATTN_OUT, "hook_mlp_out": SiteKind.MLP_OUT}
_HF_KINDS = {"": SiteKind.RESID_POST, ".mlp": SiteKind.MLP_OUT, ".self_attn": SiteKind.ATTN_OUT}


def site_of_hook(hook_name: str) -> Site:
    """The steerscale site of a SAELens hook name: TransformerLens names (``blocks.L.hook_resid_pre``,
    ``hook_resid_post``, ``hook_attn_out``, ``hook_mlp_out``) or HF module paths (``model.layers.L`` is block
    L's output, ``.mlp`` and ``.self_attn`` its MLP and attention outputs)."""
    m = re.fullmatch(r"blocks\.(\d+)\.(hook_\w+)", hook_name or "")
    if m and m.group(2) in _TL_KINDS:
        return Site(int(m.group(1)), _TL_KINDS[m.group(2)])
    m = re.fullmatch(r"(?:model\.)?(?:model\.)?layers\.(\d+)((?:\.mlp|\.self_attn)?)", hook_name or "")
    if m:
        return Site(int(m.group(1)), _HF_KINDS[m.group(2)])
    raise SteerscaleError(
        f"SAE hook name {hook_name!r} is not a site steerscale can place",
        "supported: blocks.L.hook_resid_pre / hook_resid_post / hook_attn_out / hook_mlp_out and model.layers.L"
        "[.mlp|.self_attn]; or give the site yourself (--site resid_post.12, load_sae(path, site=...))")


def hook_of_site(site: Site) -> str:
    """The TransformerLens hook name SAELens uses for ``site`` (what ``cfg.json`` records)."""
    for name, kind in _TL_KINDS.items():
        if kind is site.kind:
            return f"blocks.{site.layer}.{name}"
    raise SteerscaleError(f"SAEs are placed at residual, attention-output or MLP-output sites, not {site.key()}",
                          "use resid_post.L, resid_pre.L, attn_out.L or mlp_out.L")


# -- the SAE -----------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class SAE:
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    site: Site
    architecture: str = "standard"
    threshold: torch.Tensor | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    rescale_acts_by_decoder_norm: bool = False
    model_name: str = ""
    metadata: dict = field(default_factory=dict)  # the rest of cfg.json's metadata (dataset, context size, ...)

    def __post_init__(self):
        self.architecture = ARCHITECTURES.canonical(self.architecture)
        if self.normalize_activations not in NORMALIZATIONS:
            raise SteerscaleError(
                f"SAE normalize_activations {self.normalize_activations!r} is not supported",
                f"steerscale runs {', '.join(NORMALIZATIONS)}; 'expected_average_only_in' needs its dataset's scaling "
                "factor folded into the weights first (SAELens: fold_activation_norm_scaling_factor, then save)")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.detach().float())
        d_in, d_sae = self.d_in, self.d_sae
        want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        if "threshold" in ARCHITECTURES[self.architecture].tensors:
            if self.threshold is None:
                raise SteerscaleError(f"a {self.architecture} SAE needs a 'threshold' tensor of shape ({d_sae},)")
            want["threshold"] = (d_sae,)
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise SteerscaleError(
                    f"SAE tensor {name} has shape {got}, expected {shape} (d_in={d_in}, d_sae={d_sae} from W_enc)",
                    "the weights file does not match its cfg.json or is damaged; re-save the SAE")
            if not torch.isfinite(getattr(self, name)).all():
                raise SteerscaleError(f"SAE tensor {name} contains NaN or inf")
        if self.architecture == "topk" and (not isinstance(self.k, int) or not 0 < self.k <= d_sae):
            raise SteerscaleError(f"a topk SAE needs k between 1 and d_sae={d_sae}, got {self.k!r}")
        if not isinstance(self.site, Site):
            self.site = Site.parse(self.site)

    # -- shapes ----------------------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def hook_name(self) -> str:
        return hook_of_site(self.site)

    def __repr__(self) -> str:
        return (f"SAE({self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}, site={self.site.key()}, "
                f"model={self.model_name!r})")

    def check(self, layout: ModelLayout) -> None:
        """Refuse an SAE whose site this model lacks or whose width differs from the site's."""
        layout.locate(self.site)
        if layout.site_dim(self.site) != self.d_in:
            raise SteerscaleError(
                f"SAE reads {self.d_in}-wide activations, but this {layout.architecture} model's {self.site.key()} is "
                f"{layout.site_dim(self.site)} wide", "the SAE was trained on another model; load or train one for "
                "this model")

    def check_feature(self, feature: int) -> int:
        if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < self.d_sae:
            raise SteerscaleError(f"feature {feature!r} is not a feature of this SAE", f"use 0 to {self.d_sae - 1}")
        return feature

    # -- maths -----------------------------------------------------------------------------------------------
    def param(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Weight ``name`` on ``like``'s device and dtype, cast once (hooks call this every decoding step)."""
        key = (name, like.device, like.dtype)
        cache = self.__dict__.setdefault("_cast", {})
        if key not in cache:
            cache[key] = getattr(self, name).to(device=like.device, dtype=like.dtype)
        return cache[key]

    def decoder_norms(self, like: torch.Tensor | None = None) -> torch.Tensor:
        w = self.W_dec if like is None else self.param("W_dec", like)
        return w.norm(dim=-1).clamp_min(1e-8)

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x', scale, offset)`` with ``x = x' * scale + offset`` (the normalisation SAELens applies and undoes)."""
        if self.normalize_activations == "constant_norm_rescale":
            scale = x.norm(dim=-1, keepdim=True).clamp_min(1e-8) / math.sqrt(self.d_in)
            return x / scale, scale, torch.zeros_like(scale)
        if self.normalize_activations == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            std = (x - mu).std(-1, keepdim=True)
            return (x - mu) / (std + 1e-5), std, mu
        one = torch.ones((), dtype=x.dtype, device=x.device)
        return x, one, torch.zeros_like(one)

    def pre_acts(self, x: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-activations of normalised ``x`` (all features, or only ``features``: an index tensor)."""
        w, b = self.param("W_enc", x), self.param("b_enc", x)
        if features is not None:
            w, b = w[:, features], b[features]
        sae_in = x - self.param("b_dec", x) if self.apply_b_dec_to_input else x
        z = sae_in @ w + b
        if self.rescale_acts_by_decoder_norm:
            norms = self.decoder_norms(x)
            z = z * (norms if features is None else norms[features])
        return z

    def activate(self, z: torch.Tensor) -> torch.Tensor:
        return ARCHITECTURES[self.architecture].activate(self, z)

    def activate_columns(self, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Activations of features ``idx`` from their own pre-activations ``z`` (separable architectures only)."""
        if not ARCHITECTURES[self.architecture].separable:
            raise SteerscaleError(f"a {self.architecture} SAE's features depend on each other", "use activate(z)")
        if self.architecture == "jumprelu":
            return torch.relu(z) * (z > self.param("threshold", z)[idx]).to(z.dtype)
        return torch.relu(z)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``(..., d_sae)`` of activations ``x`` ``(..., d_in)``."""
        return self.activate(self.pre_acts(self.normalize(x)[0]))

    def decode(self, f: torch.Tensor, scale=None, offset=None) -> torch.Tensor:
        """Activations reconstructed from features (``scale``/``offset``: the input's normalisation to undo; for
        ``constant_norm_rescale`` and ``layer_norm`` they come from ``normalize`` of that input)."""
        if self.rescale_acts_by_decoder_norm:
            f = f / self.decoder_norms(f)
        out = f @ self.param("W_dec", f) + self.param("b_dec", f)
        if self.normalize_activations != "none" and scale is None:
            raise SteerscaleError(f"decoding a {self.normalize_activations} SAE needs the input's scale",
                                  "use sae.reconstruct(x), or decode(f, *sae.normalize(x)[1:])")
        return out if scale is None else out * scale + offset

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        xn, scale, offset = self.normalize(x)
        return self.decode(self.activate(self.pre_acts(xn)), scale, offset)

    def output_direction(self, feature: int) -> torch.Tensor:
        """What one unit of ``feature``'s activation adds to the (normalised) reconstruction: its decoder row
        (divided by its norm for TopK SAEs that rescale by decoder norm)."""
        row = self.W_dec[self.check_feature(feature)]
        return row / row.norm().clamp_min(1e-8) if self.rescale_acts_by_decoder_norm else row

    # -- files -----------------------------------------------------------------------------------------------
    def cfg(self) -> dict:
        """``cfg.json`` in SAELens 6's layout."""
        cfg = {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae, "dtype": "float32",
               "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input,
               "normalize_activations": self.normalize_activations, "reshape_activations": "none",
               "metadata": {**self.metadata, "model_name": self.model_name, "hook_name": self.hook_name,
                            "hook_head_index": None, "sae_lens_version": SAELENS_FORMAT_VERSION,
                            "sae_lens_training_version": SAELENS_FORMAT_VERSION, "steerscale_version": __version__}}
        if self.architecture == "topk":
            cfg.update(k=self.k, rescale_acts_by_decoder_norm=self.rescale_acts_by_decoder_norm)
        return cfg

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None and "threshold" in ARCHITECTURES[self.architecture].tensors:
            out["threshold"] = self.threshold
        return {k: v.detach().float().contiguous().cpu() for k, v in out.items()}

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/cfg.json`` and ``folder/sae_weights.safetensors`` (SAELens' ``save_model`` layout)."""
        folder = Path(folder)
        if folder.suffix in (".safetensors", ".json", ".pt"):
            raise SteerscaleError(f"an SAE is saved as a folder (cfg.json + {WEIGHTS_FILE}), not {folder}",
                                  "give a directory, e.g. -o out/sae")
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors(), str(folder / WEIGHTS_FILE))
        (folder / CFG_FILE).write_text(json.dumps(self.cfg(), indent=2), encoding="utf-8")
        return folder


# -- loading ---------------------------------------------------------------------------------------------------
def _read_cfg(folder: Path) -> dict:
    path = folder / CFG_FILE
    if not path.is_file():
        raise SteerscaleError(f"{folder} has no {CFG_FILE}",
                              f"an SAELens SAE is a folder with {CFG_FILE} and {WEIGHTS_FILE}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SteerscaleError(f"{path} is not valid JSON ({exc})", "re-save the SAE") from None
    if not isinstance(cfg, dict):
        raise SteerscaleError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        pickled = sorted(p.name for p in folder.glob("*.pt")) + sorted(p.name for p in folder.glob("*.pth"))
        raise SteerscaleError(f"{folder} has no {WEIGHTS_FILE}" + (f" (found {', '.join(pickled)}: pickle files are "
                                                                  "never loaded)" if pickled else ""),
                              "convert the weights to safetensors (SAELens' save_model writes them)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a non-safetensors file
        raise SteerscaleError(f"{path} is not a safetensors file ({type(exc).__name__}: {str(exc)[:120]})",
                              "SAE weights are read only from safetensors, never pickle; re-save the SAE with "
                              "SAELens' save_model or steerscale sae train") from None


def _field(cfg: dict, meta: dict, *names, default=None):
    for source in (cfg, meta):
        for name in names:
            if source.get(name) is not None:
                return source[name]
    return default


def load_sae(folder: str | Path, layout: ModelLayout | None = None, site: Site | str | None = None) -> SAE:
    """An SAE from an SAELens folder (``cfg.json`` + ``sae_weights.safetensors``; SAELens 6 files and older ones,
    whose hook name and TopK ``k`` sit at the top level). ``site`` overrides the site read from the hook name;
    ``layout``: checked against that model."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent if folder.name in (CFG_FILE, WEIGHTS_FILE) else folder
    if not folder.is_dir():
        raise SteerscaleError(f"SAE folder not found: {folder}",
                              f"give the folder that holds {CFG_FILE} and {WEIGHTS_FILE}")
    cfg = _read_cfg(folder)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    missing = [k for k in ("d_in", "d_sae") if not isinstance(cfg.get(k), int)]
    if missing:
        raise SteerscaleError(f"{folder / CFG_FILE} lacks integer {', '.join(missing)}",
                              "an SAELens cfg.json names d_in and d_sae")
    architecture = cfg.get("architecture") or "standard"
    activation = _field(cfg, meta, "activation_fn", "activation_fn_str", default="relu")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if activation == "topk":  # pre-6 files say topk through the activation function
        architecture = "topk"
    if architecture not in ARCHITECTURES:
        raise SteerscaleError(f"{folder}: SAE architecture {architecture!r} is not supported",
                              f"steerscale runs {', '.join(ARCHITECTURES)}")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise SteerscaleError(f"{folder}: SAEs on reshaped activations ({cfg['reshape_activations']}) are not "
                              "supported", "use an SAE on a residual, attention-output or MLP-output site")
    norm = cfg.get("normalize_activations", "none")
    if not isinstance(norm, str):  # pre-6 files wrote a boolean (True: the dataset-average scaling)
        norm = {None: "none", False: "none", True: "expected_average_only_in"}.get(norm, norm)
    hook_name = _field(cfg, meta, "hook_name", "hook_point")
    if site is None:
        site = site_of_hook(hook_name)
    tensors = _read_weights(folder)
    required = ["W_enc", "b_enc", "W_dec", "b_dec"] + list(ARCHITECTURES[architecture].tensors)
    absent = [k for k in required if k not in tensors]
    if absent:
        raise SteerscaleError(f"{folder / WEIGHTS_FILE} lacks {', '.join(absent)} (has {', '.join(sorted(tensors))})",
                              f"a {architecture} SAE file holds {', '.join(required)}")
    scaling = tensors.get("scaling_factor", tensors.get("finetuning_scaling_factor"))
    if scaling is not None and not torch.allclose(scaling.float(), torch.ones_like(scaling.float())):
        raise SteerscaleError(f"{folder}: a finetuning scaling factor is not supported",
                              "fold it into W_dec before saving")
    if tuple(tensors["W_enc"].shape) != (cfg["d_in"], cfg["d_sae"]):
        raise SteerscaleError(f"{folder}: W_enc has shape {tuple(tensors['W_enc'].shape)} but cfg.json says d_in="
                              f"{cfg['d_in']}, d_sae={cfg['d_sae']}", "the weights and cfg.json belong to different "
                              "SAEs; re-save it")
    known = {"model_name", "hook_name", "hook_point", "hook_head_index", "sae_lens_version", "steerscale_version",
             "sae_lens_training_version"}
    sae = SAE(tensors["W_enc"], tensors["b_enc"], tensors["W_dec"], tensors["b_dec"], site, architecture,
              tensors.get("threshold"), _field(cfg, meta, "k", default=kwargs.get("k")),
              bool(cfg.get("apply_b_dec_to_input", True)), norm, bool(cfg.get("rescale_acts_by_decoder_norm", False)),
              _field(cfg, meta, "model_name", default="") or "",
              {k: v for k, v in meta.items() if k not in known})
    if layout is not None:
        sae.check(layout)
    return sae
