"""``steerscale extract`` and ``steerscale sweep``: steering vectors from contrastive data."""

from __future__ import annotations

import json
from pathlib import Path

from .common import add_model_args, emit_json, load


def method_help() -> str:
    """The extraction methods, from the method registry (one place lists them)."""
    from ..steer.methods import METHODS

    aliases = METHODS.aliases
    return "; ".join(f"{name} ({desc})" + "".join(f", alias {a}" for a, n in aliases.items() if n == name)
                     for name, desc in METHODS.describe())


def method_table() -> str:
    """One line per method with what its registry entry declares: what it fits on, the data it takes, whether it
    has --train knobs, where it steers and whether it can be written as a llama.cpp control vector (.gguf)."""
    from ..steer.methods import METHODS

    lines = [f"  {'method':<11} {'fits on':<12} {'data':<16} {'--train':<8} {'steers':<22} .gguf"]
    for name, cap in METHODS.items():
        where = "per head" if cap.per_head else cap.sites.value
        where += ", norm-kept" if cap.preserve_norm else ""
        lines.append(f"  {name:<11} {cap.reads.value:<12} {', '.join(d.value for d in cap.data):<16} "
                     f"{'yes' if cap.trains else '-':<8} {where:<22} {'yes' if cap.gguf_problem() is None else '-'}")
    return "\n".join(lines)


def _head_methods() -> str:
    from ..steer.capabilities import names_with
    from ..steer.methods import METHODS

    return ", ".join(names_with(METHODS, lambda c: c.per_head or "heads" in c.settings))


def train_help() -> str:
    """What ``--train`` sets, per method that trains (from each entry's knobs dataclass)."""
    from ..steer.methods import METHODS

    return "; ".join(f"{name}: {', '.join(cap.knob_names())} ({cap.knobs.__module__}.{cap.knobs.__name__})"
                     for name, cap in METHODS.items() if cap.trains)


def _add_data_args(p) -> None:
    from ..steer.extract import labelled_methods

    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--pairs", metavar="FILE.jsonl",
                      help='contrastive pairs: {"positive","negative"} or {"prompt","positive","negative"} per line; '
                           "or the name of a bundled set (formal_casual)")
    data.add_argument("--labelled", metavar="FILE.jsonl",
                      help='labelled texts {"text", "label": 0|1}; label 1 is the side a positive scale moves toward '
                           f"(methods {', '.join(labelled_methods())})")
    p.add_argument("--read", default="last", choices=["last", "mean"],
                   help="which tokens to read: the last token, or the mean over the completion (default: last)")
    p.add_argument("--batch-size", type=int, default=16)


EXTRACT_EPILOG = """\
examples:
  steerscale extract --pairs formal_casual --method caa --layers auto -o formal.safetensors
  steerscale extract --pairs formal_casual --method pca --layers 10-14 --read mean -o formal_pca.safetensors
  steerscale extract --pairs formal_casual --method iti --heads 8 -o formal_iti.safetensors   # per attention head
  steerscale extract --pairs formal_casual --method caa --layers 14 -o formal.gguf   # a llama.cpp control vector
  steerscale extract --pairs formal_casual --method grains --train k=3,steps=32 -o formal_grains.safetensors

formal_casual is the bundled pair set; --pairs also takes a JSONL file, one {"positive", "negative"} per line.
Apply a vector with: steerscale generate -p "How was your weekend?" --steer formal.safetensors:1
"""

SWEEP_EPILOG = """\
examples:
  steerscale sweep --pairs formal_casual -o out/sweep              # sweep.json + sweep.png, one probe per layer
  steerscale sweep --pairs formal_casual --per-head -o out/heads   # one probe per attention head (ITI)
"""


def register(sub) -> None:
    from ..steer.methods import DEFAULT_METHOD

    p = sub.add_parser("extract",
                       description="Read activations for positive and negative texts and fit a steering vector.\n"
                                   f"Methods: {method_help()}.",
                       epilog=EXTRACT_EPILOG + "\nwhat each method needs (its registry entry, steer/methods):\n"
                              + method_table() + "\n")
    add_model_args(p)
    _add_data_args(p)
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"extraction method (default {DEFAULT_METHOD}; see above); for a method that fits on the "
                        "model --layers limits where it may steer")
    p.add_argument("--layers", default="auto", help="auto (probe sweep picks), N, A-B or A,B,C (default: auto)")
    p.add_argument("--heads", type=int, default=16,
                   help=f"number of attention heads to steer, for the per-head methods ({_head_methods()}; "
                        "default: 16)")
    p.add_argument("--train", default=None, metavar="K=V,...",
                   help=f"knobs of a method that trains, e.g. epochs=3,lr=0.005 or k=5,steps=16: {train_help()}")
    p.add_argument("-o", "--output", required=True, help="output .safetensors (or .gguf for a llama.cpp control vector)")
    p.set_defaults(func=run_extract)

    s = sub.add_parser("sweep", description="Fit a held-out logistic probe at every layer (or head, with --per-head) "
                                            "and write a table (JSON) and a plot (PNG).",
                       epilog=SWEEP_EPILOG)
    add_model_args(s)
    _add_data_args(s)
    s.add_argument("--per-head", action="store_true", help="sweep every attention head instead of layers (where "
                                                           "the per-head methods choose their heads)")
    s.add_argument("-o", "--output", required=True, help="output directory")
    s.set_defaults(func=run_sweep)


def _pairs_path(name: str) -> str:
    from ..steer.pairs import bundled_pairs

    return name if Path(name).exists() or name.endswith(".jsonl") else str(bundled_pairs(name))


def _extract(args, lm):
    from ..steer.extract import extract, extract_labelled

    if args.labelled:
        return extract_labelled(lm, args.labelled, args.method, args.layers, read=args.read, iti_heads=args.heads,
                                batch_size=args.batch_size, train=args.train)
    return extract(lm, _pairs_path(args.pairs), args.method, args.layers, read=args.read, iti_heads=args.heads,
                   batch_size=args.batch_size, train=args.train)


def check_extract_args(args) -> None:
    """Refuse, from the method's registry entry and before the model loads (a method may train for minutes),
    what can only fail afterwards: an unknown method, labelled texts for a method that needs pairs, knobs for a
    method that does not train or bad knobs, and a .gguf output the method's vectors do not fit."""
    from ..errors import SteerscaleError
    from ..steer.capabilities import train_knobs
    from ..steer.extract import labelled_methods
    from ..steer.methods import METHODS

    args.method = METHODS.canonical(args.method)  # unknown: "did you mean"
    cap = METHODS[args.method]
    if args.labelled and args.method not in labelled_methods():
        raise SteerscaleError(f"method {args.method!r} needs contrastive pairs (--pairs), not labelled texts",
                              f"use --pairs, or --method {' / '.join(labelled_methods())} with --labelled")
    train_knobs(METHODS, args.method, args.train)
    problem = cap.gguf_problem() if Path(args.output).suffix == ".gguf" else None
    if problem:
        raise SteerscaleError(f"a {args.method} vector cannot be a llama.cpp control vector: {problem[0]}", problem[1])


def run_extract(args) -> int:
    check_extract_args(args)
    lm = load(args)
    vector = _extract(args, lm)
    out = Path(args.output)
    if out.suffix == ".gguf":
        from ..steer.gguf import export_gguf

        export_gguf(vector, out)
    else:
        out = vector.save(out)
    print(f"wrote {out}: {vector.method} vector at {', '.join(s.key() for s in vector.sites[:6])}"
          + (" ..." if len(vector.sites) > 6 else ""))
    print(f"apply it with: steerscale generate -m {args.model} -p 'Hello' --steer {out}:1")
    return 0


def run_sweep(args) -> int:
    from ..steer.extract import probe_sweep, sweep_plot

    lm = load(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    result = probe_sweep(lm, pairs=_pairs_path(args.pairs) if args.pairs else None, labelled=args.labelled,
                         per_head=args.per_head, read=args.read, batch_size=args.batch_size)
    table = result.table()
    (out / "sweep.json").write_text(json.dumps(table, indent=1))
    sweep_plot(result, out / "sweep.png", f"{lm.name}: held-out probe accuracy ({'per head' if args.per_head else 'per layer'})")
    best = sorted(table, key=lambda r: -r["accuracy"])[:5]
    emit_json({"chosen": [s.key() for s in result.chosen], "top": best, "table": str(out / "sweep.json"),
               "plot": str(out / "sweep.png")})
    return 0
