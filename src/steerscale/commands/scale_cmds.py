"""``steerscale solve``: answer one prompt with an inference-time scaling strategy under a budget."""

from __future__ import annotations

from .common import (add_backend_args, add_model_args, add_steer_args, emit_json, load, remote_backend,
                     steering_from_args)


EPILOG = """\
examples:
  steerscale solve -p "Calculate 59 + 8." --strategy majority -n 4 --max-tokens 32
  steerscale solve -p "Calculate 59 + 8." --strategy particle_filter --verifier arith_prm --step '\\n' --budget tokens=400
  steerscale solve -p "Calculate 59 + 8." --strategy best_of_n --verifier self_eval -n 4 --max-tokens 32 --json
  steerscale solve -p "Calculate 59 + 8." --backend-url http://127.0.0.1:8000/v1 --max-tokens 32   # on a server

The last one runs against a running steerscale serve (see steerscale serve --help), vLLM, SGLang or llama.cpp.
"""


def register(sub) -> None:
    from ..scale.strategies import STRATEGIES
    from ..scale.verifiers import VERIFIERS

    p = sub.add_parser("solve", epilog=EPILOG,
                       description="Run one inference-time scaling strategy (best-of-N, self-consistency, particle "
                                   "filtering, A*-decoding, ...) on a prompt, with an enforced budget.")
    add_model_args(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt text")
    p.add_argument("--strategy", default="majority", metavar="NAME",
                   help=f"default: majority; one of: {', '.join(STRATEGIES)}")
    p.add_argument("--verifier", default=None, metavar="NAME",
                   help=f"scorer for best-of-N / weighted vote / search (default: the strategy's own); one of: "
                        f"{', '.join(VERIFIERS)}")
    p.add_argument("--verifier-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="verifier option (repeatable), e.g. --verifier pairwise --verifier-opt mode=sample, "
                        "--verifier diverse --verifier-opt base=arith_prm --verifier-opt weight=0.2")
    p.add_argument("--reference", default=None,
                   help="reference answer for exact/numeric/math/mc verifiers (gym: the entry as JSON)")
    p.add_argument("--budget", default="", metavar="NAME=V,...",
                   help="limits, e.g. tokens=20000,flops=1e12,wall=60 (currencies: prompt_tokens, generated_tokens, "
                        "verifier_passes, verifier_tokens, judge_calls, flops, wall_seconds)")
    p.add_argument("-n", type=int, default=None,
                   help="samples / beams / particles (default: the strategy's own, 8 for most)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per answer (default 256)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 0.7)")
    p.add_argument("--step", default=None,
                   help="step delimiter for search strategies (default: a blank line, \\n\\n; '' for none)")
    p.add_argument("--knob", action="append", default=[], metavar="KEY=VALUE",
                   help="any other knob of the strategy (repeatable), e.g. --knob width=4 --knob select=vote")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--steer-scales", default=None, metavar="S1,S2,...",
                   help="one steering multiplier per sample (steering-diversified sampling; needs --steer)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    add_steer_args(p)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true", help="print a JSON object (with every candidate)")
    add_backend_args(p)
    p.set_defaults(func=run)


def parse_scales(text: str | None) -> list[float] | None:
    """``--steer-scales 0,2,4,8`` as numbers (None when not given)."""
    from ..errors import SteerscaleError

    if not text:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise SteerscaleError(f"--steer-scales {text!r} is not a list of numbers", "e.g. 0,2,4,8") from None


def run(args) -> int:
    from ..scale.local import LocalBackend
    from ..scale.spec import StrategySpec

    spec = StrategySpec.from_args(args)  # strategy, knobs, verifier and budget checked before the model loads
    scales = parse_scales(args.steer_scales)
    if args.backend_url:
        backend = remote_backend(args)
    else:
        lm = load(args)
        steering, rules = steering_from_args(args, lm.layout)
        backend = LocalBackend(lm.model, lm.tokenizer, lm.layout, steering=steering, rules=rules,
                               row_scales=scales, chat=False if args.no_chat else None,
                               logit_contrast=args.logit_contrast)
    result = spec.run(args.prompt, backend)
    if args.json:
        model = backend.model if args.backend_url else args.model
        emit_json({"model": model, "prompt": args.prompt, "steer": args.steer, "spec": spec.to_dict(),
                   **result.to_dict()})
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
