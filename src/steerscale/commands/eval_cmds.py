"""``steerscale eval`` (evaluate a model on a task, optionally steered) and ``steerscale report`` (tables, plots)."""

from __future__ import annotations

from .common import add_backend_args, add_model_args, add_steer_args, emit_json, load, remote_backend


EVAL_EPILOG = """\
examples:
  steerscale eval --list-tasks
  steerscale eval --task arc_easy --limit 20                                # -> runs/arc_easy-<hash>/summary.json
  steerscale eval --task arc_easy --limit 20 --steer formal.safetensors:1   # effect, and cost (KL on neutral text)
  steerscale eval --task arc_easy --limit 20 --system "Think carefully and answer correctly."   # prompt baseline
  steerscale eval --task arc_easy --limit 20 --logit-contrast dola:high     # DoLa: early-layer contrast scoring
  steerscale eval --task gsm8k --limit 2 --strategy majority -n 4 --budget tokens=2000 --max-new-tokens 128
  steerscale eval --task arc_easy --limit 20 --backend-url http://127.0.0.1:8000/v1  # scored on a server (echo)
  steerscale report runs                                                    # tables and plots of the runs above

formal.safetensors: steerscale extract --pairs formal_casual -o formal.safetensors
"""

REPORT_EPILOG = """\
examples:
  steerscale report runs                  # runs/report.md, report.html and PNGs from every summary.json under runs/
  steerscale report runs -o out/report
"""


def register(sub) -> None:
    p = sub.add_parser("eval", epilog=EVAL_EPILOG,
                       description="Evaluate on a task (see --list-tasks); results go to OUT/<task>-<confighash>/ "
                                   "(per-example JSONL + summary.json), resumable and cached by config hash.")
    add_model_args(p)
    p.add_argument("--task", help="task name, gym:DATASET, or a local .jsonl path")
    p.add_argument("--list-tasks", action="store_true", help="print the known task names and exit")
    p.add_argument("--limit", type=int, default=None, help="evaluate only N examples")
    p.add_argument("--data-seed", type=int, default=None,
                   help="draw the --limit subset with this seed (default: first N)")
    add_steer_args(p, conditional=False)
    p.add_argument("--seeds", type=int, default=1,
                   help="number of generation seeds (0..N-1); deterministic scoring runs one")
    p.add_argument("--mode", default="auto", choices=["auto", "loglik", "generate"],
                   help="multiple choice: log-likelihood (default; with --backend-url from the server's echoed "
                        "prompt log-probs) or generate-then-parse")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help='a system prompt for every example: the prompting baseline steering is read against, e.g. '
                        '--system "Answer truthfully." (alone, or with --steer for prompt + steering)')
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--sample", action="store_true", help="sample (temperature --temperature) instead of greedy")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--strategy", default=None,
                   help="answer each example with a scaling strategy (majority, best_of_n, particle_filter, ...; "
                        "see `steerscale solve --help`); needs generated answers (--mode generate); generates on "
                        "--backend-url when given")
    p.add_argument("--budget", default=None, metavar="NAME=V,...",
                   help="per-example budget for --strategy, e.g. tokens=2000")
    p.add_argument("-n", type=int, default=None,
                   help="samples / particles / beams for --strategy (default: the strategy's own, 8 for most)")
    p.add_argument("--verifier", default=None, help="verifier for --strategy (self_eval, logprob, arith_prm, judge)")
    p.add_argument("--cost", dest="cost", action="store_true", default=None,
                   help="measure KL / perplexity change on neutral text (default: when steering)")
    p.add_argument("--no-cost", dest="cost", action="store_false")
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per forward pass when scoring")
    p.add_argument("--fresh", action="store_true", help="discard cached records of this config and rerun")
    p.add_argument("-o", "--out", default="runs", help="output folder (default: runs)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_backend_args(p)  # --strategy, or multiple-choice log-likelihood scoring: tasks, answers and cache stay local
    p.set_defaults(func=run_eval)

    r = sub.add_parser("report", epilog=REPORT_EPILOG,
                       description="Collect every summary.json under DIR into report.md, report.html and PNGs.")
    r.add_argument("dir", help="folder written by `steerscale eval -o`")
    r.add_argument("-o", "--out", default=None, help="where to write the report (default: DIR)")
    r.set_defaults(func=run_report)


def _print_summary(s: dict) -> None:
    sc = s.get("score")
    line = f"{s['task']}: {s['primary']} = " + (f"{sc['mean']:.4f} [{sc['lo']:.4f}, {sc['hi']:.4f}]" if sc else "n/a")
    print(f"{line}  n={s['n_ok']} failed={s['n_failed']}  ({s['seconds']:.1f} s model time)")
    if s.get("backend"):
        print(f"  backend: {s['backend']}")
    for k, v in sorted(s.get("metrics", {}).items()):
        if k != s["primary"]:
            print(f"  {k:14s} {v['mean']:.4f} [{v['lo']:.4f}, {v['hi']:.4f}]")
    if s.get("cost"):
        c = s["cost"]
        print(f"  cost: KL {c['kl']['mean']:.4f} [{c['kl']['lo']:.4f}, {c['kl']['hi']:.4f}] nats/token, "
              f"perplexity x{c['ppl_ratio']:.3f} on {c['n_texts']} neutral texts")
    print(f"  -> {s['dir']}")


def run_eval(args) -> int:
    from ..errors import SteerscaleError
    from ..measure.runs import RunConfig, evaluate, resolve_strategy, scoring_mode
    from ..measure.tasks import get_task, list_tasks

    if args.list_tasks:
        print("\n".join(list_tasks()))
        return 0
    if not args.task:
        raise SteerscaleError("--task is required", "e.g. --task arc_easy (see --list-tasks)")
    if args.seeds < 1:
        raise SteerscaleError(f"--seeds must be >= 1, got {args.seeds}")
    task = get_task(args.task)  # fail on a bad task before loading the model
    config = RunConfig(steer=args.steer, scope=args.scope, limit=args.limit, seeds=range(args.seeds),
                       data_seed=args.data_seed, mode=args.mode, chat=False if args.no_chat else None,
                       max_new_tokens=args.max_new_tokens, sample=args.sample, temperature=args.temperature,
                       strategy=args.strategy, budget=args.budget, n=args.n, verifier=args.verifier, cost=args.cost,
                       batch_tokens=args.batch_tokens, system=args.system, logit_contrast=args.logit_contrast)
    # the strategy, its knobs, verifier and budget: checked now, before the model loads
    resolve_strategy(config.strategy, config.budget, scoring_mode(task, config.mode), remote=bool(args.backend_url),
                     n=config.n, verifier=config.verifier, temperature=config.temperature,
                     max_tokens=config.max_new_tokens)
    # with --backend-url the strategy generates (or the choices are scored) on the server and -m is not loaded
    lm, backend = (None, remote_backend(args)) if args.backend_url else (load(args), None)
    res = evaluate(lm, task, config, backend=backend, outdir=args.out, resume=not args.fresh)
    if args.json:
        emit_json(res.summary)
    else:
        _print_summary(res.summary)
    return 0


def run_report(args) -> int:
    from ..measure.report import render

    out = render(args.dir, args.out)
    cols = ["task", "model", "steer", "n", "metric", "score", "kl"]
    print("  ".join(f"{c:>10s}" for c in cols))
    for r in out["rows"]:
        print("  ".join(f"{str(r[c])[:28]:>10s}" for c in cols))
    print(f"wrote {out['markdown']}, {out['html']} and {len(out['plots'])} plot(s)")
    return 0
