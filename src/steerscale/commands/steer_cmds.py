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


def _add_data_args(p) -> None:
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--pairs", metavar="FILE.jsonl",
                      help='contrastive pairs: {"positive","negative"} or {"prompt","positive","negative"} per line; '
                           "or the name of a bundled set (formal_casual)")
    data.add_argument("--labelled", metavar="FILE.jsonl",
                      help='labelled texts {"text", "label": 0|1}; label 1 is the side a positive scale moves toward '
                           "(methods caa, probe, iti)")
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
    p = sub.add_parser("extract",
                       description="Read activations for positive and negative texts and fit a steering vector.\n"
                                   f"Methods: {method_help()}.",
                       epilog=EXTRACT_EPILOG)
    add_model_args(p)
    _add_data_args(p)
    p.add_argument("--method", default="caa", help="extraction method (default caa; see above); --layers limits "
                   "where LoFiT chooses heads")
    p.add_argument("--layers", default="auto", help="auto (probe sweep picks), N, A-B or A,B,C (default: auto)")
    p.add_argument("--heads", type=int, default=16, help="ITI, LoFiT: number of heads to steer (default: 16)")
    p.add_argument("--train", default=None, metavar="K=V,...",
                   help="LoFiT training knobs, e.g. epochs=3,lr=0.005,loss=sft (fields of steer.lofit.LofitConfig: "
                        "epochs, select_epochs, lr, select_lr, l1, beta, loss dpo|sft, batch_size); GrAInS knobs, "
                        "e.g. k=5,steps=16 (steer.grains.GrainsConfig: k, steps, batch_size, aggregate mean|pca, "
                        "baseline zero|pad)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors (or .gguf for a llama.cpp control vector)")
    p.set_defaults(func=run_extract)

    s = sub.add_parser("sweep", description="Fit a held-out logistic probe at every layer (or head, with --per-head) "
                                            "and write a table (JSON) and a plot (PNG).",
                       epilog=SWEEP_EPILOG)
    add_model_args(s)
    _add_data_args(s)
    s.add_argument("--per-head", action="store_true", help="sweep every attention head (ITI) instead of layers")
    s.add_argument("-o", "--output", required=True, help="output directory")
    s.set_defaults(func=run_sweep)


def _pairs_path(name: str) -> str:
    from ..steer.pairs import bundled_pairs

    return name if Path(name).exists() or name.endswith(".jsonl") else str(bundled_pairs(name))


def _extract(args, lm, method: str, layers, return_sweep: bool = False):
    from ..steer.extract import extract, extract_labelled

    if args.labelled:
        return extract_labelled(lm, args.labelled, method, layers, read=args.read, iti_heads=getattr(args, "heads", 16),
                                batch_size=args.batch_size, return_sweep=return_sweep)
    return extract(lm, _pairs_path(args.pairs), method, layers, read=args.read, iti_heads=getattr(args, "heads", 16),
                   batch_size=args.batch_size, return_sweep=return_sweep, train=getattr(args, "train", None))


def run_extract(args) -> int:
    from ..errors import SteerscaleError
    from ..steer.methods import METHODS

    # refuse before loading and training (LoFiT trains for minutes) what can only fail afterwards
    args.method = METHODS.canonical(args.method)  # unknown: "did you mean", before the model loads
    if args.train and args.method not in ("lofit", "grains"):
        raise SteerscaleError(f"--train sets LoFiT's and GrAInS's knobs; method {args.method!r} does not train",
                              "drop --train, or use --method lofit or grains")
    if args.method == "grains":
        from ..steer.grains import GrainsConfig

        GrainsConfig.build(**GrainsConfig.parse(args.train))  # a bad knob fails before the model loads
    if Path(args.output).suffix == ".gguf" and args.method in ("iti", "lofit"):
        raise SteerscaleError(f"{args.method} vectors are per attention head; a llama.cpp control vector holds only "
                              "residual directions", "write .safetensors and bake it (steerscale bake) for other engines")
    if Path(args.output).suffix == ".gguf" and args.method == "grains":
        raise SteerscaleError("GrAInS steering rescales each activation to its original norm, which a llama.cpp "
                              "control vector cannot do", "write .safetensors and steer with it in steerscale")
    lm = load(args)
    vector = _extract(args, lm, args.method, args.layers)
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
    from ..steer.extract import sweep_plot

    lm = load(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    _, result = _extract(args, lm, "iti" if args.per_head else "caa", "auto", return_sweep=True)
    table = result.table()
    (out / "sweep.json").write_text(json.dumps(table, indent=1))
    sweep_plot(result, out / "sweep.png", f"{lm.name}: held-out probe accuracy ({'per head' if args.per_head else 'per layer'})")
    best = sorted(table, key=lambda r: -r["accuracy"])[:5]
    emit_json({"chosen": [s.key() for s in result.chosen], "top": best, "table": str(out / "sweep.json"),
               "plot": str(out / "sweep.png")})
    return 0
