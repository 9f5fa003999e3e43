"""``steerscale solve``: answer one prompt with an inference-time scaling strategy under a budget."""

from __future__ import annotations

from .common import (add_backend_args, add_model_args, add_steer_args, emit_json, load, remote_backend,
                     steering_from_args)


def register(sub) -> None:
    from ..scale.strategies import STRATEGIES
    from ..scale.verifiers import VERIFIERS

    p = sub.add_parser("solve", help="answer a prompt with a search/sampling strategy under a compute budget",
                       description="Run one inference-time scaling strategy (best-of-N, self-consistency, particle "
                                   "filtering, A*-decoding, ...) on a prompt, with an enforced budget.")
    add_model_args(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt text")
    p.add_argument("--strategy", default="majority", choices=sorted(STRATEGIES), help="default: majority")
    p.add_argument("--verifier", default=None, choices=sorted(VERIFIERS),
                   help="scorer for best-of-N / weighted vote / search (default: the strategy's own)")
    p.add_argument("--verifier-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="verifier option (repeatable), e.g. --verifier pairwise --verifier-opt mode=sample, "
                        "--verifier diverse --verifier-opt base=arith_prm --verifier-opt weight=0.2")
    p.add_argument("--reference", default=None,
                   help="reference answer for exact/numeric/math/mc verifiers (gym: the entry as JSON)")
    p.add_argument("--budget", default="", metavar="NAME=V,...",
                   help="limits, e.g. tokens=20000,flops=1e12,wall=60 (currencies: prompt_tokens, generated_tokens, "
                        "verifier_passes, verifier_tokens, judge_calls, flops, wall_seconds)")
    p.add_argument("-n", type=int, default=8, help="samples / beams / particles (default 8)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--step", default="\\n\\n", help="step delimiter for search strategies (default: a blank line)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--steer-scales", default=None, metavar="S1,S2,...",
                   help="one steering multiplier per sample (steering-diversified sampling; needs --steer)")
    p.add_argument("--seed", type=int, default=0)
    add_steer_args(p)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true", help="print a JSON object (with every candidate)")
    add_backend_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import SteerscaleError
    from ..scale.budget import Budget
    from ..scale.local import LocalBackend
    from ..scale.strategies import run_strategy
    from ..scale.verifiers import check_options, get_verifier, parse_value

    budget = Budget.parse(args.budget)  # bad limits fail before the model loads
    vopts = {}
    for item in args.verifier_opt:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SteerscaleError(f"bad --verifier-opt {item!r}", "write KEY=VALUE, e.g. --verifier-opt weight=0.2")
        vopts[key.strip()] = parse_value(value)
    if vopts and args.verifier is None:
        raise SteerscaleError("--verifier-opt given without --verifier", "name the verifier, e.g. --verifier pairwise")
    if args.verifier is not None:
        check_options(args.verifier, vopts)  # unknown options fail before the model loads
    step = args.step.encode().decode("unicode_escape") if args.step else None
    stops = [s.encode().decode("unicode_escape") for s in args.stop]
    scales = None
    if args.steer_scales:
        try:
            scales = [float(x) for x in args.steer_scales.split(",")]
        except ValueError:
            raise SteerscaleError(f"--steer-scales {args.steer_scales!r} is not a list of numbers", "e.g. 0,2,4,8") from None
        if len(scales) != args.n:
            raise SteerscaleError(f"--steer-scales has {len(scales)} values but -n is {args.n}", "give one per sample")
    if args.backend_url:
        backend = remote_backend(args)
    else:
        lm = load(args)
        steering = steering_from_args(args, lm.layout)
        backend = LocalBackend(lm.model, lm.tokenizer, lm.layout, steering=steering,
                               chat=False if args.no_chat else None)
    verifier = get_verifier(args.verifier, reference=args.reference, backend=backend, **vopts)
    knobs = dict(max_tokens=args.max_tokens, temperature=args.temperature, step=step, stop=stops, seed=args.seed)
    if args.strategy != "greedy":
        knobs["n"] = args.n
        if scales is not None:
            knobs["steer_scales"] = scales
    budget.restart()
    result = run_strategy(args.strategy, args.prompt, backend, verifier, budget, **knobs)
    if args.json:
        model = backend.model if args.backend_url else args.model
        emit_json({"model": model, "prompt": args.prompt, "steer": args.steer, **result.to_dict()})
    else:
        print(result.best.text if result.best else "")
        spent = result.budget["spent"]
        print(f"\n[{result.strategy}] answer={result.answer} candidates={len(result.candidates)} "
              f"generated_tokens={spent['generated_tokens']} prompt_tokens={spent['prompt_tokens']} "
              f"flops={spent['flops']:.3g} wall={spent['wall_seconds']:.1f}s"
              + (" (budget exhausted)" if result.budget["exhausted"] else ""))
        for f in result.failures[:5]:
            print(f"warning: {f}")
    return 0
