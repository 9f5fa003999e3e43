"""``steerscale navigator``: train an RL-of-Thoughts reasoning navigator on a task's development split, or show one
(docs/reasoning.md, "Reasoning navigator")."""

from __future__ import annotations

from .common import add_model_args, emit_json, load

EPILOG = """\
examples:
  steerscale navigator train --task gym:basic_arithmetic --problems 8 --epochs 100 -o navigator.safetensors
  steerscale navigator train --task gym:chain_sum --blocks reason,refine,stop --features self_eval+hidden \\
      -o nav.safetensors
  steerscale navigator show navigator.safetensors
  steerscale solve -p "Calculate 5 + 6." --strategy navigator --knob navigator=navigator.safetensors
  steerscale solve -p "Calculate 5 + 6." --strategy navigator --knob sequence=decompose,reason   # a fixed sequence

Blocks: reason (one more step), decompose (a plan of sub-questions), debate (two proposals, the self-evaluation's
preferred one kept), refine (check and rewrite), stop (finish; one short answer call when no 'Answer:' yet). The
development split is --problems problems generated (or drawn) with --split-seed; test on another seed.
"""


def register(sub) -> None:
    p = sub.add_parser("navigator", epilog=EPILOG,
                       description="RL of Thoughts: train a small policy (REINFORCE) that picks which reasoning block "
                                   "the model runs next from its self-evaluation (and optionally its hidden state), "
                                   "and save it as a .safetensors artifact for the 'navigator' strategy.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = actions.add_parser("train", help="train a navigator on a task's development split", epilog=EPILOG)
    add_model_args(t)
    t.add_argument("--task", required=True, help="a steerscale task, e.g. gym:basic_arithmetic or gsm8k")
    t.add_argument("--problems", type=int, default=8, help="development problems (default 8)")
    t.add_argument("--split-seed", type=int, default=1000, help="seed that draws/generates the split (default 1000)")
    t.add_argument("--blocks", default=None, metavar="B1,B2,...",
                   help="blocks the navigator may choose (default all: reason,decompose,debate,refine,stop)")
    t.add_argument("--max-blocks", type=int, default=None, help="blocks before stop is forced (default 2)")
    t.add_argument("--block-tokens", type=int, default=None, help="max tokens per block (default 48)")
    t.add_argument("--features", default=None, choices=("self_eval", "self_eval+hidden"),
                   help="state features (default self_eval: text and self-evaluation only, runs on any backend)")
    t.add_argument("--epochs", type=int, default=None, help="REINFORCE epochs (default 30)")
    t.add_argument("--episodes", type=int, default=None, help="episodes per problem per epoch (default 4)")
    t.add_argument("--token-cost", type=float, default=None, help="reward cost per 100 generated tokens (default 0)")
    t.add_argument("--train", default=None, metavar="K=V,...",
                   help="other settings: temperature, layer, hidden_dims, n_hidden, explore, lr, entropy, seed, "
                        "max_seconds")
    t.add_argument("-o", "--output", required=True, help="the navigator file to write (.safetensors)")
    t.add_argument("--json", action="store_true", help="print the training record as JSON")
    t.set_defaults(func=run_train)
    s = actions.add_parser("show", help="print a navigator's settings and training record")
    s.add_argument("path")
    s.set_defaults(func=run_show)


def _settings(args) -> dict:
    from ..errors import SteerscaleError
    from ..scale.navigator import TrainConfig, parse_blocks
    from ..scale.verifiers import parse_value

    settings = {}
    for item in (args.train or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SteerscaleError(f"bad --train item {item!r}", "write K=V,..., e.g. --train lr=0.05,explore=2")
        settings[key.strip()] = parse_value(value.strip())
    for flag, key in (("blocks", "blocks"), ("max_blocks", "max_blocks"), ("block_tokens", "block_tokens"),
                      ("features", "features"), ("epochs", "epochs"), ("episodes", "episodes"),
                      ("token_cost", "token_cost")):
        if getattr(args, flag) is not None:
            settings[key] = getattr(args, flag)
    if "blocks" in settings:
        settings["blocks"] = parse_blocks(settings["blocks"])
    unknown = sorted(set(settings) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise SteerscaleError(f"unknown navigator setting(s) {', '.join(unknown)}",
                              f"settings: {', '.join(TrainConfig.__dataclass_fields__)}")
    TrainConfig(**settings)  # every value checked before the model loads
    return settings


def run_train(args) -> int:
    import sys

    from ..errors import SteerscaleError
    from ..measure.tasks import get_task
    from ..scale.local import LocalBackend
    from ..scale.navigator import NavProblem, train_navigator

    settings = _settings(args)
    if not str(args.output).endswith(".safetensors"):
        raise SteerscaleError(f"the navigator is written as a .safetensors file, got {args.output!r}",
                              "e.g. -o navigator.safetensors")
    if args.problems < 1:
        raise SteerscaleError(f"--problems must be at least 1, got {args.problems}")
    task = get_task(args.task)
    if not hasattr(task, "check"):
        raise SteerscaleError(f"task {args.task!r} is not a generation task with a checker",
                              "use a generated task (gym:NAME) or a generative benchmark such as gsm8k")
    examples = task.load(args.problems, seed=args.split_seed)
    problems = [NavProblem(ex.id, task.format(ex), (lambda text, ex=ex: float(task.check(ex, text)["acc"] >= 1.0)))
                for ex in examples]
    model, tok, layout = load(args)
    backend = LocalBackend(model, tok, layout)

    def progress(row):
        if not args.json:
            print(f"epoch {row['epoch']}: mean reward {row['mean_reward']:.3f}, entropy {row['entropy']:.2f}, "
                  f"{row['nodes']} tree nodes, {row['seconds']:.0f} s", file=sys.stderr, flush=True)

    nav, tree = train_navigator(problems, backend, progress=progress, **settings,
                                info={"model": args.model, "task": args.task, "split_seed": args.split_seed})
    path = nav.save(args.output)
    if args.json:
        emit_json({"path": str(path), **nav.info})
        return 0
    hist = nav.info["history"]
    print(f"trained on {len(problems)} problems of {args.task}: {nav.info['epochs_run']} epochs, "
          f"{len(tree.nodes)} block-tree nodes, {nav.info['spent']['generated_tokens']} generated tokens, "
          f"{nav.info['seconds']:.0f} s"
          + (f"; mean reward {hist[0]['mean_reward']:.3f} -> {hist[-1]['mean_reward']:.3f}" if hist else ""))
    print(f"wrote {path}")
    print(f'use it with: steerscale solve -p "..." --strategy navigator --knob navigator={path}')
    return 0


def run_show(args) -> int:
    from ..scale.navigator import Navigator

    nav = Navigator.load(args.path)
    emit_json({"path": args.path, "blocks": list(nav.blocks), "max_blocks": nav.max_blocks,
               "block_tokens": nav.block_tokens, "temperature": nav.temperature, "features": nav.features,
               "layer": nav.layer, "inputs": nav.n_in, **{k: v for k, v in nav.info.items() if k != "history"}})
    return 0
