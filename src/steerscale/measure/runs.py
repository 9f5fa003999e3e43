"""Evaluation runs: one call evaluates a model on a task under steering (and, later, a scaling strategy).

Layout of a run directory ``OUT/<task>-<hash12>/``::

    config.json      the full config; its hash names the directory (same config -> same directory -> cached)
    examples.jsonl   one record per (example, seed): inputs, output, metrics, score, status, tokens, seconds
    summary.json     mean score with a 95% bootstrap interval, per-metric means, failures, cost, throughput

Resumable: records are appended and flushed chunk by chunk; a rerun skips (example, seed) keys already
recorded and drops a half-written last line, so nothing is lost or counted twice. A scorer that raises on one
example yields a ``"status": "failed"`` record with the error; the run continues.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..version import __version__
from ..engine.generation import generate
from ..engine.logit_contrast import LogitContrast
from ..engine.runtime import Intervention
from ..engine.scope import TokenScope
from ..errors import SteerscaleError
from ..models.cache import file_digest
from ..scale.backend import derive_seed
from .mc import score_choices, score_choices_remote
from .stats import bootstrap_ci
from .tasks import Example, Task, get_task

SCHEMA = "steerscale.eval/1"


# -- config and hashing ---------------------------------------------------------------------------------------
class ScoringMode(StrEnum):
    """How a task's outputs are scored: ``auto`` picks log-likelihood for multiple choice, else generation."""

    AUTO = "auto"
    LOGLIK = "loglik"
    GENERATE = "generate"


def describe_intervention(iv: Intervention) -> dict:
    """A hashable description of an intervention: site, edit type, scope and a digest of the edit's tensors."""
    h = hashlib.sha256()
    params = {}
    for k, v in sorted(vars(iv.edit).items()):
        if isinstance(v, torch.Tensor):
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        elif isinstance(v, (int, float, str, bool)) or v is None:
            params[k] = v
        else:
            params[k] = repr(v)
    return {"site": iv.site.key(), "edit": type(iv.edit).__name__, "params": params, "tensors": h.hexdigest()[:16],
            "scope": repr(iv.scope), "rows": iv.rows}


def describe_steer(spec) -> dict:
    """``path[:scale]`` -> path, file digest and scale; a ``(vector, scale)`` pair -> its interventions."""
    from ..steer.vector import parse_steer_arg

    if isinstance(spec, str):
        path, scale = parse_steer_arg(spec)
        return {"path": str(path), "sha": file_digest(path)[:16] if Path(path).is_file() else None, "scale": scale}
    vector, scale = spec
    return {"vector": [describe_intervention(iv) for iv in vector.interventions(1.0)], "scale": scale}


def config_hash(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# -- records --------------------------------------------------------------------------------------------------
def read_records(path: Path) -> list[dict]:
    """Complete records of an ``examples.jsonl``; a torn last line (interrupted write) is dropped and the file
    truncated to its last complete record so later appends stay valid."""
    if not path.is_file():
        return []
    records, good_bytes = [], 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("torn line")
                records.append(json.loads(raw))
                good_bytes += len(raw)
            except ValueError:
                break
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return records


def _append(path: Path, records: Sequence[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


# -- strategies -----------------------------------------------------------------------------------------------
def resolve_strategy(strategy, budget: str | None = None, mode: str | None = None, remote: bool = False, *,
                     n: int | None = None, verifier: str | None = None, **knobs):
    """The run's ``StrategySpec`` (None without a strategy), checked before any model work: ``strategy`` is a
    registered name (with ``budget``, ``n``, ``verifier`` and sampling ``knobs``) or a ready ``StrategySpec``.

    A strategy replaces plain generation for each example (``mode == "generate"``); log-likelihood scoring has no
    use for one, so that combination is refused rather than silently ignored. A remote backend answers through a
    strategy, or scores multiple choice by log-likelihood (``mode == "loglik"``); plain generation runs on the local
    model."""
    from ..scale.spec import StrategySpec

    if strategy is None:
        if remote and mode != ScoringMode.LOGLIK:
            raise SteerscaleError("a remote backend (--backend-url / backend=) answers through a scaling strategy "
                                  "(or scores multiple choice by log-likelihood); plain generation runs on the local "
                                  "model", "add --strategy greedy (plain greedy decoding on the server), or drop the "
                                  "backend")
        if budget is not None:
            raise SteerscaleError("--budget needs --strategy", "pass --strategy NAME --budget B, or drop --budget")
        return None
    if isinstance(strategy, StrategySpec):
        spec = strategy
    else:
        extra = {k: v for k, v in knobs.items() if v is not None}
        spec = StrategySpec.of(strategy, budget=budget, verifier=verifier, **({"n": n} if n is not None else {}),
                               **extra)
    if mode == ScoringMode.LOGLIK:
        raise SteerscaleError(f"--strategy {spec.name} needs generated answers, but this run scores by "
                              "log-likelihood", "add --mode generate")
    return spec


def describe_backend(backend) -> dict:
    """What generated a strategy run's answers, for its config (the cache key) and its report. A server is named by
    URL and model plus what the client adds (chat template, extra request fields), so a remote run never reuses a
    local run's records, nor one server's those of another; the default ``None`` is the local model."""
    from ..scale.remote import OpenAIBackend

    if backend is None:
        return {"type": "local"}
    out = {"type": backend.name}
    if isinstance(backend, OpenAIBackend):
        tok = backend.tokenizer
        out.update(url=backend.base_url, model=backend.model, templated=backend.templated,
                   tokenizer=None if tok is None else getattr(tok, "name_or_path", None) or type(tok).__name__,
                   extra_body=backend.extra_body)
    else:  # another in-process backend (e.g. a LocalBackend built by the caller): its model and steering
        out["model"] = type(getattr(backend, "model", None)).__name__
        steering = getattr(backend, "steering", None) or []
        out["steering"] = [describe_intervention(iv) for iv in steering if isinstance(iv, Intervention)]
        out["chat"] = getattr(backend, "chat", None)
    return out


def backend_label(desc: dict) -> str:
    """One line for reports: ``local``, ``openai MODEL @ URL`` or a caller's backend and its model class."""
    if desc.get("url"):
        return f"{desc['type']} {desc['model']} @ {desc['url']}"
    return " ".join(str(x) for x in (desc["type"], desc.get("model")) if x)


def check_backend(backend, lm, steer: Sequence, interventions: Sequence, cost: bool | None) -> None:
    """A caller's ``backend=`` generates a strategy's answers instead of ``lm``; what only a local model can do
    (steering it, measuring steering cost) is refused with what to do instead; ``resolve_strategy`` refuses plain
    generation and scoring."""
    from ..scale.backend import Backend

    if backend is None:
        if lm is None:
            raise SteerscaleError("evaluate() needs a model", "pass lm=load_model(...), or backend=... with a strategy")
        return
    if not isinstance(backend, Backend):
        raise SteerscaleError(f"backend= must be a steerscale.scale Backend, got {type(backend).__name__}",
                              "pass e.g. OpenAIBackend(URL, MODEL) or LocalBackend(model, tokenizer, layout)")
    if steer or interventions:
        raise SteerscaleError("steer=/interventions= load vectors into the local model, not into backend=",
                              "steer on the server (steerscale serve --vector NAME=PATH, OpenAIBackend("
                              "extra_body={'steer': [...]})), or build a LocalBackend with steering=...")
    if cost:
        raise SteerscaleError("cost=True measures KL and perplexity on the local model, which backend= replaces",
                              "drop cost=True (it is measured for local steering runs)")


def check_remote_scoring(backend, config: "RunConfig") -> None:
    """Log-likelihood scoring through ``backend`` (no strategy): it must be able to score (``loglikelihood``: an
    ``OpenAIBackend``), and the prompt formatting the run asks for must be the backend's."""
    if not callable(getattr(backend, "loglikelihood", None)):
        raise SteerscaleError(f"log-likelihood scoring through backend= needs a server backend (OpenAIBackend); "
                              f"{type(backend).__name__} has no loglikelihood()",
                              "pass the model as evaluate(lm, ...) to score it locally, or add a strategy")
    templated = bool(getattr(backend, "templated", False))
    if config.chat is not None and bool(config.chat) != templated:
        raise SteerscaleError(f"chat={config.chat} asks for {'a' if config.chat else 'no'} chat template, but the "
                              f"backend formats prompts {'with' if templated else 'without'} one",
                              "build the OpenAIBackend with the same chat= (or pass its tokenizer=), or leave chat "
                              "unset")


def _run_strategy_chunk(backend, task: Task, examples: list[Example], seed: int, spec):
    """One strategy run per example on ``backend`` (local or remote), each with a fresh budget from the spec.
    Prompts are formatted and answers checked here, so only generation and verifier calls go to the backend; the
    strategy reads each candidate's answer with the task's own reader, so its vote and the score agree."""
    fmt = task.format_generate if task.kind == "mc" else task.format
    prompts, outs, tokens = [], [], []
    for e in examples:
        prompt = fmt(e)
        # one random stream per example: see derive_seed
        result = spec.with_knobs(seed=derive_seed(seed, e.id)).run(
            prompt, backend, answer_fn=lambda text, e=e: task.read_answer(text, e))
        spent = result.budget["spent"]
        prompts.append(prompt)
        outs.append({"text": result.best.text if result.best else "", "strategy_answer": result.answer,
                     "n_candidates": len(result.candidates), "failures": result.failures[:5]})
        tokens.append({"prompt": int(spent["prompt_tokens"]), "generated": int(spent["generated_tokens"]),
                       "flops": spent["flops"], "budget_exhausted": result.budget["exhausted"]})
    return prompts, outs, tokens


# -- the run --------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    dir: Path
    summary: dict
    records: list[dict]


def _lm_parts(lm):
    model, tokenizer, layout = lm
    return model, tokenizer, layout, getattr(lm, "name", type(model).__name__)


def scoring_mode(task: Task, mode: str) -> ScoringMode:
    """``auto`` resolves to log-likelihood for multiple choice and generation otherwise."""
    try:
        mode = ScoringMode(mode)
    except ValueError:
        raise SteerscaleError(f"unknown scoring mode {mode!r}", "use auto, loglik or generate") from None
    if mode is ScoringMode.AUTO:
        return ScoringMode.LOGLIK if task.kind == "mc" else ScoringMode.GENERATE
    if mode is ScoringMode.LOGLIK and task.kind != "mc":
        raise SteerscaleError(f"task {task.name!r} is a generation task; log-likelihood scoring needs choices",
                              "use --mode generate (or auto)")
    return mode


def _score_one(task: Task, ex: Example, output: dict) -> dict:
    try:
        m = task.metrics(ex, output)
        return {"metrics": m, "score": float(m[task.primary]), "status": "ok"}
    except Exception as exc:  # one bad example must not stop a long run
        return {"metrics": {}, "score": None, "status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500]}


def _run_chunk(lm, task: Task, run: "_Run", examples: list[Example], seed: int) -> list[dict]:
    t0 = time.perf_counter()
    cfg, ivs = run.config, run.interventions
    if run.spec is not None:
        prompts, outs, tokens = _run_strategy_chunk(run.backend, task, examples, seed, run.spec)
    elif run.mode is ScoringMode.LOGLIK and run.given_backend is not None:  # scored on a server (echo log-probs)
        prompts = [task.format(e) for e in examples]
        outs = score_choices_remote(run.given_backend, prompts, [e.choices for e in examples])
        tokens = [{"prompt": o["prompt_tokens"], "scored": sum(o["n_tokens"]), "generated": 0} for o in outs]
    elif run.mode is ScoringMode.LOGLIK:
        model, tokenizer, layout, _ = _lm_parts(lm)
        outs = score_choices(model, tokenizer, [task.format(e) for e in examples], [e.choices for e in examples],
                             ivs, layout, chat=cfg.chat, max_tokens=cfg.batch_tokens, system=cfg.system,
                             logit_contrast=cfg.logit_contrast)
        prompts = [task.format(e) for e in examples]
        tokens = [{"prompt": o["prompt_tokens"], "scored": sum(o["n_tokens"]), "generated": 0} for o in outs]
    else:
        model, tokenizer, layout, _ = _lm_parts(lm)
        fmt = task.format_generate if task.kind == "mc" else task.format
        prompts = [fmt(e) for e in examples]
        gens = generate(model, tokenizer, layout, prompts, ivs, max_new_tokens=run.max_new_tokens,
                        do_sample=cfg.sample, temperature=cfg.temperature,
                        seed=derive_seed(seed, examples[0].id),  # chunks must not repeat one stream
                        chat=cfg.chat, system=cfg.system, logit_contrast=cfg.logit_contrast)
        outs = [{"text": g.text} for g in gens]
        tokens = [{"prompt": g.n_prompt_tokens, "generated": g.n_tokens} for g in gens]
    per = (time.perf_counter() - t0) / len(examples)
    records = []
    for e, p, o, tk in zip(examples, prompts, outs, tokens):
        rec = {"id": e.id, "seed": seed, "input": p, "output": o, "tokens": tk, "seconds": round(per, 4)}
        if e.choices is not None:
            rec.update(choices=e.choices, gold=e.gold)
        if e.answer is not None:
            rec["answer"] = e.answer
        rec.update(_score_one(task, e, o))
        records.append(rec)
    return records


def summarize(records: list[dict], task: Task, config: dict, extra: dict | None = None) -> dict:
    ok = [r for r in records if r["status"] == "ok"]
    failed = [r for r in records if r["status"] != "ok"]
    out = {"schema": SCHEMA, "task": task.name, "primary": task.primary, "n": len(records), "n_ok": len(ok),
           "n_failed": len(failed), "config": config, "config_hash": config_hash(config)}
    if ok:
        out["score"] = bootstrap_ci([r["score"] for r in ok]).to_dict()
        names = sorted({k for r in ok for k in r["metrics"]})
        out["metrics"] = {k: bootstrap_ci([r["metrics"][k] for r in ok if k in r["metrics"]]).to_dict() for k in names}
        seeds = sorted({r["seed"] for r in ok})
        if len(seeds) > 1:
            out["per_seed"] = {str(s): sum(r["score"] for r in ok if r["seed"] == s)
                               / max(1, sum(r["seed"] == s for r in ok)) for s in seeds}
    out["tokens"] = {k: sum(r["tokens"].get(k, 0) for r in records) for k in ("prompt", "generated", "scored")}
    out["seconds"] = round(sum(r.get("seconds", 0.0) for r in records), 3)
    if failed:
        out["failures"] = [{"id": r["id"], "error": r.get("error")} for r in failed[:20]]
    out.update(extra or {})
    return out


@dataclass(frozen=True)
class RunConfig:
    """What an evaluation computes, in one place (its hashed form names the run directory and is its cache key).

    ``steer``: ``"vec.safetensors:4"`` specs or ``(SteeringVector, scale)`` pairs, applied at token ``scope``;
    ``interventions``: extra ready-made interventions. ``seeds``: generation seeds; when scoring is
    deterministic (log-likelihood or greedy decoding) only the first seed is run, since more repeat it exactly.
    ``data_seed``: None keeps the first ``limit`` examples, an int draws a seeded subset. ``cost``: measure KL and
    perplexity change on neutral texts (default: when any steering is active). ``strategy``: answer each example
    with a scaling strategy, a registered name (with ``budget`` per example, e.g. ``"tokens=2000"``, ``n`` and
    ``verifier``; ``max_new_tokens`` and ``temperature`` become its knobs) or a ready ``StrategySpec``; tokens and
    FLOPs spent are recorded per example."""

    steer: tuple = ()
    scope: str = "all"
    interventions: tuple = ()
    limit: int | None = None
    seeds: tuple[int, ...] = (0,)
    data_seed: int | None = None
    mode: ScoringMode | str = ScoringMode.AUTO
    chat: bool | None = None
    max_new_tokens: int | None = None
    sample: bool = False
    temperature: float = 0.7
    strategy: Any = None  # a strategy name or a StrategySpec
    budget: str | None = None
    n: int | None = None
    verifier: str | None = None
    cost: bool | None = None
    batch_tokens: int = 4096
    system: str | None = None  # a system prompt for every example: the prompting baseline (with or without steering)
    logit_contrast: Any = None  # early-layer logit contrast (DoLa / VISTA): a LogitContrast or its spec, "dola:high"

    def __post_init__(self):
        object.__setattr__(self, "steer", tuple(self.steer))
        object.__setattr__(self, "interventions", tuple(self.interventions))
        object.__setattr__(self, "seeds", tuple(int(x) for x in self.seeds) or (0,))
        object.__setattr__(self, "logit_contrast", LogitContrast.parse(self.logit_contrast))  # bad spec: fail now


@dataclass
class _Run:
    """A run being prepared and executed: the checked config and what it resolved to."""

    config: RunConfig
    mode: ScoringMode
    spec: Any  # StrategySpec | None
    backend: Any  # what runs the strategy: the caller's backend, or a LocalBackend on the model
    given_backend: Any = None  # the caller's backend (None: the local model), which names the run
    interventions: list = field(default_factory=list)
    max_new_tokens: int = 128
    model_name: str = ""

    @property
    def deterministic(self) -> bool:
        return self.mode is ScoringMode.LOGLIK or (not self.config.sample and self.spec is None)

    @property
    def run_seeds(self) -> list[int]:
        return list(self.config.seeds[:1] if self.deterministic else self.config.seeds)

    def hashed(self, task: Task) -> dict:
        """The config that names the run directory: what changes the numbers, nothing else."""
        c = self.config
        strategy = self.spec is not None
        return {
            "schema": SCHEMA, "version": __version__, "model": self.model_name, "task": task.config(),
            "mode": str(self.mode), "limit": c.limit, "data_seed": c.data_seed, "seeds": self.run_seeds,
            "scope": c.scope, "chat": c.chat, "steer": [describe_steer(x) for x in c.steer],
            **({"system": c.system} if c.system is not None else {}),  # absent: earlier runs keep their hash
            **({"logit_contrast": c.logit_contrast.to_dict()} if c.logit_contrast is not None else {}),
            "interventions": [describe_intervention(iv) for iv in c.interventions],
            "max_new_tokens": self.max_new_tokens, "sample": c.sample,
            "temperature": c.temperature if c.sample or strategy else None,  # a strategy samples at it
            # runs before per-example seeds reused one random stream for every example: never a cache hit for them
            **({"seeding": "per-example"} if c.sample or strategy else {}),
            # what answers a strategy run, and where: a different backend is a different run (never a cache hit)
            **({"strategy": self.spec.to_dict(), "backend": describe_backend(self.given_backend)} if strategy else
               {"backend": describe_backend(self.given_backend)} if self.given_backend is not None else {}),
        }


def _prepare(lm, task: Task, config: RunConfig, backend) -> _Run:
    """Check the config against the task and the backend, and resolve the steering and the strategy."""
    from ..steer.vector import load_steering

    mode = scoring_mode(task, config.mode)
    max_new_tokens = config.max_new_tokens or getattr(task, "max_new_tokens", 128)
    spec = resolve_strategy(config.strategy, config.budget, mode, remote=backend is not None, n=config.n,
                            verifier=config.verifier, max_tokens=max_new_tokens, temperature=config.temperature)
    check_backend(backend, lm, config.steer, config.interventions, config.cost)
    if config.system is not None and (spec is not None or backend is not None):
        raise SteerscaleError("a system prompt applies to local scoring and generation, not to strategies or a "
                              "--backend-url run yet", "drop --system, or evaluate locally without --strategy")
    if config.logit_contrast is not None and backend is not None:
        raise SteerscaleError("logit contrast runs on the local model, not through --backend-url",
                              "evaluate locally, or send logit_contrast per request to a steerscale server")
    if backend is not None and spec is None:  # resolve_strategy let it through: log-likelihood scoring remotely
        check_remote_scoring(backend, config)
    run = _Run(config, mode, spec, backend, backend, max_new_tokens=max_new_tokens)
    if backend is None:
        model, tokenizer, layout, run.model_name = _lm_parts(lm)
        steering = load_steering(list(config.steer), layout, TokenScope.parse(config.scope)) if config.steer else []
        run.interventions = steering + list(config.interventions)
        if spec is not None:
            from ..scale.local import LocalBackend

            run.backend = LocalBackend(model, tokenizer, layout, steering=list(run.interventions), chat=config.chat,
                                       logit_contrast=config.logit_contrast)
    else:
        # a server may serve anything under its name: the report's model column names the server too
        desc = describe_backend(backend)
        run.model_name = (backend_label(desc) if "url" in desc else _lm_parts(lm)[3] if lm is not None
                          else desc["model"])
    return run


def evaluate(lm, task: str | Task, config: RunConfig | None = None, *, backend=None, outdir: str | Path = "runs",
             chunk: int = 32, progress: bool = True, resume: bool = True, **options) -> RunResult:
    """Evaluate ``lm`` (a ``LoadedModel`` or ``(model, tokenizer, layout)``) on ``task`` under ``config`` (a
    ``RunConfig``; or its fields as keywords: ``evaluate(lm, "arc_easy", limit=50, steer=["v.safetensors:4"])``).

    ``backend``: a ``Backend`` (e.g. ``OpenAIBackend`` of a server) that runs a strategy's generation and verifier
    calls instead of a ``LocalBackend`` on ``lm`` (``lm`` may then be None); without a strategy, a multiple-choice
    task is scored by log-likelihood on it (``OpenAIBackend.loglikelihood``: echoed prompt log-probs, with the
    local prompt formatting and metrics). Tasks, answer checking and caching stay local, and the backend is part
    of the run's config, so its records never mix with a local run's.
    Results go to ``outdir/<task>-<confighash>/``; a rerun of the same config resumes (``resume=False``: start
    over)."""
    if config is None:
        config = RunConfig(**options)
    elif options:
        raise SteerscaleError(f"evaluate() got both a config and {', '.join(sorted(options))}",
                              "put every setting in the RunConfig")
    task = get_task(task)
    run = _prepare(lm, task, config, backend)
    hashed = run.hashed(task)
    rundir = Path(outdir) / f"{task.name.replace(':', '_').replace('/', '_')}-{config_hash(hashed)}"
    rundir.mkdir(parents=True, exist_ok=True)
    (rundir / "config.json").write_text(json.dumps(hashed, indent=2, default=str) + "\n")
    path = rundir / "examples.jsonl"
    if not resume and path.exists():
        path.unlink()
    records = read_records(path)
    t0 = time.perf_counter()
    examples = task.load(limit=config.limit, seed=config.data_seed)
    records += _run_missing(lm, task, run, examples, records, path, chunk, progress)
    extra = {"dir": str(rundir), "deterministic": run.deterministic,
             "wall_seconds_this_call": round(time.perf_counter() - t0, 3)}
    if "backend" in hashed:
        extra["backend"] = backend_label(hashed["backend"])  # which backend produced these numbers
    if config.cost if config.cost is not None else bool(run.interventions) or config.logit_contrast is not None:
        extra["cost"] = _steering_cost(lm, run, rundir, progress)
    wanted = {(e.id, s) for s in run.run_seeds for e in examples}
    records = [r for r in records if (r["id"], r["seed"]) in wanted]
    summary = summarize(records, task, hashed, extra)
    (rundir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return RunResult(rundir, summary, records)


def _run_missing(lm, task: Task, run: _Run, examples, records, path: Path, chunk: int, progress: bool) -> list[dict]:
    """Run the (example, seed) pairs not yet recorded, chunk by chunk, appending each chunk to ``path``."""
    done = {(r["id"], r["seed"]) for r in records}
    todo = [(s, e) for s in run.run_seeds for e in examples if (e.id, s) not in done]
    new_records = []
    bar = tqdm(total=len(todo), desc=f"eval {task.name}", disable=not progress or not todo, unit="ex")
    for s in run.run_seeds:
        pending = [e for (ss, e) in todo if ss == s]
        for i in range(0, len(pending), chunk):
            new = _run_chunk(lm, task, run, pending[i : i + chunk], s)
            _append(path, new)
            new_records.extend(new)
            bar.update(len(new))
    bar.close()
    return new_records


def _steering_cost(lm, run: _Run, rundir: Path, progress: bool) -> dict:
    """KL and perplexity change of the run's steering on neutral texts (kept from an earlier call of this run)."""
    from .cost import steering_cost

    prev = rundir / "summary.json"
    old = json.loads(prev.read_text()).get("cost") if prev.is_file() else None
    model, tokenizer, layout, _ = _lm_parts(lm)
    return old or steering_cost(model, tokenizer, layout, run.interventions, progress=progress,
                                logit_contrast=run.config.logit_contrast)


def load_runs(root: str | Path) -> list[dict]:
    """Every ``summary.json`` under ``root`` (a run directory or a folder of them)."""
    root = Path(root)
    if not root.exists():
        raise SteerscaleError(f"no such directory: {root}", "pass the -o folder of `steerscale eval`")
    out = []
    for p in sorted(root.rglob("summary.json")):
        try:
            s = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if s.get("schema") == SCHEMA:
            s["dir"] = str(p.parent)
            out.append(s)
    return out


def example_scores(run_dir: str | Path) -> dict[str, float]:
    """``{id: mean score over seeds}`` of a run's successful records, for paired comparisons."""
    acc: dict[str, list[float]] = {}
    for r in read_records(Path(run_dir) / "examples.jsonl"):
        if r["status"] == "ok":
            acc.setdefault(r["id"], []).append(r["score"])
    return {k: sum(v) / len(v) for k, v in acc.items()}
