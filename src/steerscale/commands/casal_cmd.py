"""``steerscale casal``: amortise a steering vector into one layer's MLP weights (CASAL, docs/casal.md)."""

from __future__ import annotations

from pathlib import Path

from .common import add_model_args, emit_json, load

EPILOG = """\
examples:
  steerscale casal --vector formal.safetensors:1 --texts formal_casual --keep neutral -o out/casal_model
  steerscale casal --vector formal.safetensors:1 --texts pairs.jsonl --rank 16 --steps 500 -o out/casal16
  steerscale generate -m out/casal_model -p "How was your weekend?"

formal.safetensors: steerscale extract --pairs formal_casual -o formal.safetensors. --texts and --keep take a JSONL
file (pairs: both full texts; otherwise "text", or "prompt"/"instruction" with the chat template) or a bundled
pairs name; --keep neutral is the 40 shipped neutral texts. The output is a plain Hugging Face checkpoint: load it
with AutoModelForCausalLM.from_pretrained("out/casal_model"); casal.json beside it records the fit.
"""


def register(sub) -> None:
    p = sub.add_parser("casal",
                       description="Train a low-rank update of one layer's MLP output projection so that the unhooked "
                                   "model reproduces the steered model's activations at that layer (CASAL), merge it "
                                   "and write a standard Hugging Face checkpoint that needs no hooks. The checkpoint "
                                   "is reloaded and its logits compared with the merged model before it is kept.",
                       epilog=EPILOG)
    add_model_args(p)
    p.add_argument("--vector", action="append", required=True, metavar="VEC[:SCALE]",
                   help="steering vector to amortise at SCALE (default 1); repeatable")
    p.add_argument("--texts", required=True, metavar="FILE|NAME",
                   help="texts where the behaviour applies (JSONL: pairs, or text/prompt lines; or a bundled pairs "
                        "name)")
    p.add_argument("--keep", default=None, metavar="FILE|neutral",
                   help="texts whose activations should stay unsteered (JSONL, or 'neutral' for the shipped set)")
    p.add_argument("--rank", type=int, default=None, help="rank of the weight update (default 8)")
    p.add_argument("--steps", type=int, default=None, help="Adam steps (default 300)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 0.005)")
    p.add_argument("--layer", type=int, default=None,
                   help="block whose MLP is trained (default: the deepest block the vector edits)")
    p.add_argument("--train", default=None, metavar="K=V,...",
                   help="other settings, e.g. keep_weight=2,mode=forward,batch_size=4,seed=1")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output directory if it holds an earlier steerscale checkpoint")
    p.add_argument("--no-verify", action="store_true", help="skip reloading the checkpoint to compare logits")
    p.add_argument("--json", action="store_true", help="print the training record and the report as JSON")
    p.set_defaults(func=run)


def _knobs(args) -> dict:
    from ..steer.casal import CasalConfig

    knobs = CasalConfig.parse(args.train)
    for name in ("rank", "steps", "lr", "layer"):
        if getattr(args, name) is not None:
            knobs[name] = getattr(args, name)
    return knobs


def run(args) -> int:
    from ..measure.cost import neutral_prompts
    from ..steer.bake import check_target
    from ..steer.casal import CasalConfig, bake_casal, fit_casal
    from ..steer.vector import SteeringVector, parse_steer_arg

    config = CasalConfig.build(**_knobs(args))  # bad settings fail before the model loads
    check_target(Path(args.output), args.overwrite)  # likewise an occupied output directory
    vectors = [(SteeringVector.load(path), scale) for path, scale in map(parse_steer_arg, args.vector)]
    lm = load(args)
    keep = neutral_prompts() if args.keep == "neutral" else args.keep
    result = fit_casal(lm, vectors, args.texts, keep, config)
    report = bake_casal(lm, result, Path(args.output), verify=not args.no_verify, overwrite=args.overwrite,
                        source=lm.name)
    if args.json:
        emit_json({"record": result.to_dict(), "report": report})
        return 0
    fit, params = result.fit, result.params
    print(f"trained block {result.layer}'s {result.module} (rank {config.rank}, {config.steps} steps, "
          f"{result.mode} mode) in {result.seconds:.1f} s, about {result.flops['total']:.2g} FLOPs")
    print(f"fit (relative MSE at resid_post.{result.layer}; 1 = unsteered, 0 = exact): steer texts "
          f"{fit['steer']['before']:.3f} -> {fit['steer']['after']:.3f}"
          + (f", keep texts {fit['keep']['before']:.3f} -> {fit['keep']['after']:.3f}" if fit["keep"] else ""))
    print(f"parameters changed: {params['trainable']:,} trained (rank {config.rank} x ({params['d_in']} + "
          f"{params['d_out']})), merged into one {params['d_out']} x {params['d_in']} matrix "
          f"({params['merged_matrix']:,} of the model's {params['model']:,})")
    check = report["check"]
    print(f"wrote {report['out_dir']}" + (f" (reload max logit difference vs merged model "
                                          f"{check['reload_max_abs_diff']:.2g})" if "reload_max_abs_diff" in check
                                          else " (not reloaded)"))
    print(f'use it with: steerscale generate -m {report["out_dir"]} -p "How was your weekend?"  (no --steer needed)')
    return 0
