"""``steerscale demo``: build, apply and measure a steering vector on the bundled model (see ``steerscale.demo``)."""

from __future__ import annotations

from ..models.registry import DEFAULT_MODEL


EPILOG = """\
examples:
  steerscale demo -o out/demo                                   # everything (a few minutes on 2 CPU cores)
  steerscale demo -o out/demo-steering --scaling-problems 0     # the steering sections only (about 30 s)
  steerscale demo -o out/demo-strong --scales=-2,-1,0,1,2 --scaling-problems 0   # other strengths

--scales takes a list that starts with a minus sign only after "=".
"""


def register(sub) -> None:
    p = sub.add_parser("demo", description="Build a formal-vs-casual steering vector on the bundled model, measure "
                                           "its effect on held-out pairs and its cost (KL on neutral text) at several "
                                           "strengths, show generations side by side, compare greedy decoding with "
                                           "inference-time scaling strategies on arithmetic, and write a Markdown "
                                           "report with plots.",
                       epilog=EPILOG)
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, help=f"model (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto")
    p.add_argument("-o", "--output", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--scales", default="-1,-0.5,0,0.5,1",
                   help="comma-separated steering scales to measure; negative = toward casual (default: -1,-0.5,0,0.5,1)")
    p.add_argument("--scaling-problems", type=int, default=32,
                   help="three-number sums for the scaling section (0 skips it; default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run_demo
    from ..errors import SteerscaleError

    try:
        scales = tuple(float(s) for s in args.scales.split(","))
    except ValueError:
        raise SteerscaleError(f"--scales {args.scales!r} is not a comma-separated list of numbers") from None
    run_demo(args.model, args.output, scales=scales, seed=args.seed, device=args.device,
             scaling_problems=args.scaling_problems)
    return 0
