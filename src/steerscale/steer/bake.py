"""Bake a constant steering edit into a standard Hugging Face checkpoint: no hooks, no steerscale at serve time.

A constant addition at every token is an affine change of one layer's output, so it can live in a bias:

==========================  ========================================================================================
edit (``Add``, scope all)   folded into
==========================  ========================================================================================
``resid_post`` of block i   bias of block i's MLP output projection (``down_proj`` / ``c_proj`` / ``dense_4h_to_h``):
                            the MLP output is added straight into the residual stream, so ``+v`` there is ``+v`` on
                            the block's output
``resid_pre`` of block i    the same as ``resid_post`` of block ``i-1`` (the same tensor); block 0's input is the
                            embedding output, which has no bias: refused (folding into the embedding matrix would
                            also change a tied output head)
``mlp_out`` of block i      bias of block i's MLP output projection
``attn_out`` of block i     bias of block i's attention output projection (``o_proj`` / ``c_proj`` / ``dense``)
``head_out`` (i, h) (ITI)   ``o_proj.bias += W_o[:, h*d:(h+1)*d] @ v`` on block i's attention output projection
==========================  ========================================================================================

Not bakeable, each with a ``SteerscaleError`` saying why: edits scoped to some tokens (a bias acts on every
token), edits other than ``Add`` (ablation, clamping, affine maps depend on the activation), per-row or
norm-preserving additions, router edits, MLP edits in MoE blocks (no single output projection), and
architectures where the slot has no bias that plain transformers would load (see below) or where a norm follows
the MLP (Gemma 2/3 ``post_feedforward_layernorm``: a residual edit there is not a bias).

Loadability. Plain ``AutoModelForCausalLM.from_pretrained`` only loads a bias its config asks for. Llama-likes
have ``mlp_bias`` (gate/up/down) and ``attention_bias`` (q/k/v/o) flags that switch biases on for *every*
projection of that kind in every layer; we set the flags and write zero biases wherever we have no edit, which
keeps those projections exact. Which flags create which biases is not hard-coded: we build the model class on
the meta device with and without each flag and compare parameter names. A few families hard-code
``bias=False`` (Qwen2's ``o_proj`` and MLP, Mistral's projections); when such a model is exactly a Llama
(no sliding-window layers) it is saved as ``LlamaForCausalLM`` with the bias flags, and ``steerscale.json``
records the change. GPT-2 / GPT-NeoX projections already have biases: nothing in the config changes.

Checks. Before saving, the edited model (biases set in memory) is compared with the hooked original on a short
probe input; after saving, ``verify=True`` reloads the directory with plain transformers (no steerscale code
involved), checks that no weight was missing or unexpected, and compares logits again. The checkpoint is
written to a temporary directory and moved into place only when all checks pass. The model passed in is left
exactly as it was.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..engine.ops import Add, check_scale
from ..engine.runtime import Intervention, intervene
from ..engine.scope import Scope
from ..errors import SteerscaleError
from ..models.layout import ModelLayout, text_config
from ..models.sites import Site, SiteKind
from ..version import __version__
from .vector import SteeringVector

log = logging.getLogger(__name__)

FORMAT = "steerscale.baked/1"
REPORT_FILE = "steerscale.json"
_DOWN_PROJ_NAMES = ("down_proj", "dense_4h_to_h", "c_proj", "fc2", "w2", "fc_out", "out_proj")
_BIAS_FLAGS = ("attention_bias", "mlp_bias")
_PROBE_TOKENS = 8


@dataclass
class _Fold:
    site: Site
    scale: float
    module: nn.Module
    delta: torch.Tensor  # float32, added to the module's bias


# -- inputs -----------------------------------------------------------------------------------------------------
def as_interventions(steering, scale: float, layout: ModelLayout) -> tuple[list[Intervention], list[dict]]:
    """Interventions (with ``scale`` applied) and a description of the vectors they came from."""
    factor = float(check_scale(scale))
    items = steering if isinstance(steering, (list, tuple)) and not _is_pair(steering) else [steering]
    out: list[Intervention] = []
    sources: list[dict] = []
    for item in items:
        if _is_pair(item):
            vector, s = item
            s = float(check_scale(s)) * factor
        else:
            vector, s = item, factor
        if isinstance(vector, SteeringVector):
            vector.check_compatible(layout)
            out.extend(vector.interventions(s, layout=layout))
            sources.append({"method": vector.method, "model_name": vector.model_name,
                            "model_fingerprint": vector.model_fingerprint, "scale": s,
                            "sites": [site.key() for site in vector.sites], "metadata": vector.metadata})
        elif isinstance(vector, Intervention):
            out.append(_scaled(vector, s))
        else:
            raise SteerscaleError(
                f"cannot bake a {type(vector).__name__}",
                "pass a SteeringVector, (SteeringVector, scale) pairs, or a list of Interventions",
            )
    if not out:
        raise SteerscaleError("nothing to bake: no steering edits were given")
    return out, sources


def _is_pair(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], (SteeringVector, Intervention)) and not isinstance(x[1], (SteeringVector, Intervention))


def _scaled(iv: Intervention, factor: float) -> Intervention:
    if factor == 1.0 or not isinstance(iv.edit, Add):
        return iv
    edit = Add(iv.edit.vector, iv.edit.scale * factor, preserve_norm=iv.edit.preserve_norm)
    return Intervention(iv.site, edit, iv.scope, iv.rows)


def _check_bakeable(iv: Intervention) -> tuple[torch.Tensor, float]:
    where = iv.site.key()
    if iv.scope.kind is not Scope.ALL:
        raise SteerscaleError(
            f"cannot bake the edit at {where}: it is scoped to {iv.scope.kind.value} tokens, but a bias acts on every "
            "token of every sequence", "bake with scope 'all', or keep this edit as a runtime hook (--steer ... --scope)")
    if iv.rows is not None:
        raise SteerscaleError(f"cannot bake the edit at {where}: it applies to some batch rows only",
                              "a checkpoint edits every request the same way; drop rows=")
    edit = iv.edit
    if not isinstance(edit, Add):
        raise SteerscaleError(
            f"cannot bake the {type(edit).__name__} edit at {where}: only constant additions (Add) fold into biases; "
            "ablation, clamping and affine edits depend on the activation", "keep this edit as a runtime hook")
    if edit.preserve_norm:
        raise SteerscaleError(f"cannot bake the edit at {where}: preserve_norm rescales each activation, which no bias can do",
                              "bake the addition without preserve_norm")
    if edit.vector.dim() != 1 or edit.scale.dim() != 0:
        raise SteerscaleError(f"cannot bake the edit at {where}: it has per-row vectors or scales",
                              "a checkpoint edits every request the same way; use one vector and one scale")
    return edit.vector.float(), float(edit.scale)


# -- where each edit goes ----------------------------------------------------------------------------------------
def down_projection(layout: ModelLayout, i: int, site: Site) -> nn.Module:
    if layout.routers[i] is not None:
        raise SteerscaleError(
            f"cannot fold {site.key()} into weights: block {i} is a mixture-of-experts block, which has no single "
            "output projection", "steer attn_out or head_out sites of this layer, or keep the edit as a runtime hook")
    mlp = layout.mlps[i]
    for name in _DOWN_PROJ_NAMES:
        child = getattr(mlp, name, None)
        if isinstance(child, nn.Module) and _out_features(child) == layout.hidden_size:
            return child
    raise SteerscaleError(f"cannot fold {site.key()} into weights: found no output projection in block {i}'s MLP "
                          f"(tried {', '.join(_DOWN_PROJ_NAMES)})", "report this architecture")


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whether ``nn.Linear`` or gpt2's transposed ``Conv1D``."""
    w = module.weight
    return w.T if type(module).__name__ == "Conv1D" else w


def _out_features(module: nn.Module) -> int | None:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    return _linear_weight(module).shape[0]


def _plan(layout: ModelLayout, ivs: list[Intervention]) -> list[_Fold]:
    folds: list[_Fold] = []
    for iv in ivs:
        vec, scale = _check_bakeable(iv)
        site = iv.site
        layout.locate(site)  # layer / head range checks
        if vec.shape[0] != layout.site_dim(site):
            raise SteerscaleError(f"edit at {site.key()} has size {vec.shape[0]}, but this model's site has size "
                                  f"{layout.site_dim(site)}", "the vector was made for another model")
        kind, i = site.kind, site.layer
        if kind is SiteKind.RESID_PRE:
            if i == 0:
                raise SteerscaleError(
                    "cannot bake resid_pre.0: the input of block 0 is the token embedding, which has no bias (folding the "
                    "vector into the embedding matrix would also shift a tied output head)",
                    "steer a later site (resid_pre of block i >= 1 is baked as resid_post of block i-1)")
            module = down_projection(layout, i - 1, site)
            delta = scale * vec
        elif kind in (SiteKind.RESID_POST, SiteKind.MLP_OUT):
            module = down_projection(layout, i, site)
            delta = scale * vec
        elif kind is SiteKind.ATTN_OUT:
            module = layout.out_projs[i]
            delta = scale * vec
        elif kind is SiteKind.HEAD_OUT:
            module = layout.out_projs[i]
            d = layout.head_dim
            w = _linear_weight(module).detach().float()
            delta = w[:, site.head * d:(site.head + 1) * d] @ (scale * vec.to(w.device)).float()
        else:
            raise SteerscaleError(f"cannot bake {site.key()}: router edits change expert routing, not a bias",
                                  "keep this edit as a runtime hook")
        if _out_features(module) != delta.shape[0]:
            raise SteerscaleError(f"cannot bake {site.key()}: {type(module).__name__} has {_out_features(module)} outputs, "
                                  f"expected {delta.shape[0]}", "report this architecture")
        folds.append(_Fold(site, scale, module, delta.detach().cpu().float()))
    return folds


# -- which biases plain transformers will load -------------------------------------------------------------------
def _meta_params(cls, config) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = cls(config)
    return {name: p.shape for name, p in model.named_parameters()}


def _config_path(config) -> list[str]:
    """Attribute path from the top-level config to its text config ([] when they are the same object)."""
    text = text_config(config)
    if text is config:
        return []
    for name, value in vars(config).items():
        if value is text:
            return [name]
    raise SteerscaleError("could not find the text sub-config of this model's config", "report this architecture")


def _llama_equivalent(text_cfg) -> bool:
    kind = getattr(text_cfg, "model_type", "")
    if kind == "qwen2":
        return not getattr(text_cfg, "use_sliding_window", False) and "sliding_attention" not in (getattr(text_cfg, "layer_types", None) or [])
    if kind == "mistral":
        return getattr(text_cfg, "sliding_window", None) is None
    return False


@dataclass
class _BiasPlan:
    new_biases: dict[str, torch.Size]  # bias parameters to create (zeros unless an edit lands there)
    flags: list[str]  # config flags to switch on
    retarget: object | None = None  # a LlamaConfig when the checkpoint is saved as Llama


def _bias_plan(model: nn.Module, needed: dict[str, nn.Module]) -> _BiasPlan:
    if not needed:
        return _BiasPlan({}, [])
    cls = type(model)
    base = _meta_params(cls, model.config)
    live = {name for name, _ in model.named_parameters()}
    if set(base) != live:
        raise SteerscaleError(
            f"this {cls.__name__} has parameters its config does not describe (wrapped or modified model)",
            "bake a plain transformers model (merge adapters first)")
    path = _config_path(model.config)
    text = text_config(model.config)
    flags: list[str] = []
    added: dict[str, torch.Size] = {}
    for flag in _BIAS_FLAGS:
        if not hasattr(text, flag) or getattr(text, flag):
            continue
        cfg = copy.deepcopy(model.config)
        setattr(text_config(cfg), flag, True)
        new = {n: s for n, s in _meta_params(cls, cfg).items() if n not in base and n.endswith(".bias")}
        if new.keys() & needed.keys():
            flags.append(flag)
            added.update(new)
    if needed.keys() <= added.keys():
        return _BiasPlan(added, flags)
    kind = getattr(text, "model_type", cls.__name__)
    if not path and _llama_equivalent(text):
        from transformers import LlamaConfig, LlamaForCausalLM

        d = text.to_dict()
        d.pop("model_type", None)
        d["architectures"] = ["LlamaForCausalLM"]
        llama_cfg = LlamaConfig.from_dict(d)
        llama_cfg.attention_bias = any(n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for n in base) or any(
            n.endswith("o_proj.bias") for n in needed)
        llama_cfg.mlp_bias = any(".mlp." in n for n in needed)
        params = _meta_params(LlamaForCausalLM, llama_cfg)
        same = all(params.get(n) == s for n, s in base.items())
        new = {n: s for n, s in params.items() if n not in base}
        if same and needed.keys() <= new.keys() and all(n.endswith(".bias") for n in new):
            log.warning("%s hard-codes bias=False on the projections the edit needs; saving the checkpoint as "
                        "LlamaForCausalLM (an exact equivalent) with bias flags", kind)
            return _BiasPlan(new, [f for f in _BIAS_FLAGS if getattr(llama_cfg, f)], llama_cfg)
    missing = sorted(needed.keys() - added.keys())
    raise SteerscaleError(
        f"cannot bake into this {kind} model: its transformers class has no bias at {missing[0]}"
        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        + " and no config flag that adds one, so plain transformers would drop the edit",
        "steer sites this architecture can carry (attn_out/head_out when it has attention_bias), or keep the edit as "
        "a runtime hook")


# -- checks ----------------------------------------------------------------------------------------------------
def probe_ids(model: nn.Module, device) -> torch.Tensor:
    vocab = int(getattr(text_config(model.config), "vocab_size", 0) or 32)
    return torch.tensor([[(7 * k + 3) % vocab for k in range(_PROBE_TOKENS)]], device=device)


@torch.no_grad()
def model_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().cpu()


def logit_tolerance(dtype: torch.dtype, ref: torch.Tensor, effect: float) -> float:
    scale = 1.0 + float(ref.abs().max())
    atol = (2e-5 if dtype == torch.float32 else (1e-12 if dtype == torch.float64 else 2e-2)) * scale
    return max(atol, 1e-3 * effect)


# -- the bake --------------------------------------------------------------------------------------------------
def bake(model: nn.Module, layout: ModelLayout, steering, scale: float, out_dir: str | Path, tokenizer=None, *,
         verify: bool = True, overwrite: bool = False, source: str | None = None) -> dict:
    """Write a Hugging Face checkpoint of ``model`` with ``steering`` (at ``scale``) folded into bias terms.

    ``steering``: a ``SteeringVector``, a list of them or of ``(vector, scale)`` pairs, or a list of
    ``Intervention`` (``Add`` edits with scope ``all``). ``scale`` multiplies every edit. The tokenizer, when
    given, is saved beside the weights, and ``steerscale.json`` records what was baked. ``overwrite`` replaces
    an existing directory only when it is empty or an earlier bake. Returns the report written to
    ``steerscale.json``. ``model`` is not modified.
    """
    out_dir = Path(out_dir)
    ivs, sources = as_interventions(steering, scale, layout)
    folds = _plan(layout, ivs)
    check_target(out_dir, overwrite)
    deltas, record = _bias_deltas(model, folds)
    plan = _bias_plan(model, _missing_biases(model, deltas))
    probe = make_probe(model, lambda: intervene(layout, ivs))
    with staging(out_dir) as tmp:
        diff_mem = _save_baked(model, layout, deltas, plan, probe, tmp)
        _patch_config(tmp / "config.json", model.config, plan)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        report = _report(model, layout, plan, deltas, scale, record, sources, source)
        report["check"] = {"probe_tokens": _PROBE_TOKENS, "edit_effect": probe.effect, "tolerance": probe.tol,
                           "in_memory_max_abs_diff": diff_mem}
        if verify:
            report["check"]["reload_max_abs_diff"] = verify_reload(tmp, probe)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
        publish(tmp, out_dir)
    report["out_dir"] = str(out_dir)
    return report


def _bias_deltas(model: nn.Module, folds: list[_Fold]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The change to each bias parameter, by name (folds on one module add up), and a record of each fold."""
    names = {id(m): n for n, m in model.named_modules()}
    deltas: dict[str, torch.Tensor] = {}
    record = []
    for f in folds:
        mod_name = names.get(id(f.module))
        if mod_name is None:
            raise SteerscaleError("the layout does not belong to this model", "pass the layout returned with the model")
        key = f"{mod_name}.bias"
        deltas[key] = deltas[key] + f.delta if key in deltas else f.delta
        record.append({"site": f.site.key(), "scale": f.scale, "bias": key})
    return deltas, record


def _missing_biases(model: nn.Module, deltas: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """The modules (by bias name) that get an edit but have no bias yet."""
    needed = {k: model.get_submodule(k.rsplit(".", 1)[0]) for k in deltas}
    return {k: m for k, m in needed.items() if m.bias is None}


@dataclass
class Probe:
    """The logits a written checkpoint must reproduce on a short probe input (``probe``)."""

    ids: torch.Tensor
    reference: torch.Tensor  # the logits to reproduce
    effect: float  # max logit change the edit makes
    tol: float
    dtype: torch.dtype
    device: torch.device


@contextmanager
def eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def make_probe(model: nn.Module, applied) -> Probe:
    """The logits a written checkpoint must reproduce: ``model``'s on a short probe input while the context manager
    ``applied()`` is active (the hooks for a bake, the merged weights for CASAL), with the tolerance that follows
    from the dtype and the size of the change."""
    param = next(model.parameters())
    ids = probe_ids(model, param.device)
    with eval_mode(model):
        plain = model_logits(model, ids)
        with applied():
            reference = model_logits(model, ids)
    effect = float((reference - plain).abs().max())
    return Probe(ids, reference, effect, logit_tolerance(param.dtype, reference, effect), param.dtype, param.device)


@contextmanager
def staging(out_dir: Path):
    """A temporary directory beside ``out_dir`` to write the checkpoint into; removed if the block fails."""
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent if out_dir.parent.exists() else None, prefix=f".{out_dir.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def _biases_set(model: nn.Module, deltas: dict[str, torch.Tensor], plan: _BiasPlan):
    """``model`` with the baked biases in place (new ones created, edited ones replaced); its own come back on exit."""
    restore: list[tuple[nn.Module, object]] = []
    try:
        for key in sorted(set(plan.new_biases) | set(deltas)):
            module = model.get_submodule(key.rsplit(".", 1)[0])
            old = module._parameters.get("bias")
            size = plan.new_biases.get(key) or (old.shape if old is not None else (_out_features(module),))
            value = old.detach().float().clone() if old is not None else torch.zeros(size, device=module.weight.device)
            if key in deltas:
                value = value + deltas[key].to(value.device)
            restore.append((module, old))
            module.bias = nn.Parameter(value.to(module.weight.dtype), requires_grad=False)
        yield
    finally:
        for module, old in reversed(restore):
            module.bias = old


def _save_baked(model: nn.Module, layout: ModelLayout, deltas: dict[str, torch.Tensor], plan: _BiasPlan,
                probe: Probe, directory: Path) -> float:
    """Save ``model`` with the biases set, once they reproduce the hooked edit in memory; returns that difference."""
    with eval_mode(model), _biases_set(model, deltas, plan):
        diff_mem = float((model_logits(model, probe.ids) - probe.reference).abs().max())
        if diff_mem > probe.tol:
            raise SteerscaleError(
                f"the biases do not reproduce the hooked edit on this {layout.architecture} model (max logit difference "
                f"{diff_mem:.3g}, edit effect {probe.effect:.3g}): this architecture transforms the slot's output before "
                "it reaches the residual stream (e.g. a norm after the MLP), so the edit is not a bias here",
                "keep the edit as a runtime hook, or steer mlp_out/attn_out sites")
        model.save_pretrained(directory, safe_serialization=True)
    return diff_mem


def _report(model: nn.Module, layout: ModelLayout, plan: _BiasPlan, deltas: dict, scale: float, record: list[dict],
            sources: list[dict], source: str | None) -> dict:
    return {
        "format": FORMAT,
        "library_version": __version__,
        "source_model": source or getattr(model.config, "_name_or_path", "") or "",
        "architecture": layout.architecture,
        "saved_as": plan.retarget.model_type if plan.retarget is not None else layout.architecture,
        "config_flags_set": plan.flags,
        "zero_biases_added": len(set(plan.new_biases) - set(deltas)),
        "scale": float(scale),
        "edits": record,
        "vectors": sources,
    }


def publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished checkpoint into place (replacing an earlier bake there)."""
    _publish_modes(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def _publish_modes(directory: Path) -> None:
    """mkdtemp makes a private (0700) directory; give the checkpoint the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def check_target(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return
    if not out_dir.is_dir():
        raise SteerscaleError(f"output path {out_dir} exists and is not a directory", "choose a new directory")
    contents = list(out_dir.iterdir())
    if not contents:
        return
    if not overwrite:
        raise SteerscaleError(f"output directory {out_dir} is not empty", "choose a new directory or pass --overwrite")
    if not (out_dir / REPORT_FILE).exists():
        raise SteerscaleError(f"refusing to overwrite {out_dir}: it is not an earlier steerscale bake",
                              "choose a new directory")


def _patch_config(path: Path, config, plan: _BiasPlan) -> None:
    """Switch on the bias flags in the saved config.json (or rewrite it as a Llama config)."""
    saved = json.loads(path.read_text())
    if plan.retarget is not None:
        new = plan.retarget.to_dict()
        for key in ("dtype", "torch_dtype", "transformers_version"):
            if key in saved:
                new[key] = saved[key]
        new["architectures"] = ["LlamaForCausalLM"]
        new["model_type"] = "llama"
        saved = new
    elif plan.flags:
        node = saved
        for part in _config_path(config):
            node = node[part]
        for flag in plan.flags:
            node[flag] = True
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def verify_reload(directory: Path, probe: Probe) -> float:
    """Load ``directory`` with plain transformers and compare its logits with ``probe``'s (the hooked model's for a
    bake, the merged model's for CASAL)."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=probe.dtype, output_loading_info=True)
    except Exception as exc:
        raise SteerscaleError(f"plain transformers could not load the baked checkpoint ({type(exc).__name__}: "
                              f"{str(exc)[:200]})", "report this architecture") from None
    problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise SteerscaleError(f"plain transformers loads the baked checkpoint with {problems}",
                              "report this architecture; the edit would be lost or wrong")
    model = model.to(probe.device).eval()
    diff = float((model_logits(model, probe.ids) - probe.reference).abs().max())
    del model
    if diff > probe.tol:
        raise SteerscaleError(f"the reloaded checkpoint differs from the model it was written from (max logit "
                              f"difference {diff:.3g} > "
                              f"{probe.tol:.3g})", "report this architecture")
    return diff


def baked_edits(directory: str | Path) -> dict:
    """The ``steerscale.json`` report of a baked checkpoint."""
    path = Path(directory) / REPORT_FILE
    if not path.is_file():
        raise SteerscaleError(f"{directory} has no {REPORT_FILE}", "it is not a checkpoint written by steerscale bake")
    return json.loads(path.read_text())


__all__ = ["bake", "baked_edits"]
