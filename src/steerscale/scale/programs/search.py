"""Architecture search over inference programs (Archon's ITAS), with optuna.

The search space (``suggest_program``) is a define-by-run function of an optuna trial that returns a program
config (data): a prompt preset (or none), the generator (greedy, self-consistency or best-of-N with a verifier;
its samples and temperature), a ranker and its ``top_k``, a vote stage, up to two fusion layers each with an
optional critic, and the final selection. Each trial's program is run on every development problem, each run
with the same per-problem budget (``per_problem``: the equal-budget comparison), and scored by accuracy.

The whole search runs under one ``total`` budget: each problem's ledger is capped by what is left of the total,
and the search stops when it is spent, so it is a hard cap too (a trial cut short is recorded as failed, never
scored on a partial split). The sampler is optuna's TPE (``"tpe"``) or, as its baseline, random search
(``"random"``). With ``storage`` (an optuna URL, e.g. ``sqlite:///out/study.db``) a study resumes where it
stopped: finished trials are kept and their spending counts against the total.

``evaluate`` runs any ``StrategySpec`` (a program is ``StrategySpec.of("program", program=...)``) on problems and
returns per-problem outcomes; the caller scores the best config on a held-out split with it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from ...errors import SteerscaleError
from ..backend import Backend, derive_seed
from ..budget import Budget
from ..spec import StrategySpec
from .program import load_program

SAMPLERS = ("tpe", "random")


@dataclass(frozen=True)
class Problem:
    """One scored prompt: ``check(text)`` says whether a final text is right, ``read_answer`` is the task's reader
    (the strategies vote with it)."""

    id: str
    prompt: str
    check: Callable[[str], bool]
    read_answer: Callable[[str], str | None] | None = None


@dataclass
class Outcome:
    id: str
    correct: float
    generated_tokens: int
    prompt_tokens: int
    answer: str | None = None
    exhausted: bool = False


class TotalSpent(SteerscaleError):
    """The search's total budget ran out before a trial's split was done."""


def _capped(per_problem: dict, total: Budget | None) -> Budget:
    """A problem's ledger: the per-problem limits, and what is left of the total for currencies only the total
    limits; ``TotalSpent`` when the total cannot pay for a whole problem."""
    limits = dict(Budget(dict(per_problem)).limits)
    if total is not None:
        for key, left in total.remaining().items():
            if key == "wall_seconds":
                continue
            # a problem always gets its whole per-problem budget (the equal-budget comparison), or no run at all
            if left <= 0 or left < limits.get(key, 0):
                raise TotalSpent(f"the total budget's {key} is spent ({left:g} left)")
            limits[key] = min(limits.get(key, left), left)
    return Budget(limits)


def evaluate(spec, problems: Sequence[Problem], backend: Backend, per_problem: dict | None = None, *, seed: int = 0,
             total: Budget | None = None, progress=None, models=None) -> list[Outcome]:
    """Run ``spec`` (a ``StrategySpec``) on each problem with a fresh ledger of ``per_problem`` limits (cut to what
    is left of ``total``, which is charged with each run's spending); one random stream per problem. ``models``:
    the backends a program's stages name (``spec`` is then a ``program`` spec)."""
    out = []
    program = None
    if models:
        if spec.name != "program":
            raise SteerscaleError(f"models= is for a program's stages, not strategy {spec.name!r}")
        program = load_program(spec.knobs["program"])
        defaults = {k: v for k, v in spec.knobs.items() if k not in ("program", "seed")}
    for p in problems:
        budget = _capped(per_problem or dict(spec.budget), total)
        if program is not None:
            result = program.run(p.prompt, backend, budget, seed=derive_seed(seed, p.id), answer_fn=p.read_answer,
                                 models=models, defaults=defaults)
        else:
            result = spec.with_knobs(seed=derive_seed(seed, p.id)).run(p.prompt, backend, budget=budget,
                                                                       answer_fn=p.read_answer)
        spent = result.budget["spent"]
        if total is not None:
            total.charge(**{k: v for k, v in spent.items() if k != "wall_seconds"})
        text = result.best.text if result.best is not None else ""
        out.append(Outcome(p.id, float(bool(p.check(text))), int(spent["generated_tokens"]),
                           int(spent["prompt_tokens"]), result.answer, bool(result.budget["exhausted"])))
        if progress is not None:
            progress.update(1)
    return out


def suggest_program(trial, max_tokens: int = 64) -> dict:
    """One program config from an optuna trial (define-by-run: a parameter exists only where it matters)."""
    from .stages import PROMPT_PRESETS

    stages: list[dict] = []
    preset = trial.suggest_categorical("prompt", ["none", *PROMPT_PRESETS])
    if preset != "none":
        stages.append({"type": "prompt", "preset": preset})
    generator = trial.suggest_categorical("generator", ["greedy", "majority", "best_of_n"])
    knobs: dict = {"max_tokens": max_tokens}
    if generator != "greedy":
        knobs["n"] = trial.suggest_categorical("n", [2, 4, 8])
        knobs["temperature"] = round(trial.suggest_float("temperature", 0.3, 1.1), 2)
    gen = {"type": "generate", "strategy": generator, "knobs": knobs}
    if generator == "best_of_n":
        gen["verifier"] = trial.suggest_categorical("bon_verifier", ["logprob", "self_eval"])
    stages.append(gen)
    if generator != "greedy":
        ranker = trial.suggest_categorical("ranker", ["none", "self_eval", "logprob"])
        if ranker != "none":
            stages.append({"type": "rank", "verifier": ranker, "top_k": trial.suggest_int("top_k", 1, 4)})
        if trial.suggest_categorical("vote_stage", [False, True]):
            stages.append({"type": "vote"})
    for layer in range(trial.suggest_int("fuse_layers", 0, 2)):
        if trial.suggest_categorical(f"critique_{layer}", [False, True]):
            stages.append({"type": "critique", "max_tokens": max(16, max_tokens // 2)})
        stages.append({"type": "fuse", "max_tokens": max_tokens})
    return {"stages": stages, "select": trial.suggest_categorical("select", ["vote", "best", "first"])}


#: single strategies as points of the search space (``search(start_from=...)``): a search warm-started with them
#: tries them first, so its best dev configuration is never worse than theirs
SINGLE_STRATEGY_PARAMS = (
    {"prompt": "none", "generator": "majority", "n": 4, "temperature": 0.7, "ranker": "none", "vote_stage": False,
     "fuse_layers": 0, "select": "vote"},
    {"prompt": "none", "generator": "best_of_n", "n": 4, "temperature": 0.7, "bon_verifier": "self_eval",
     "ranker": "none", "vote_stage": False, "fuse_layers": 0, "select": "best"},
)


@dataclass
class Trial:
    number: int
    state: str
    params: dict
    program: dict | None
    dev_acc: float | None
    tokens_per_problem: float | None
    spent: dict = field(default_factory=dict)
    error: str | None = None  # why a failed trial failed

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchResult:
    sampler: str
    best: dict | None  # the best program config (dev accuracy, then fewer tokens)
    best_dev_acc: float | None
    trials: list[Trial]
    spent: dict

    def to_dict(self) -> dict:
        return {"sampler": self.sampler, "best": self.best, "best_dev_acc": self.best_dev_acc, "spent": self.spent,
                "trials": [t.to_dict() for t in self.trials]}


def _optuna():
    try:
        import optuna
    except ImportError:
        raise SteerscaleError("the program search needs optuna", "pip install 'steerscale[search]' (optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def make_sampler(name: str, seed: int):
    optuna = _optuna()
    if name not in SAMPLERS:
        raise SteerscaleError(f"unknown sampler {name!r}", f"use one of: {', '.join(SAMPLERS)}")
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)


def _trials(study) -> list[Trial]:
    out = []
    for t in study.trials:
        a = t.user_attrs
        out.append(Trial(t.number, t.state.name.lower(), dict(t.params), a.get("program"), a.get("dev_acc"),
                         a.get("tokens_per_problem"), a.get("spent", {}), a.get("error")))
    return out


def _spent_so_far(trials: Sequence[Trial]) -> dict:
    total: dict = {}
    for t in trials:
        for k, v in (t.spent or {}).items():
            total[k] = total.get(k, 0) + v
    return total


def search(problems: Sequence[Problem], backend: Backend, *, per_problem: dict, total: dict, trials: int = 20,
           sampler: str = "tpe", seed: int = 0, max_tokens: int = 64, storage: str | None = None,
           study_name: str | None = None, space: Callable | None = None, progress: bool = True,
           start_from: Sequence[dict] = ()) -> SearchResult:
    """Search program configs on ``problems`` (the development split): at most ``trials`` trials (resumed ones
    count), each problem run within ``per_problem``, everything within ``total``. ``start_from``: parameter sets
    (e.g. ``SINGLE_STRATEGY_PARAMS``) a new study tries first. Returns every trial and the best config."""
    optuna = _optuna()
    if not problems:
        raise SteerscaleError("the search needs development problems", "give it at least one")
    if not isinstance(trials, int) or trials < 1:
        raise SteerscaleError(f"trials must be a positive integer, got {trials!r}")
    total_budget = Budget(dict(total))
    if not total_budget.limits:
        raise SteerscaleError("the search needs a total budget", "e.g. total={'tokens': 200000}")
    Budget(dict(per_problem))  # checked before any model work
    space = space or (lambda trial: suggest_program(trial, max_tokens))
    study = optuna.create_study(direction="maximize", sampler=make_sampler(sampler, seed), storage=storage,
                                study_name=study_name or f"programs-{sampler}", load_if_exists=storage is not None)
    done = _trials(study)
    if not done:
        for params in start_from:
            study.enqueue_trial(dict(params))
    total_budget.charge(**{k: v for k, v in _spent_so_far(done).items() if k != "wall_seconds"})
    todo = trials - len([t for t in done if t.state in ("complete", "fail")])
    from tqdm.auto import tqdm

    bar = tqdm(total=max(0, todo) * len(problems), desc=f"search ({sampler})", unit="run", disable=not progress)
    for _ in range(max(0, todo)):
        if total_budget.exhausted:
            break
        trial = study.ask()
        config = space(trial)
        spec = StrategySpec.of("program", program=load_program(config).to_json())
        before = dict(total_budget.spent())
        error = None
        try:
            outcomes = evaluate(spec, problems, backend, per_problem, seed=seed, total=total_budget, progress=bar)
        except SteerscaleError as exc:  # the total ran out, or this config cannot run here (e.g. too long a prompt)
            outcomes, error = None, exc
        spent = {k: v - before[k] for k, v in total_budget.spent().items() if k != "wall_seconds"}
        trial.set_user_attr("program", config)
        trial.set_user_attr("spent", spent)
        if outcomes is None:  # never scored on a part of the split
            trial.set_user_attr("error", error.problem)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if isinstance(error, TotalSpent):
                break
            continue
        acc = sum(o.correct for o in outcomes) / len(outcomes)
        trial.set_user_attr("dev_acc", acc)
        trial.set_user_attr("tokens_per_problem", sum(o.generated_tokens for o in outcomes) / len(outcomes))
        study.tell(trial, acc)
        bar.set_postfix(best=f"{study.best_value:.2f}", spent=int(total_budget.spent()["generated_tokens"]))
    bar.close()
    found = _trials(study)
    scored = [t for t in found if t.state == "complete" and t.dev_acc is not None]
    best = max(scored, key=lambda t: (t.dev_acc, -(t.tokens_per_problem or 0.0)), default=None)
    return SearchResult(sampler, best.program if best else None, best.dev_acc if best else None, found,
                        _spent_so_far(found))


def plot_trials(results: Sequence[SearchResult], path, title: str = "") -> None:
    """Dev accuracy against generated tokens per problem, one point per trial, one colour per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r, marker in zip(results, "os^v"):
        pts = [(t.tokens_per_problem, t.dev_acc) for t in r.trials if t.dev_acc is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, alpha=0.7, label=f"{r.sampler} ({len(pts)} trials)")
    ax.set_xlabel("generated tokens per problem")
    ax.set_ylabel("dev accuracy")
    ax.set_title(title or "program search: every trial")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_json(obj, path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
