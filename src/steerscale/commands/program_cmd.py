"""``steerscale program show|run|search|handbook|concepts|router``: inference programs (composed pipelines), their
search, and the memory files their stages read."""

from __future__ import annotations

import json
from pathlib import Path

from .common import add_backend_args, add_model_args, emit_json, load, remote_backend

EPILOG = """\
examples:
  steerscale program show                                  # stages, prompt presets and ready-made programs
  steerscale program show generate_rank_fuse               # one program as JSON (a name, a .json/.yaml file)
  steerscale program run generate_rank_fuse -p "What is 17 + 25?" --budget tokens=1500
  steerscale program run my_program.json -p "What is 17 + 25?" --with judge=gemma3-270m   # a stage's "model"
  steerscale program run my_program.json -p "..." --steer-with formal=formal.safetensors:4  # a steered stage
  steerscale program concepts --task gsm8k --limit 32 --data-seed 1 -o concepts.json        # ArcMemo concepts
  steerscale program run '{"stages": [{"type": "concepts", "path": "concepts.json", "update": true},
      {"type": "generate", "strategy": "greedy"}]}' -p "..."                     # selected, and learned as it goes
  steerscale program run '{"stages": [{"type": "teach", "model": "teacher"}, {"type": "generate",
      "strategy": "greedy"}]}' -p "..." --with teacher=gemma3-270m              # a teacher explains when it helps
  steerscale program run '{"stages": [{"type": "unit_tests"}, {"type": "generate"}, {"type": "run_tests",
      "top_k": 1}], "select": "best"}' -p "What is 17 + 25?"                     # Archon's unit-test stages
  steerscale program search --task arc_easy --dev 16 --test 40 --trials 12 --budget tokens=400 --total tokens=100000
  steerscale program search --task arc_easy --trials 12 --sampler random -o out/random_search   # the baseline
  steerscale solve -p "What is 17 + 25?" --strategy program --knob program=out/program_search/best.json
  steerscale program handbook --task arc_easy --limit 32 --data-seed 1 -o handbook.json   # metacognitive reuse
  steerscale program run '{"stages": [{"type": "handbook", "path": "handbook.json"}, {"type": "generate"}]}' -p "..."
  steerscale program router --task arc_easy --limit 32 --data-seed 1 --prompts none,cot,direct -o router.json
  steerscale program run '{"stages": [{"type": "route", "path": "router.json"}, {"type": "generate"}]}' -p "..."
  steerscale eval --task gsm8k --limit 20 --strategy program --budget tokens=2000   # the default program

A program is JSON (or YAML): {"stages": [{"type": "prompt", "preset": "cot"},
  {"type": "generate", "strategy": "majority", "knobs": {"n": 4}}, {"type": "rank", "verifier": "self_eval",
  "top_k": 2}, {"type": "fuse"}], "select": "first"}. See docs/programs.md.
"""


def register(sub) -> None:
    p = sub.add_parser("program", epilog=EPILOG,
                       description="Inference programs: pipelines of prompt and candidate stages (generate, critique, "
                                   "rank, filter, vote, fuse, unit tests; a behaviour handbook, a concept memory, a "
                                   "prompt router, a teacher) configured as data, run within one budget; and an "
                                   "optuna search over them (Archon-style).")
    verbs = p.add_subparsers(dest="program_verb", metavar="{show,run,search,handbook,concepts,router}", required=True)

    show = verbs.add_parser("show", help="list stages, presets and programs, or print one program checked",
                            epilog=EPILOG, formatter_class=p.formatter_class)
    show.add_argument("program", nargs="?", default=None, help="a program name, a .json/.yaml file or inline JSON")
    show.set_defaults(func=run_show)

    run = verbs.add_parser("run", help="run a program on one prompt", epilog=EPILOG, formatter_class=p.formatter_class)
    run.add_argument("program", help="a program name, a .json/.yaml file or inline JSON")
    run.add_argument("-p", "--prompt", required=True, help="the prompt text")
    run.add_argument("--budget", default="", metavar="NAME=V,...", help="limits, e.g. tokens=2000,wall=60")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--with", dest="with_models", action="append", default=[], metavar="NAME=MODEL",
                     help="a second model for stages that name it (\"model\": NAME), e.g. judge=gemma3-270m")
    run.add_argument("--steer-with", dest="steer_with", action="append", default=[], metavar="NAME=VEC[:SCALE]",
                     help="a steered copy of the run's own model for stages that name it (\"model\": NAME): the "
                          "steering vector VEC (.safetensors or .gguf) at SCALE (default 1); repeat a NAME to add "
                          "vectors, e.g. --steer-with formal=formal.safetensors:4")
    run.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    run.add_argument("--json", action="store_true", help="print a JSON object (with every candidate and the trace)")
    add_model_args(run)
    add_backend_args(run)
    run.set_defaults(func=run_run, steer=None)

    s = verbs.add_parser("search", help="search program configs on a dev split, score the best on a held-out split",
                         epilog=EPILOG, formatter_class=p.formatter_class)
    s.add_argument("--task", required=True, help="a generation or multiple-choice task (see steerscale eval "
                                                 "--list-tasks), e.g. arc_easy, gsm8k, gym:basic_arithmetic")
    s.add_argument("--dev", type=int, default=16, help="development problems the search scores on (default 16)")
    s.add_argument("--test", type=int, default=32, help="held-out problems the best program is scored on")
    s.add_argument("--data-seed", type=int, default=0, help="which problems are drawn (dev and test are disjoint)")
    s.add_argument("--trials", type=int, default=12, help="trials (a resumed study's finished ones count)")
    s.add_argument("--sampler", default="tpe", choices=["tpe", "random"], help="optuna TPE, or random search")
    s.add_argument("--budget", default="tokens=512", metavar="NAME=V,...",
                   help="per-problem budget, the same for every trial and for the held-out runs (default tokens=512)")
    s.add_argument("--total", default="tokens=200000", metavar="NAME=V,...",
                   help="the whole search's budget, a hard cap (default tokens=200000)")
    s.add_argument("--max-tokens", type=int, default=64, help="tokens per generated answer (default 64)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--warm-start", action="store_true",
                   help="try self-consistency@4 and best-of-4 (self-evaluation) first, as points of the space")
    s.add_argument("-o", "--out", default="out/program_search",
                   help="writes best.json, trials.jsonl, search.png, summary.json and study.db (resumable) here")
    s.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    add_model_args(s)
    s.set_defaults(func=run_search)
    h = _build_parser(verbs, p, "handbook", "build a behaviour handbook from the model's own solved problems",
                      "the task whose problems the model solves (e.g. arc_easy, gsm8k)", "problems to solve",
                      "tokens per solution", "the handbook JSON file to write")
    h.set_defaults(func=run_handbook)
    c = _build_parser(verbs, p, "concepts", "build an ArcMemo concept memory from the model's own solved problems",
                      "the task whose problems the model solves (e.g. arc_easy, gsm8k)", "problems to solve",
                      "tokens per solution", "the concept memory JSON file to write (an empty one when none is "
                      "learned: a run with \"update\": true fills it)")
    c.set_defaults(func=run_concepts)
    r = _build_parser(verbs, p, "router", "build a prompt router: which prompt of a pool worked on which dev question",
                      "the task whose development problems train the router", "development problems",
                      "tokens per answer", "the router JSON file to write")
    r.add_argument("--prompts", default="none,cot,direct", metavar="P1,P2,...",
                   help="the pool: 'none' and prompt presets (steerscale program show lists them); default "
                        "none,cot,direct")
    r.set_defaults(func=run_router)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _build_parser(verbs, parent, name: str, what: str, task_help: str, limit_help: str, tokens_help: str,
                  out_help: str):
    """A verb that builds a memory file from a task's problems (handbook, concepts, router)."""
    b = verbs.add_parser(name, help=what, epilog=EPILOG, formatter_class=parent.formatter_class)
    b.add_argument("--task", required=True, help=task_help)
    b.add_argument("--limit", type=int, default=32, help=f"{limit_help} (default 32)")
    b.add_argument("--data-seed", type=int, default=0,
                   help="which problems are drawn; use another seed (or split) than the evaluation's")
    b.add_argument("--max-tokens", type=int, default=128, help=f"{tokens_help} (default 128)")
    b.add_argument("--budget", default="", metavar="NAME=V,...", help="limits for the whole build")
    b.add_argument("-o", "--out", required=True, help=out_help)
    b.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    add_model_args(b)
    return b


# -- helpers shared with bench/programs.py --------------------------------------------------------------------
def task_problems(task, examples) -> list:
    """``Problem``s of a task's examples: the task's prompt, its answer reader and its scorer."""
    from ..scale.programs.search import Problem

    fmt = task.format_generate if task.kind == "mc" else task.format
    return [Problem(e.id, fmt(e), (lambda text, e=e: task.score(e, {"text": text}) > 0),
                    (lambda text, e=e: task.read_answer(text, e))) for e in examples]


def split_task(name: str, dev: int, test: int, seed: int):
    """(task, dev problems, test problems): ``dev + test`` examples drawn by ``seed``, split without overlap."""
    from ..errors import SteerscaleError
    from ..measure.tasks import get_task

    for flag, value in (("--dev", dev), ("--test", test)):
        if not isinstance(value, int) or value < 1:
            raise SteerscaleError(f"{flag} must be a positive integer, got {value!r}")
    task = get_task(name)
    examples = task.load(limit=dev + test, seed=seed)
    return task, task_problems(task, examples[:dev]), task_problems(task, examples[dev:])


def _backend(args, lm=None):
    from ..scale.local import LocalBackend

    if getattr(args, "backend_url", None):
        return remote_backend(args)
    lm = lm or load(args)
    return LocalBackend(lm.model, lm.tokenizer, lm.layout, chat=False if args.no_chat else None)


# -- verbs ----------------------------------------------------------------------------------------------------
def run_show(args) -> int:
    from ..scale.programs import PROGRAMS, PROMPT_PRESETS, STAGES, load_program

    if args.program is not None:
        emit_json(load_program(args.program).to_dict())
        return 0
    print("stages:")
    for name in STAGES:
        print(f"  {name:10s} {STAGES.description(name)}")
    print("prompt presets ({\"type\": \"prompt\", \"preset\": NAME}):")
    for name in PROMPT_PRESETS:
        print(f"  {name:10s} {PROMPT_PRESETS[name][0]}")
    print("programs:")
    for name in PROGRAMS:
        print(f"  {name:20s} {PROGRAMS.description(name)}")
    return 0


def _named_specs(items, flag: str, example: str) -> dict[str, list[str]]:
    """``NAME=VALUE`` flags, checked, as ``{name: [values]}`` (before any model loads)."""
    from ..errors import SteerscaleError

    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise SteerscaleError(f"bad {flag} {item!r}", f"write NAME=VALUE, e.g. {flag} {example}")
        out.setdefault(name.strip(), []).append(value.strip())
    return out


def _models(args, lm=None) -> dict:
    """The named backends of ``--with`` (other models) and ``--steer-with`` (steered copies of the run's own)."""
    from ..models.loading import load_model
    from ..scale.local import LocalBackend
    from ..steer.vector import load_steering

    chat = False if args.no_chat else None
    out = {}
    for name, models in _named_specs(args.with_models, "--with", "judge=gemma3-270m").items():
        other = load_model(models[-1], device=args.device, dtype=args.dtype)
        out[name] = LocalBackend(other.model, other.tokenizer, other.layout, chat=chat)
    for name, vectors in _named_specs(args.steer_with, "--steer-with", "formal=formal.safetensors:4").items():
        out[name] = LocalBackend(lm.model, lm.tokenizer, lm.layout, steering=load_steering(vectors, lm.layout),
                                 chat=chat)
    return out


def run_run(args) -> int:
    from ..errors import SteerscaleError
    from ..scale.budget import Budget
    from ..scale.programs import load_program
    from ..steer.vector import parse_steer_arg

    program = load_program(args.program)  # checked before any model loads
    budget = Budget.parse(args.budget)
    given = _named_specs(args.with_models, "--with", "judge=gemma3-270m")
    steered = _named_specs(args.steer_with, "--steer-with", "formal=formal.safetensors:4")
    both = sorted(set(given) & set(steered))
    if both:
        raise SteerscaleError(f"{', '.join(map(repr, both))} named by both --with and --steer-with",
                              "give each stage model one way")
    for vectors in steered.values():
        for spec in vectors:
            path = parse_steer_arg(spec)[0]
            if not Path(path).expanduser().is_file():
                raise SteerscaleError(f"--steer-with: steering vector file {path!r} does not exist")
    if steered and getattr(args, "backend_url", None):
        raise SteerscaleError("--steer-with steers the local model", "drop --backend-url, or run the stage's model "
                              "on a server that steers it")
    missing = sorted(set(program.model_names()) - set(given) - set(steered))
    if missing:
        raise SteerscaleError(f"the program's stages name model(s) {', '.join(map(repr, missing))}",
                              f"give each with --with NAME=MODEL (another model) or --steer-with NAME=VEC[:SCALE] "
                              f"(this model, steered), e.g. --with {missing[0]}=gemma3-270m")
    lm = None if getattr(args, "backend_url", None) else load(args)
    backend = _backend(args, lm)
    models = _models(args, lm)
    result = program.run(args.prompt, backend, budget, seed=args.seed, models=models)
    if args.json:
        emit_json({"program": program.to_dict(), "prompt": args.prompt, **result.to_dict()})
        return 0
    print(result.best.text if result.best else "")
    spent = result.budget["spent"]
    print(f"\n[program] answer={result.answer} candidates={len(result.candidates)} "
          f"generated_tokens={spent['generated_tokens']} prompt_tokens={spent['prompt_tokens']}"
          + (" (budget exhausted)" if result.budget["exhausted"] else ""))
    for step in result.info["trace"]:
        print(f"  stage {step['stage']} {step['type']:9s} -> {step['candidates']} candidates, "
              f"{step['generated_tokens']} generated tokens so far")
    return 0


def run_search(args) -> int:
    from ..errors import SteerscaleError
    from ..measure.stats import wilson_ci
    from ..scale.budget import Budget
    from ..scale.programs import load_program
    from ..scale.programs.search import SINGLE_STRATEGY_PARAMS, evaluate, plot_trials, save_json, search
    from ..scale.spec import StrategySpec

    per_problem, total = Budget.parse(args.budget).limits, Budget.parse(args.total).limits
    task, dev, test = split_task(args.task, args.dev, args.test, args.data_seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = _backend(args)
    result = search(dev, backend, per_problem=per_problem, total=total, trials=args.trials, sampler=args.sampler,
                    seed=args.seed, max_tokens=args.max_tokens, storage=f"sqlite:///{(out / 'study.db').resolve()}",
                    study_name=f"{args.task}-{args.sampler}",
                    start_from=SINGLE_STRATEGY_PARAMS if args.warm_start else ())
    if result.best is None:
        errors = sorted({t.error for t in result.trials if t.error})
        raise SteerscaleError("no trial finished: " + ("; ".join(errors) if errors else "no trial ran"),
                              "raise --total (or --budget), or fix what the trials report")
    best = load_program(result.best)
    save_json(best.to_dict(), out / "best.json")
    with open(out / "trials.jsonl", "w", encoding="utf-8") as f:
        for t in result.trials:
            f.write(json.dumps(t.to_dict(), default=str) + "\n")
    plot_trials([result], out / "search.png", title=f"{args.task}: program search ({args.sampler})")
    held = evaluate(StrategySpec.of("program", program=best.to_json()), test, backend, per_problem, seed=args.seed)
    acc = wilson_ci(int(sum(o.correct for o in held)), len(held))
    summary = {"task": args.task, "sampler": args.sampler, "dev": len(dev), "test": len(test),
               "trials": len(result.trials), "best_dev_acc": result.best_dev_acc, "test_acc": acc.mean,
               "test_acc_ci": [acc.lo, acc.hi],
               "test_tokens_per_problem": sum(o.generated_tokens for o in held) / len(held),
               "search_spent": result.spent, "best": best.to_dict()}
    save_json(summary, out / "summary.json")
    print(json.dumps(best.to_dict()))
    print(f"best program: dev acc {result.best_dev_acc:.3f} over {len(dev)}; held-out acc {acc.mean:.3f} "
          f"[{acc.lo:.3f}, {acc.hi:.3f}] over {len(test)}; files in {out}/")
    return 0


def _build_from_task(args, desc: str, build, check=None):
    """Load the task's problems, then the model, and run ``build(problems, backend, budget, bar)`` with a bar."""
    from tqdm.auto import tqdm

    from ..measure.tasks import get_task
    from ..scale.budget import Budget

    budget = Budget.parse(args.budget)
    task = get_task(args.task)
    problems = task_problems(task, task.load(limit=args.limit, seed=args.data_seed))
    if check is not None:
        check()  # before the model loads
    backend = _backend(args)
    with tqdm(total=len(problems), desc=desc, unit="problem") as bar:
        return build(problems, backend, budget, bar), len(problems)


def _run_memory_build(args, desc: str, noun: str, build, entries, line) -> int:
    """Build a memory file (handbook or concepts) from the task's problems, save it and list what it holds."""
    memory, n = _build_from_task(args, desc, lambda problems, backend, budget, bar: build(
        problems, backend, budget, max_tokens=args.max_tokens, model=args.model, progress=bar))
    memory.save(args.out)
    for entry in entries(memory):
        print(f"- {line(entry)}")
    print(f"{len(entries(memory))} {noun} from {n} problems -> {args.out}")
    return 0


def run_handbook(args) -> int:
    from ..scale.programs import build_handbook

    return _run_memory_build(args, "handbook", "behaviours", build_handbook, lambda book: book.behaviours,
                             lambda b: f"{b.name}: {b.instruction}")


def run_concepts(args) -> int:
    from ..scale.programs import build_concepts

    return _run_memory_build(args, "concepts", "concepts", build_concepts, lambda memory: memory.concepts,
                             lambda c: c.line())


def run_router(args) -> int:
    from ..scale.programs import build_router
    from ..scale.programs.memory import check_pool

    prompts = [x.strip() for x in args.prompts.split(",") if x.strip()]
    router, _ = _build_from_task(args, "router", lambda problems, backend, budget, bar: build_router(
        problems, backend, prompts, budget, max_tokens=args.max_tokens, model=args.model, progress=bar),
        check=lambda: check_pool(prompts))
    router.save(args.out)
    for name, acc in router.overall().items():
        print(f"  {name:10s} dev accuracy {acc:.3f}")
    print(f"router over {len(router.examples)} problems -> {args.out}")
    return 0
