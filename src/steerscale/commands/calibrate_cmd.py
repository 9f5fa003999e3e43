"""``steerscale calibrate``: which layer and strength to steer at, from measured effect, cost and the prompting
baseline (``measure/calibrate.py``)."""

from __future__ import annotations

from pathlib import Path

from .common import add_model_args

EPILOG = """\
examples:
  steerscale calibrate --pairs formal_casual -o out/calibrate      # fit per layer, sweep, recommend (a few minutes)
  steerscale calibrate --pairs formal_casual --max-kl 0.2 --compare 14:1 -o out/cal   # tighter budget; vs layer 14 x1
  steerscale calibrate --pairs my_pairs.jsonl --system "Answer politely." --layers 8-16 --scales 0.5,1,2,4,8 -o out/cal
  steerscale calibrate --vector formal.safetensors --pairs formal_casual -o out/cal   # a given vector: strength only
  steerscale calibrate --vector vecs/ --pairs formal_casual -o out/cal        # every vector in vecs/, one row each
  steerscale calibrate --pairs formal_casual --judge "llm:Is this reply formal?" -o out/cal   # judged on replies
  steerscale calibrate --vector refusal.safetensors --prompts harmful.txt --judge "regex:(?i)I can(no|')t" -o out/cal

  steerscale generate -p "How was your weekend?" --steer out/calibrate/calibration.json   # layer + strength: auto

  steerscale generate -p "How was your weekend?" --steer out/calibrate/calibrated.safetensors   # the chosen setting
  steerscale serve --vector formal=out/calibrate/calibrated.safetensors     # the studio at http://127.0.0.1:8000/
  steerscale bake --steer out/calibrate/calibrated.safetensors -o out/formal-model

What it does: splits the pairs (seeded) into train (one CAA direction per candidate layer), select and test; sweeps
each layer over ascending strengths (a layer stops where KL on neutral text passes --break-kl: the text breaks),
then refines around the best setting. Effect: the gain of the positive-minus-negative log-prob margin over the
unsteered model on the select pairs (paired bootstrap interval). Cost: KL(base || steered) and perplexity on
neutral text. The recommendation is the largest effect whose interval is above zero and whose KL upper bound is
within --max-kl; when none qualifies it says why (no effect at any strength, or every effect costs more) and
writes no vector. The test pairs then report the recommendation, the --compare settings, the prompting baseline
(--system; "Be formal." for formal_casual) and prompt + steering.

Judges (--judge): the effect is then a judge's score of greedy replies (--judge-tokens) to the pairs' prompts or
to --prompts FILE, as a gain over the unsteered replies: regex:PATTERN (share of replies matching), lexicon:FILE
(share of words in the list), probe:COND.safetensors (a steerscale condition read on the reply: signed cosine),
llm:QUESTION (the model's own P(yes) to a yes/no question about the reply). Default: margin.

Outputs in -o: calibration.json (every row, the Pareto front, the verdict), calibration.png (effect against KL),
calibrated.safetensors (the chosen direction pre-multiplied by its strength: use it at scale 1) and
measurements.jsonl (finished measurements: rerun the same command to resume after an interrupt).
"""


# number-valued options: flag, type, default, metavar, help
NUMBERS = (
    ("--judge-tokens", int, 32, "N",
     "greedy tokens per reply a judge reads (default 32)"),
    ("--expand", int, None, "K",
     "after scanning every candidate layer at strength 1, sweep all strengths at the K most "
     "promising layers (default 2; 0: every layer)"),
    ("--max-kl", float, 0.5, "NATS",
     "cost budget: the recommended setting's KL upper bound on neutral text (default 0.5)"),
    ("--break-kl", float, None, "NATS",
     "a layer's sweep stops at the first strength with mean KL above this: the text breaks, and "
     "stronger settings could not be chosen (default: twice --max-kl)"),
    ("--neutral", int, 12, "N",
     "neutral texts the cost is measured on (default 12 of the 40 shipped)"),
    ("--gen-tokens", int, 32, "N",
     "greedy tokens per sample prompt for the coherence check (default 32; 0: no samples)"),
    ("--min-gain", float, 0.05, "NATS",
     "the smallest gain that counts as an effect: nats/token for the margin, the judge's unit with --judge "
     "(default 0.05)"),
    ("--max-repetition", float, 0.5, "SHARE",
     "pass over a setting whose greedy samples repeat more than this share of token 3-grams "
     "(default 0.5; 1: never)"),
)


def register(sub) -> None:
    p = sub.add_parser("calibrate",
                       description="Sweep layers x strengths for contrastive pairs (or a given vector) and recommend "
                                   "a setting: effect against cost (KL, perplexity, repetition) against the prompting "
                                   "baseline, with intervals.",
                       epilog=EPILOG)
    add_model_args(p)
    p.add_argument("--pairs", default=None, metavar="FILE.jsonl|NAME",
                   help='contrastive pairs ({"prompt","positive","negative"} or {"positive","negative"} per line) or '
                        "a bundled set (formal_casual): fit directions from them and measure the effect on them "
                        "(not needed with --vector, --judge and --prompts)")
    p.add_argument("--vector", action="append", default=[], metavar="VEC|DIR",
                   help="calibrate the strength of this vector instead of fitting one per layer (the pairs then only "
                        "measure); repeatable, or a folder of .safetensors/.gguf vectors: each is calibrated in "
                        "-o/NAME and summarised together")
    p.add_argument("--judge", default="margin", metavar="KIND:ARG",
                   help="the effect measure: margin (default: the pairs' log-prob margin), regex:PATTERN, "
                        "lexicon:FILE, probe:COND.safetensors or llm:QUESTION (judged on greedy replies)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompts a judge reads replies to (.txt one a line, .jsonl, .json; split half select, half "
                        "test; default: the pairs' prompts)")
    p.add_argument("--layers", default="auto",
                   help="candidate layers: auto (five spread over the middle of the network), N, A-B or A,B,C")
    p.add_argument("--scales", default=None, metavar="S1,S2,...",
                   help="strengths to try, ascending, in units of the vector's own strength (default 0.5,1,2,4; "
                        "the refinement adds midpoints)")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="the prompting baseline's system prompt (default: \"Be formal.\" for formal_casual, none "
                        "for other pairs)")
    p.add_argument("--compare", action="append", default=[], metavar="LAYER:SCALE",
                   help="a fixed setting to report beside the recommendation on the test pairs; repeatable")
    p.add_argument("--read", default="mean", choices=["last", "mean"],
                   help="activations the directions are fitted on: the replies' mean (default) or last token")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/select/test split (default 0)")
    for flag, kind, default, metavar, text in NUMBERS:
        p.add_argument(flag, type=kind, default=default, metavar=metavar, help=text)
    p.add_argument("-o", "--out", default="out/calibrate", help="output folder (default out/calibrate)")
    p.set_defaults(func=run)


def parse_compare(spec: str) -> tuple[int, float]:
    from ..errors import SteerscaleError

    layer, sep, scale = spec.partition(":")
    try:
        return int(layer), float(scale)
    except ValueError:
        raise SteerscaleError(f"bad --compare {spec!r}", "write LAYER:SCALE, e.g. --compare 14:1") from None


def parse_scales(spec: str | None):
    from ..errors import SteerscaleError
    from ..measure.calibrate import DEFAULT_SCALES

    if spec is None:
        return DEFAULT_SCALES
    try:
        return [float(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise SteerscaleError(f"bad --scales {spec!r}",
                              "write positive numbers, e.g. --scales 0.25,0.5,1,2,4") from None


def resolve_pairs(name: str) -> Path:
    """A pairs file path, or a bundled set's."""
    from ..steer.pairs import bundled_pairs

    return Path(name) if Path(name).exists() or name.endswith(".jsonl") else bundled_pairs(name)


def vector_files(specs: list[str]) -> dict:
    """``{name: path}`` from ``--vector`` arguments: files, or folders (their .safetensors and .gguf files)."""
    from ..errors import SteerscaleError

    files = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".gguf"))
            if not found:
                raise SteerscaleError(f"--vector {spec}: the folder holds no .safetensors or .gguf vectors")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise SteerscaleError(f"--vector {spec}: no such file or folder", "give a vector file or a folder of them")
    named = {}
    for f in files:
        if f.stem in named:
            raise SteerscaleError(f"two vectors are named {f.stem!r} ({named[f.stem]} and {f})",
                                  "each vector's results go to -o/NAME: rename one")
        named[f.stem] = f
    return named


def run(args) -> int:
    from ..errors import SteerscaleError
    from ..measure.calibrate import PROMPT_BASELINES, calibrate, calibrate_set, render_set_text, render_text
    from ..measure.judges import parse_judge
    from ..steer.vector import SteeringVector
    from .common import load, read_prompts

    judge = parse_judge(args.judge)  # a bad spec fails before the model loads
    pairs = resolve_pairs(args.pairs) if args.pairs else None
    prompts = read_prompts(args.prompts) if args.prompts else None
    if pairs is None and not (args.vector and judge is not None and prompts is not None):
        raise SteerscaleError("calibrate needs --pairs (to fit directions or measure margins)",
                              "give --pairs FILE|NAME, or --vector with --judge and --prompts")
    compare = [parse_compare(c) for c in args.compare]
    scales = parse_scales(args.scales)
    if args.neutral < 2 or args.gen_tokens < 0:
        raise SteerscaleError("--neutral must be at least 2 and --gen-tokens 0 or more")
    vectors = {name: SteeringVector.load(f) for name, f in vector_files(args.vector).items()}  # before the model
    system = args.system if args.system is not None else PROMPT_BASELINES.get(pairs.stem if pairs else "")
    lm = load(args)
    kw = dict(layers=args.layers, scales=scales, max_kl=args.max_kl, break_kl=args.break_kl, min_gain=args.min_gain,
              system=system or None, compare=compare, judge=judge, prompts=prompts, judge_tokens=args.judge_tokens,
              n_neutral=args.neutral, gen_tokens=args.gen_tokens, max_repetition=args.max_repetition, read=args.read,
              seed=args.seed)
    if args.expand is not None:
        kw["expand"] = args.expand
    pairs = str(pairs) if pairs else None
    if len(vectors) > 1:
        report = calibrate_set(lm, pairs, vectors, out_dir=args.out, **kw)
        for name, cal in report["results"].items():
            print(f"\n== {name} ==\n{render_text(cal)}")
        print("\n" + render_set_text(report))
        print(f"wrote {report['path']} and a folder per vector")
        return 0
    cal = calibrate(lm, pairs, vector=next(iter(vectors.values()), None), out_dir=args.out, **kw)
    print(render_text(cal))
    print(f"wrote {Path(args.out) / 'calibration.json'} and {cal.plot_path}")
    return 0
