"""Model layout: where each site lives in a loaded transformers model, for every common architecture.

``find_layout(model)`` walks a short list of known attribute paths (llama-likes, gpt2, gpt-neox, phi3,
gemma, MoE) and returns a ``ModelLayout``. ``ModelLayout.locate(site)`` is the single place that maps a
``Site`` to a module, a hook type and a slice; the engine never looks at module names itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import torch
from torch import nn

from ..errors import SteerscaleError
from .sites import Site, SiteKind

# Candidate attribute paths, tried in order. Adding an architecture usually means adding one path here.
_BLOCK_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "layers")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_OUT_PROJ_NAMES = ("o_proj", "c_proj", "dense", "out_proj")
_MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward")
_ROUTER_NAMES = ("gate", "router")


class HookPoint(str, Enum):
    INPUT = "input"  # forward-pre hook: edit the module's first input
    OUTPUT = "output"  # forward hook: edit the module's output (first element when it is a tuple)


@dataclass(frozen=True)
class Location:
    module: nn.Module
    point: HookPoint
    index: slice | None = None  # slice of the last dimension (one head inside the concatenated heads)
    flat_tokens: bool = False  # the tensor is (batch*seq, dim) rather than (batch, seq, dim): MoE routers
    # Rebuilds a module's tuple output from its edited first element, when later elements derive from it
    # (top-k routers return (logits, scores, indices): editing the logits must re-route).
    rebuild: Callable[[nn.Module, torch.Tensor, tuple], tuple] | None = None


def reroute(router: nn.Module, logits: torch.Tensor, output: tuple) -> tuple:
    """Recompute (logits, scores, indices) of a transformers>=5 top-k router from edited logits."""
    if len(output) != 3:
        return (logits, *output[1:])
    probs = torch.softmax(logits.float(), dim=-1)
    top_value, top_index = torch.topk(probs, router.top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    return logits, top_value.to(output[1].dtype), top_index


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _first_child(module: nn.Module, names: tuple[str, ...]):
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


@dataclass
class ModelLayout:
    architecture: str
    base: nn.Module  # the decoder stack: receives input_ids, attention_mask and the KV cache
    blocks: list[nn.Module]
    attentions: list[nn.Module]
    out_projs: list[nn.Module]  # input = concatenated per-head outputs (n_heads * head_dim)
    mlps: list[nn.Module]
    norms: list[dict[str, nn.Module]]
    routers: list[nn.Module | None]
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int | None = None
    final_norm: nn.Module | None = None
    extra: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def is_moe(self) -> bool:
        return any(r is not None for r in self.routers)

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise SteerscaleError(
                f"layer {layer} is out of range: this {self.architecture} model has {self.n_layers} blocks",
                f"use a layer between 0 and {self.n_layers - 1}",
            )

    def site_dim(self, site: Site) -> int:
        """The size of the vector an edit at ``site`` reads and writes."""
        if site.kind is SiteKind.HEAD_OUT:
            return self.head_dim
        if site.kind is SiteKind.ROUTER:
            return self.n_experts or 0
        return self.hidden_size

    def locate(self, site: Site) -> Location:
        self.check_layer(site.layer)
        i = site.layer
        kind = site.kind
        if kind is SiteKind.RESID_PRE:
            return Location(self.blocks[i], HookPoint.INPUT)
        if kind is SiteKind.RESID_POST:
            return Location(self.blocks[i], HookPoint.OUTPUT)
        if kind is SiteKind.ATTN_OUT:
            return Location(self.attentions[i], HookPoint.OUTPUT)
        if kind is SiteKind.MLP_OUT:
            return Location(self.mlps[i], HookPoint.OUTPUT)
        if kind is SiteKind.HEAD_OUT:
            if not 0 <= site.head < self.n_heads:
                raise SteerscaleError(
                    f"head {site.head} is out of range: this model has {self.n_heads} attention heads per layer",
                    f"use a head between 0 and {self.n_heads - 1}",
                )
            d = self.head_dim
            return Location(self.out_projs[i], HookPoint.INPUT, slice(site.head * d, (site.head + 1) * d))
        if kind is SiteKind.ROUTER:
            if self.routers[i] is None:
                raise SteerscaleError(
                    f"layer {i} of this {self.architecture} model has no MoE router", "router sites exist only in MoE layers"
                )
            return Location(self.routers[i], HookPoint.OUTPUT, flat_tokens=True, rebuild=reroute)
        raise SteerscaleError(f"unsupported site kind {kind!r}")

    def describe(self) -> dict:
        return {
            "architecture": self.architecture,
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "n_experts": self.n_experts,
        }


def _missing(arch: str, what: str, tried) -> SteerscaleError:
    return SteerscaleError(
        f"could not find {what} in this {arch!r} model (tried: {', '.join(tried)})",
        "this architecture is not supported yet: add its attribute path to steerscale/models/layout.py",
    )


def text_config(config):
    """The language-model part of a config (a multimodal model's text sub-config; otherwise ``config`` itself)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _cfg(cfg, *names, default=None):
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def find_layout(model: nn.Module) -> ModelLayout:
    """Locate blocks, attention, per-head output projections, MLPs, norms and routers of ``model``."""
    cfg = text_config(model.config)
    arch = getattr(cfg, "model_type", type(model).__name__)
    blocks = None
    for path in _BLOCK_PATHS:
        candidate = _get_path(model, path)
        if isinstance(candidate, nn.ModuleList) and len(candidate) > 0:
            blocks, block_path = candidate, path
            break
    if blocks is None:
        raise _missing(arch, "the decoder blocks", _BLOCK_PATHS)
    base_path = block_path.rsplit(".", 1)[0] if "." in block_path else ""
    base = _get_path(model, base_path) if base_path else model

    attentions, out_projs, mlps, norms, routers = [], [], [], [], []
    for i, block in enumerate(blocks):
        attn = _first_child(block, _ATTN_NAMES)
        if attn is None:
            raise _missing(arch, f"the attention module of block {i}", _ATTN_NAMES)
        out_proj = _first_child(attn, _OUT_PROJ_NAMES)
        if out_proj is None:
            raise _missing(arch, f"the attention output projection of block {i}", _OUT_PROJ_NAMES)
        mlp = _first_child(block, _MLP_NAMES)
        if mlp is None:
            raise _missing(arch, f"the MLP of block {i}", _MLP_NAMES)
        router = None
        if hasattr(mlp, "experts"):
            router = _first_child(mlp, _ROUTER_NAMES)
            if router is None:
                raise _missing(arch, f"the MoE router of block {i}", _ROUTER_NAMES)
        attentions.append(attn)
        out_projs.append(out_proj)
        mlps.append(mlp)
        routers.append(router)
        norms.append({name: m for name, m in block.named_children() if "norm" in type(m).__name__.lower() or name.startswith("ln")})

    hidden = _cfg(cfg, "hidden_size", "n_embd", "d_model")
    n_heads = _cfg(cfg, "num_attention_heads", "n_head", "num_heads")
    if hidden is None or n_heads is None:
        raise _missing(arch, "hidden_size / num_attention_heads in the config", ("hidden_size", "n_embd", "num_attention_heads", "n_head"))
    head_dim = _cfg(cfg, "head_dim", default=hidden // n_heads)
    n_kv = _cfg(cfg, "num_key_value_heads", "num_kv_heads", default=n_heads)
    in_features = _out_proj_in_features(out_projs[0])
    if in_features is not None and in_features != n_heads * head_dim:
        raise SteerscaleError(
            f"{arch}: attention output projection takes {in_features} features, expected n_heads*head_dim = "
            f"{n_heads}*{head_dim}", "the config's head_dim does not match the weights; report this architecture"
        )
    n_experts = _cfg(cfg, "num_local_experts", "num_experts", "n_routed_experts")
    final_norm = _first_child(base, ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f"))
    return ModelLayout(
        architecture=arch,
        base=base,
        blocks=list(blocks),
        attentions=attentions,
        out_projs=out_projs,
        mlps=mlps,
        norms=norms,
        routers=routers,
        hidden_size=int(hidden),
        n_heads=int(n_heads),
        n_kv_heads=int(n_kv),
        head_dim=int(head_dim),
        n_experts=int(n_experts) if n_experts and any(r is not None for r in routers) else None,
        final_norm=final_norm,
        extra={"blocks_path": block_path},
    )


def _out_proj_in_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and type(module).__name__ == "Conv1D":
        return weight.shape[0]  # gpt2's Conv1D stores (in, out)
    return None
