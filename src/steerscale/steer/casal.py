"""CASAL: amortise a steering intervention into one layer's MLP weights (Yang et al. 2025, "Contrastive Activation
Steering for Amortized Learning"), so the steered model is a plain checkpoint that needs no hooks.

The steering to amortise is any list of ``Intervention`` the engine runs (a constant add is the common case; the
point of training is that input-dependent edits such as norm-preserving adds amortise too). With ``L`` the
deepest block the edits touch (or a deeper one, ``layer=``):

1. Targets, once, from the hooked model: the steered ``resid_post`` of block ``L`` at every real token of the
   steer texts (padding masked). Keep texts (optional, e.g. the shipped neutral prompts) get the *unsteered*
   ``resid_post`` as their target, so the baked model steers where it should and changes little elsewhere.
2. Training: the unhooked model, with block ``L``'s MLP output (down) projection replaced by ``W + B A`` (rank
   ``r``; ``A`` random, ``B`` zero, so training starts at the unsteered model), learns ``A, B`` with Adam on the
   squared error to the targets. The loss is divided by the mean squared size of the edit (``|target - base|^2``
   over the steer tokens): 1 = no better than the unsteered model, 0 = exact.
3. ``bake_casal`` merges ``W + B A`` into the weight and writes a standard Hugging Face checkpoint (safetensors)
   through ``steer.bake``'s staging directory, target checks and reload check.

Two ways to run step 2, the same objective:

* ``cached`` (used when block ``L``'s MLP output is added straight into the residual stream, checked with a probe
  edit: Llama-likes, Qwen, GPT-2, GPT-NeoX, Phi-3): the down projection's input ``h`` and the unsteered
  ``resid_post`` are read once, and ``resid_post' = resid_post + h (B A)^T`` is exact, so each step is two small
  matrix products and no model pass at all.
* ``forward`` (any other block, e.g. Gemma 2/3 whose MLP output goes through a norm first): each step runs the
  unhooked model with the merged weight (``torch.func.functional_call``, no module is changed) and stops right
  after block ``L`` (``engine.runtime.observe(..., stop_after=L)``).

Either way the fit quality "after" is measured with a real forward pass of the merged model, not the cached
algebra, so a structural surprise shows up in the numbers. The model passed in is never modified: no weight is
written, no hook outlives a call, and a diverging loss raises before any parameter update (``training.descend``).

Deviations from the paper, which trains one layer's MLP sub-module on the contrastive steering targets of "known"
and "unknown" questions: here the update is low-rank on the down projection only (a rank knob, a parameter count
comparable to LoRA's) and the second set of texts ("keep") targets the unsteered activation rather than an
opposite steer. Edits that are not on every token the same way for every row (token scopes other than ``all``,
``rows=``, token gates, per-row vectors) are refused: a checkpoint cannot tell prompt from generated tokens or one
request from another.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..engine.capture import Batch, read_raw, tokenize
from ..engine.generation import format_prompt
from ..engine.ops import Add
from ..engine.runtime import Intervention, Observer, StopForward, attach_hook, intervene, observe
from ..engine.scope import Scope
from ..errors import SteerscaleError
from ..models.layout import HookPoint, Location, ModelLayout
from ..models.loading import LoadedModel
from ..models.sites import Site, SiteKind
from ..version import __version__
from .bake import (REPORT_FILE, as_interventions, check_target, down_projection, eval_mode, make_probe, probe_ids,
                   publish, staging, verify_reload)
from .knobs import Knobs
from .pairs import bundled_pairs, load_pairs, read_jsonl
from .training import descend, frozen

FORMAT = "steerscale.casal/1"
RECORD_FILE = "casal.json"
MODES = ("auto", "cached", "forward")
_ADDITIVE_TOL = 1e-2  # relative error of the probe edit that still counts as "added straight into the residual"


@dataclass(frozen=True)
class CasalConfig(Knobs):
    """Knobs of the fit, validated at construction."""

    LABEL: ClassVar[str] = "CASAL"
    rank: int = 8  # r of the update W + B A
    steps: int = 300  # Adam steps
    lr: float = 5e-3
    keep_weight: float = 1.0  # weight of the keep texts' loss against the steer texts'
    layer: int = -1  # block whose MLP is trained; -1: the deepest block the steering edits
    mode: str = "auto"  # auto | cached | forward (see the module docstring)
    batch_size: int = 8  # texts per model pass (targets; a step of the forward mode)
    seed: int = 0

    def __post_init__(self):
        for name in ("rank", "steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SteerscaleError(f"CASAL {name} must be an integer of at least 1, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise SteerscaleError(f"CASAL lr must be a positive finite number, got {self.lr!r}")
        kw = self.keep_weight
        if not (isinstance(kw, (int, float)) and math.isfinite(kw) and kw >= 0):
            raise SteerscaleError(f"CASAL keep_weight must be a finite number >= 0, got {self.keep_weight!r}")
        if not isinstance(self.layer, int) or self.layer < -1:
            raise SteerscaleError(f"CASAL layer must be a block index or -1 (auto), got {self.layer!r}")
        if self.mode not in MODES:
            raise SteerscaleError(f"unknown CASAL mode {self.mode!r}", f"use one of: {', '.join(MODES)}")


@dataclass
class CasalResult:
    """The learned update ``W' = W + B @ A`` of one down projection, and the record of how it was fitted."""

    model_name: str
    layer: int
    module: str  # parameter path of the down projection, e.g. model.layers.14.mlp.down_proj
    A: torch.Tensor  # (rank, d_in), float32, CPU
    B: torch.Tensor  # (d_out, rank), float32, CPU
    config: CasalConfig
    mode: str  # cached | forward
    losses: list[float]
    seconds: float
    flops: dict
    params: dict
    fit: dict  # {"steer": {"before", "after"}, "keep": {...} | None}: relative MSE (see the module docstring)
    edits: list[dict]
    data: dict = field(default_factory=dict)

    def delta(self) -> torch.Tensor:
        """The change of the weight as (out_features, in_features), float32."""
        return self.B @ self.A

    def to_dict(self) -> dict:
        """Everything but the factors, as JSON-ready values (``casal.json``)."""
        return {"format": FORMAT, "library_version": __version__, "model_name": self.model_name, "layer": self.layer,
                "module": self.module, "config": asdict(self.config), "mode": self.mode, "losses": self.losses,
                "seconds": round(self.seconds, 3), "flops": self.flops, "params": self.params, "fit": self.fit,
                "edits": self.edits, "data": self.data}


# -- texts -------------------------------------------------------------------------------------------------------
def casal_texts(tokenizer, source, chat: bool | None = None) -> list[str]:
    """Texts for ``fit_casal`` from a list of strings, a bundled pairs name (``formal_casual``) or a JSONL file.

    JSONL lines with ``positive``/``negative`` are contrastive pairs: both full texts are used (prompt pairs get the
    chat template, as ``extract`` reads them). Other lines give ``text`` (used as is) or ``prompt``/``instruction``
    (chat template applied when the model has one)."""
    if isinstance(source, (list, tuple)):
        texts = list(source)
    else:
        path = Path(source)
        if not path.is_file() and "/" not in str(source) and not str(source).endswith(".jsonl"):
            path = bundled_pairs(str(source))
        rows = read_jsonl(path)
        if all("positive" in obj for _, obj in rows):
            from .extract import (
                pair_texts,  # extract imports lofit and the methods registry: only when needed
            )

            both = pair_texts(tokenizer, load_pairs(path), chat)
            texts = both.positive + both.negative
        else:
            texts = [_row_text(tokenizer, obj, f"{path}:{n}", chat) for n, obj in rows]
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise SteerscaleError("CASAL needs non-empty texts", "give texts where the steered behaviour applies, e.g. "
                              "prompts with completions, or a pairs file")
    return texts


def _row_text(tokenizer, obj: dict, where: str, chat: bool | None) -> str:
    if isinstance(obj.get("text"), str) and obj["text"].strip():
        return obj["text"]
    for key in ("prompt", "instruction"):
        if isinstance(obj.get(key), str) and obj[key].strip():
            return format_prompt(tokenizer, obj[key], chat)
    raise SteerscaleError(f"{where}: no non-empty 'text', 'prompt' or 'instruction' field",
                          'lines look like {"text": "..."} or {"prompt": "...", "positive": "...", "negative": "..."}')


# -- checks ------------------------------------------------------------------------------------------------------
def _check_edits(layout: ModelLayout, ivs: list[Intervention]) -> int:
    """The deepest block the edits touch; refuses edits a checkpoint cannot carry the same way for every request."""
    for iv in ivs:
        where = iv.site.key()
        layout.locate(iv.site)
        if iv.scope.kind is not Scope.ALL:
            raise SteerscaleError(
                f"cannot amortise the edit at {where}: it is scoped to {iv.scope.kind.value} tokens, and a checkpoint "
                "cannot tell prompt from generated tokens", "amortise the edit with scope 'all'")
        if iv.rows is not None or iv.gate is not None:
            raise SteerscaleError(f"cannot amortise the edit at {where}: it applies to some rows or from a gate's "
                                  "token only, but a checkpoint edits every request the same way", "drop rows= / gate=")
        if isinstance(iv.edit, Add) and (iv.edit.vector.dim() != 1 or iv.edit.scale.dim() != 0):
            raise SteerscaleError(f"cannot amortise the edit at {where}: it has per-row vectors or scales",
                                  "use one vector and one scale")
    return max(iv.site.layer for iv in ivs)


def _pick_layer(cfg: CasalConfig, deepest: int, layout: ModelLayout) -> int:
    if cfg.layer == -1:
        return deepest
    layout.check_layer(cfg.layer)
    if cfg.layer < deepest:
        raise SteerscaleError(
            f"CASAL layer {cfg.layer} comes before an edit in block {deepest}: the resid_post of block {cfg.layer} is "
            "computed before that edit runs, so its MLP cannot reproduce it",
            f"train block {deepest} or a later one (layer=-1 picks {deepest})")
    return cfg.layer


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise SteerscaleError("the layout does not belong to this model", "pass the layout returned with the model")


def _weight_delta(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """``delta`` (out, in) in the layout of ``module.weight`` (gpt2's ``Conv1D`` stores (in, out))."""
    return delta.T if type(module).__name__ == "Conv1D" else delta


def _resid_after(model, layout: ModelLayout, batch: Batch, layer: int, weights: dict | None = None) -> torch.Tensor:
    """``resid_post`` of ``layer`` from a pass that stops right after it; ``weights`` overrides parameters by name
    (``functional_call``: the model's own tensors are not touched), so gradients flow into them."""
    seen: dict[str, torch.Tensor] = {}
    with observe(layout, [Observer(Site(layer), partial(seen.__setitem__, "h"))], stop_after=layer):
        try:
            if weights:
                torch.func.functional_call(model, weights, (), {**batch.model_inputs(), "use_cache": False})
            else:
                model(**batch.model_inputs(), use_cache=False)
        except StopForward:
            pass
    return seen["h"]


@torch.no_grad()
def _mlp_is_additive(lm: LoadedModel, layer: int) -> bool:
    """Does an edit of block ``layer``'s MLP output reach its resid_post unchanged? (then the cached mode is exact)"""
    model, layout = lm.model, lm.layout
    ids = probe_ids(model, next(model.parameters()).device)
    batch = Batch(ids, torch.ones_like(ids))
    plain = read_raw(model, layout, batch, [Site(layer)])[Site(layer)].float()
    delta = torch.randn(layout.hidden_size, generator=torch.Generator().manual_seed(0))
    delta = delta / delta.norm() * float(plain.norm(dim=-1).mean())
    with intervene(layout, [Intervention(Site(layer, SiteKind.MLP_OUT), Add(delta.to(plain.device), 1.0))]):
        moved = read_raw(model, layout, batch, [Site(layer)])[Site(layer)].float()
    err = float((moved - plain - delta.to(plain.device)).norm() / (delta.norm() * math.sqrt(ids.numel())))
    return err < _ADDITIVE_TOL


# -- targets -----------------------------------------------------------------------------------------------------
@dataclass
class _Chunk:
    """One batch of texts: the encoded inputs and, per real token (rows flattened), what training needs."""

    batch: Batch
    base: torch.Tensor  # unsteered resid_post, (n_tokens, d)
    target: torch.Tensor  # what the trained model should produce there, (n_tokens, d)
    hidden: torch.Tensor | None  # the down projection's input (cached mode), (n_tokens, d_in)


@contextmanager
def _reading_input(module: nn.Module, store: list):
    """A read-only pre-hook (through the runtime's ``attach_hook``) that keeps ``module``'s input."""
    def read(mod, args, kwargs):
        store.append(args[0] if args else kwargs["hidden_states"])

    handle = attach_hook(Location(module, HookPoint.INPUT), read)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def _chunks(lm: LoadedModel, texts: list[str], ivs: list[Intervention] | None, layer: int, down: nn.Module,
            cached: bool, batch_size: int) -> list[_Chunk]:
    """Targets for ``texts``: the steered resid_post (``ivs``), or the unsteered one when ``ivs`` is None."""
    device = next(lm.model.parameters()).device
    out = []
    for s in range(0, len(texts), batch_size):
        batch = tokenize(lm.tokenizer, texts[s : s + batch_size], device)
        mask = batch.attention_mask.bool()
        inputs: list[torch.Tensor] = []
        with _reading_input(down, inputs) if cached else _nothing():
            base = _resid_after(lm.model, lm.layout, batch, layer)
        if ivs is None:
            target = base
        else:
            with intervene(lm.layout, ivs):
                target = _resid_after(lm.model, lm.layout, batch, layer)
        hidden = inputs[-1].float()[mask] if cached else None
        out.append(_Chunk(batch, base.float()[mask], target.float()[mask], hidden))
    return out


@contextmanager
def _nothing():
    yield


# -- training ----------------------------------------------------------------------------------------------------
def _sq(x: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the squared norm per token."""
    return (x * x).sum(-1).mean()


def _init(d_in: int, d_out: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA's start: A random (1/sqrt(d_in) so A h keeps h's scale), B zero, so W + B A = W at step 0."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(rank, d_in, generator=g) / math.sqrt(d_in)).requires_grad_(True)
    return a, torch.zeros(d_out, rank, requires_grad=True)


def _merged_weight(weight: torch.Tensor, module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    delta = _weight_delta(module, b.to(weight.device) @ a.to(weight.device))
    return (weight.float() + delta).to(weight.dtype)


def _train_cached(steer: list[_Chunk], keep: list[_Chunk], a, b, cfg: CasalConfig, denom: float) -> list[float]:
    """Adam on the exact cached algebra: resid_post' = resid_post + h (B A)^T (all tokens in one step)."""
    hs, bs, ts = (torch.cat([getattr(c, k) for c in steer]) for k in ("hidden", "base", "target"))
    hk, bk = (torch.cat([getattr(c, k) for c in keep]) if keep else None for k in ("hidden", "base"))
    dev = hs.device
    a_, b_ = a.to(dev).detach().requires_grad_(True), b.to(dev).detach().requires_grad_(True)
    opt = torch.optim.Adam([a_, b_], lr=cfg.lr)
    losses = []
    for step in range(cfg.steps):
        loss = _sq(bs + (hs @ a_.T) @ b_.T - ts) / denom
        if hk is not None and cfg.keep_weight:
            loss = loss + cfg.keep_weight * _sq((hk @ a_.T) @ b_.T) / denom
        descend(opt, loss, "CASAL training", step, "lower lr and try again", unit="step")
        losses.append(float(loss.detach()))
    with torch.no_grad():
        a.copy_(a_.cpu()), b.copy_(b_.cpu())
    return losses


def _train_forward(lm: LoadedModel, steer: list[_Chunk], keep: list[_Chunk], a, b, cfg: CasalConfig, layer: int,
                   wname: str, down: nn.Module, denom: float) -> list[float]:
    """Adam through the unhooked model truncated after ``layer``, the down projection's weight merged per step."""
    opt = torch.optim.Adam([a, b], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    weight = down.weight
    losses = []
    with frozen(lm.model):
        for step in range(cfg.steps):
            weights = {wname: _merged_weight(weight, down, a, b)}
            c = steer[int(torch.randint(len(steer), (1,), generator=gen))]
            pred = _resid_after(lm.model, lm.layout, c.batch, layer, weights).float()[c.batch.attention_mask.bool()]
            loss = _sq(pred - c.target) / denom
            if keep and cfg.keep_weight:
                k = keep[int(torch.randint(len(keep), (1,), generator=gen))]
                pk = _resid_after(lm.model, lm.layout, k.batch, layer, weights).float()[k.batch.attention_mask.bool()]
                loss = loss + cfg.keep_weight * _sq(pk - k.target) / denom
            descend(opt, loss, "CASAL training", step, "lower lr and try again", unit="step")
            losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def _rel_mse(lm: LoadedModel, chunks: list[_Chunk], layer: int, weights: dict | None, denom: float) -> float:
    """Mean squared error per token of the (merged) model's resid_post against the targets, over ``denom``."""
    total, n = 0.0, 0
    for c in chunks:
        pred = _resid_after(lm.model, lm.layout, c.batch, layer, weights).float()[c.batch.attention_mask.bool()]
        total += float(((pred - c.target) ** 2).sum())
        n += pred.shape[0]
    return total / n / denom


def _block_params(layout: ModelLayout, layer: int) -> int:
    return sum(p.numel() for blk in layout.blocks[: layer + 1] for p in blk.parameters())


def _flops(layout: ModelLayout, layer: int, mode: str, cfg: CasalConfig, n_tok: int, tok_per_step: int,
           d_in: int, d_out: int) -> dict:
    """FLOPs, estimated with the usual 2 per parameter per token for a forward pass (blocks 0..L; attention's
    quadratic term and the embedding lookup left out) and backward = 2x forward for what needs gradients."""
    n_l = _block_params(layout, layer)
    r = cfg.rank
    targets = 2 * 2 * n_l * n_tok  # an unsteered and a steered pass over every text, stopped after block L
    if mode == "cached":
        training = cfg.steps * 6 * n_tok * r * (d_in + d_out)  # h A^T, (.) B^T: forward 2, backward 4
        step_rule = "steps * 6 * tokens * r * (d_in + d_out)"
    else:  # a truncated forward, the merged weight's gradient (2 T d_in d_out), the merge and its backward
        training = cfg.steps * (2 * n_l * tok_per_step + 2 * tok_per_step * d_in * d_out + 6 * d_in * d_out * r)
        step_rule = "steps * (2 * N_L * T_step + 2 * T_step * d_in * d_out + 6 * d_in * d_out * r)"
    evaluation = 2 * n_l * n_tok  # the fit quality pass of the merged model
    return {"targets": targets, "training": training, "evaluation": evaluation,
            "total": targets + training + evaluation, "block_params_N_L": n_l, "tokens": n_tok,
            "formula": f"targets 4 * N_L * tokens; training {step_rule}; evaluation 2 * N_L * tokens "
                       "(N_L = parameters of blocks 0..L)"}


def fit_casal(lm: LoadedModel, steering, texts, keep=None, config: CasalConfig | None = None, progress: bool = False,
              **knobs) -> CasalResult:
    """Learn a rank-``r`` update of one down projection so the unhooked model reproduces the steered activations.

    ``steering``: a list of ``Intervention`` (e.g. ``vector.interventions(scale)``), a ``SteeringVector`` or
    ``(vector, scale)`` pairs. ``texts``: where the behaviour applies (strings, a JSONL path or a bundled pairs
    name; see ``casal_texts``). ``keep``: texts whose target is the unsteered activation (optional). ``knobs``
    override ``CasalConfig`` fields. ``lm.model`` is left exactly as it was."""
    cfg = CasalConfig.build(config, **knobs)
    started = time.perf_counter()
    model, layout = lm.model, lm.layout
    if steering is None or (isinstance(steering, (list, tuple)) and not steering):
        raise SteerscaleError("CASAL needs steering edits to amortise, got none",
                              "pass vector.interventions(scale), a SteeringVector or (vector, scale) pairs")
    ivs, sources = as_interventions(steering, 1.0, layout)
    layer = _pick_layer(cfg, _check_edits(layout, ivs), layout)
    steer_texts = casal_texts(lm.tokenizer, texts)
    keep_texts = casal_texts(lm.tokenizer, keep) if keep is not None else []
    down = down_projection(layout, layer, Site(layer))
    wname = f"{_module_name(model, down)}.weight"
    d_out, d_in = (down.weight.shape[::-1] if type(down).__name__ == "Conv1D" else down.weight.shape)
    if cfg.rank > min(d_in, d_out):
        raise SteerscaleError(f"CASAL rank {cfg.rank} is larger than the projection ({d_out} x {d_in})",
                              f"use a rank of at most {min(d_in, d_out)}")
    with eval_mode(model):
        additive = _mlp_is_additive(lm, layer)
        mode = ("cached" if additive else "forward") if cfg.mode == "auto" else cfg.mode
        if mode == "cached" and not additive:
            raise SteerscaleError(f"mode=cached needs block {layer}'s MLP output to be added straight into the "
                                  f"residual stream, which this {layout.architecture} block does not do",
                                  "use mode=forward (or auto)")
        steer = _chunks(lm, steer_texts, ivs, layer, down, mode == "cached", cfg.batch_size)
        kept = _chunks(lm, keep_texts, None, layer, down, mode == "cached", cfg.batch_size) if keep_texts else []
        denom = float(sum(((c.target - c.base) ** 2).sum() for c in steer) / sum(c.base.shape[0] for c in steer))
        if not denom > 0:
            raise SteerscaleError(f"the steering does not change block {layer}'s output on these texts",
                                  "check the scale (0?) and that the edits run on these texts")
        a, b = _init(d_in, d_out, cfg.rank, cfg.seed)
        if mode == "cached":
            losses = _train_cached(steer, kept, a, b, cfg, denom)
        else:
            losses = _train_forward(lm, steer, kept, a, b, cfg, layer, wname, down, denom)
        a, b = a.detach().cpu().float(), b.detach().cpu().float()
        weights = {wname: _merged_weight(down.weight, down, a, b)}
        fit = {"steer": {"before": _rel_mse(lm, steer, layer, None, denom),
                         "after": _rel_mse(lm, steer, layer, weights, denom)},
               "keep": None if not kept else {"before": _rel_mse(lm, kept, layer, None, denom),
                                              "after": _rel_mse(lm, kept, layer, weights, denom)},
               "edit_mean_sq_norm": denom}
    n_tok = sum(c.base.shape[0] for c in steer + kept)
    tok_step = max(c.base.shape[0] for c in steer) + (max(c.base.shape[0] for c in kept) if kept else 0)
    return CasalResult(
        model_name=lm.name, layer=layer, module=wname.rsplit(".", 1)[0], A=a, B=b, config=cfg, mode=mode,
        losses=losses, seconds=time.perf_counter() - started,
        flops=_flops(layout, layer, mode, cfg, n_tok, tok_step, d_in, d_out),
        params={"trainable": cfg.rank * (d_in + d_out), "merged_matrix": d_in * d_out, "d_in": d_in, "d_out": d_out,
                "model": sum(p.numel() for p in model.parameters())},
        fit=fit,
        edits=[{"site": iv.site.key(), "edit": type(iv.edit).__name__,
                "preserve_norm": bool(getattr(iv.edit, "preserve_norm", False))} for iv in ivs],
        data={"steer_texts": len(steer_texts), "keep_texts": len(keep_texts), "tokens": n_tok, "vectors": sources},
    )


# -- the checkpoint ----------------------------------------------------------------------------------------------
@contextmanager
def merged(model: nn.Module, result: CasalResult):
    """``model`` with ``W + B A`` in place of the down projection's weight; its own Parameter comes back on exit."""
    module = model.get_submodule(result.module)
    old = module._parameters["weight"]
    expect = tuple(_weight_delta(module, result.delta()).shape)
    if tuple(old.shape) != expect:
        raise SteerscaleError(f"{result.module}.weight has shape {tuple(old.shape)}, the CASAL update {expect}",
                              "the update was fitted on another model")
    try:
        module.weight = nn.Parameter(_merged_weight(old.detach(), module, result.A, result.B), requires_grad=False)
        yield model
    finally:
        module.weight = old


def bake_casal(lm: LoadedModel, result: CasalResult, out_dir: str | Path, *, verify: bool = True,
               overwrite: bool = False, source: str | None = None) -> dict:
    """Write ``lm`` with the CASAL update merged as a standard HF checkpoint (safetensors) plus ``casal.json``.

    Reuses ``steer.bake``'s output rules (``overwrite`` replaces only an earlier steerscale checkpoint), staging
    directory (nothing is left behind on failure) and reload check: unless ``verify=False`` the directory is loaded
    with plain transformers and its logits compared with the in-memory merged model's. ``lm.model`` is not
    modified. Returns the report written to ``steerscale.json``."""
    out_dir = Path(out_dir)
    model = lm.model
    check_target(out_dir, overwrite)
    probe = make_probe(model, lambda: merged(model, result))
    with eval_mode(model), merged(model, result):
        with staging(out_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            if lm.tokenizer is not None and hasattr(lm.tokenizer, "save_pretrained"):
                lm.tokenizer.save_pretrained(tmp)
            report = {"format": FORMAT, "library_version": __version__,
                      "source_model": source or lm.name or getattr(model.config, "_name_or_path", ""),
                      "architecture": lm.layout.architecture, "saved_as": lm.layout.architecture,
                      "layer": result.layer, "weight": f"{result.module}.weight", "rank": result.config.rank,
                      "record": RECORD_FILE,
                      "check": {"probe_tokens": int(probe.ids.shape[1]), "edit_effect": probe.effect,
                                "tolerance": probe.tol}}
            if verify:
                report["check"]["reload_max_abs_diff"] = verify_reload(tmp, probe)
            (tmp / RECORD_FILE).write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
            publish(tmp, out_dir)
    report["out_dir"] = str(out_dir)
    return report


__all__ = ["CasalConfig", "CasalResult", "bake_casal", "casal_texts", "fit_casal", "merged"]
