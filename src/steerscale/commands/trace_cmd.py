"""``steerscale trace``: causal tracing (corrupt and restore, ROME): which layers and positions carry a behaviour."""

from __future__ import annotations

from pathlib import Path

from ..errors import SteerscaleError
from .common import add_model_args, emit_json, load

EPILOG = """\
examples:
  steerscale trace -p "The Eiffel Tower is in the city of" --target " Paris" --subject "Eiffel Tower" --no-chat
  steerscale trace -p "The Eiffel Tower is in the city of" --target " Paris" --no-chat --kind mlp_out --plot mlp.png
  steerscale trace -p "Can you see the Great Wall from space?" --target "No." --foil "Yes." -o out/tqa.json
  steerscale trace --prompts facts.jsonl --no-chat --samples 3 -o out/facts.json --plot out/facts.png
  steerscale trace -p "Tell me about dogs" --target "Dogs" --kind head_out --layers 10-20 -o out/heads.json
  steerscale extract --pairs truth_pairs.jsonl --layers out/tqa.json:2 -o truth.safetensors   # top 2 traced layers

Method (docs/tracing.md): Gaussian noise (--noise x the std of the token embeddings) is added to the embeddings of
the corrupted tokens (--subject, else the whole prompt text) for --samples draws; then, one (layer, position) at a
time, the hidden state is set back to its clean value. The indirect effect is metric(restored) - metric(corrupted);
the metric is p(target) (--metric prob), log p(target) (logprob) or, with --foil, log p(target) - log p(foil).
--kind mlp_out/attn_out restore a --window of adjacent layers; head_out restores one head (a layers x heads map).
--prompts FILE.jsonl traces many prompts (lines {"prompt", "target", "foil"?, "subject"?}) and averages the effects
per position class (first/middle/last corrupted token, first after, further, last token).
The file written by -o seeds extraction: --layers FILE.json[:K] takes its top K layers (default 1), ranked by
their largest effect.
"""


def register(sub) -> None:
    p = sub.add_parser("trace", description="Causal tracing (Meng et al. 2022): corrupt the prompt's tokens with "
                                            "noise, restore one hidden state at a time, and measure how much of the "
                                            "target's probability comes back.", epilog=EPILOG)
    add_model_args(p)
    w = p.add_argument_group("what to trace")
    w.add_argument("-p", "--prompt", default=None, help="the prompt")
    w.add_argument("--target", default=None, help="the completion whose probability is traced (e.g. ' Paris')")
    w.add_argument("--foil", default=None, help="a contrasting completion: the metric becomes "
                                                "log p(target) - log p(foil)")
    w.add_argument("--subject", default=None, help="the substring of the prompt to corrupt (default: all of it)")
    w.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                   help='many prompts, one {"prompt", "target", "foil"?, "subject"?} a line; effects are averaged')
    w.add_argument("--no-chat", action="store_true", help="trace the prompt as written, without the chat template")
    k = p.add_argument_group("knobs")
    k.add_argument("--kind", default="resid_post", choices=["resid_post", "mlp_out", "attn_out", "head_out"],
                   help="what is restored (default resid_post)")
    k.add_argument("--layers", default="all", help="layers to trace: all, N, A-B or A,B,C (default all)")
    k.add_argument("--samples", type=int, default=5, help="noise draws averaged (default 5; ROME uses 10)")
    k.add_argument("--noise", type=float, default=3.0, help="noise std in units of the embedding std (default 3)")
    k.add_argument("--window", type=int, default=None,
                   help="layers restored together for mlp_out/attn_out (default: n_layers // 5)")
    k.add_argument("--positions", default=None, metavar="I,J,...",
                   help="prompt token indices to trace, negative from the end (default: from the first corrupted "
                        "token to the last)")
    k.add_argument("--head-positions", default="all", choices=["all", "corrupted"],
                   help="head_out: restore each head at all traced positions or only at the corrupted ones")
    k.add_argument("--metric", default=None, choices=["prob", "logprob", "contrast"],
                   help="default prob (contrast with --foil)")
    k.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    k.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default 32)")
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output", default=None, metavar="FILE.json", help="write the trace (JSON)")
    o.add_argument("--plot", default=None, metavar="PNG", help="write the heatmap")
    o.add_argument("--top", type=int, default=5, metavar="K", help="rows of the top-layers table (default 5)")
    o.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    p.set_defaults(func=run)


def _cases(args) -> list:
    from ..steer.pairs import read_jsonl
    from ..steer.tracing import TraceCase

    if args.prompts:
        if args.prompt or args.target or args.foil or args.subject:
            raise SteerscaleError("--prompts and -p/--target/--foil/--subject are exclusive",
                                  "put every prompt in the --prompts file, or trace one prompt with -p")
        path = Path(args.prompts)
        if path.suffix != ".jsonl":
            raise SteerscaleError(f"--prompts {path}: expected a .jsonl file",
                                  'one {"prompt": ..., "target": ..., "subject": ...} a line')
        rows = read_jsonl(path)
        if not rows:
            raise SteerscaleError(f"{path} has no prompts", 'one {"prompt": ..., "target": ...} a line')
        return [TraceCase.from_dict(obj, f"{path}:{n}") for n, obj in rows]
    if args.prompt is None or args.target is None:
        raise SteerscaleError("trace needs a prompt and a target",
                              "pass -p TEXT --target TEXT, or --prompts FILE.jsonl")
    return [TraceCase(args.prompt, args.target, args.foil, args.subject)]


def check_args(args) -> None:
    """What can be refused before a model loads."""
    if args.output and Path(args.output).suffix != ".json":
        raise SteerscaleError(f"-o {args.output}: a trace is written as .json", "e.g. -o out/trace.json")
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise SteerscaleError(f"--plot {args.plot}: the heatmap is a .png", "e.g. --plot out/trace.png")
    if args.top < 1:
        raise SteerscaleError(f"--top must be at least 1, got {args.top}")


def _knobs(args, lm) -> dict:
    from ..steer.layers import parse_layers

    layers = None if args.layers in ("all", "auto") else parse_layers(args.layers, lm.layout.n_layers)
    positions = None
    if args.positions:
        try:
            positions = [int(x) for x in args.positions.split(",")]
        except ValueError:
            raise SteerscaleError(f"bad --positions {args.positions!r}", "use prompt token indices, e.g. 3,4,-1") \
                from None
    return dict(kind=args.kind, layers=layers, samples=args.samples, noise=args.noise, window=args.window,
                positions=positions, head_positions=args.head_positions, metric=args.metric,
                chat=False if args.no_chat else None, seed=args.seed, batch_size=args.batch_size)


def report(lm, args) -> dict:
    """Trace, save and plot for a loaded model (``run`` without the loading; tests call it on a tiny model)."""
    from ..steer.tracing import aggregate, trace, trace_many

    cases = _cases(args)
    knobs = _knobs(args, lm)
    if len(cases) == 1 and not args.prompts:
        result = trace(lm, cases[0], **knobs)
    else:
        result = aggregate(trace_many(lm, cases, **knobs))
    out = {"model": lm.name, "kind": result.kind, "metric": result.metric, "n_prompts": len(cases),
           "clean": round(result.clean, 6), "corrupted": round(result.corrupted, 6),
           "top": result.table(args.top), "top_layers": result.top_layers(min(args.top, len(result.layers)))}
    if args.output:
        out["output"] = str(result.save(args.output))
    if args.plot:
        out["plot"] = str(result.heatmap(args.plot))
    return out


def format_table(rows: list[dict]) -> str:
    lines = [f"{'layer':>5} {'effect':>10}  at"]
    lines += [f"{r['layer']:>5} {r['effect']:>+10.4f}  {r['at']!r}" for r in rows]
    return "\n".join(lines)


def run(args) -> int:
    check_args(args)
    _cases(args)  # a bad prompt file fails before the model loads
    lm = load(args)
    out = report(lm, args)
    if args.json:
        emit_json(out)
        return 0
    print(f"{out['model']}: {out['kind']} trace over {out['n_prompts']} prompt(s); {out['metric']}: clean "
          f"{out['clean']:.4g}, corrupted {out['corrupted']:.4g}")
    print("top layers by indirect effect (restored - corrupted):")
    print(format_table(out["top"]))
    for key in ("output", "plot"):
        if key in out:
            print(f"wrote {out[key]}")
    if "output" in out:
        print(f"seed extraction with its top layer(s): steerscale extract -m {args.model} --pairs PAIRS "
              f"--layers {out['output']}:1 -o vec.safetensors   (:K for the top K)")
    return 0
