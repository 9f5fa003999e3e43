"""``steerscale export``, ``import`` and ``bake``: move steering vectors to llama.cpp and into checkpoints."""

from __future__ import annotations

from pathlib import Path

from .common import add_model_args, emit_json, load


EXPORT_EPILOG = """\
examples:
  steerscale export formal.safetensors --gguf formal.gguf --scale 4

formal.safetensors: steerscale extract --pairs formal_casual -o formal.safetensors. In llama.cpp (not installed
by steerscale): llama-cli -m MODEL.gguf --control-vector formal.gguf
"""

IMPORT_EPILOG = """\
examples:
  steerscale import formal.gguf -o formal_from_gguf.safetensors
  steerscale generate -p "How was your weekend?" --steer formal_from_gguf.safetensors:0.25

formal.gguf: a llama.cpp / repeng control vector, or the one steerscale export --help writes (its scale, 4, is
folded into the directions, hence 0.25 here).
"""

BAKE_EPILOG = """\
examples:
  steerscale bake -m smollm2-135m-instruct --steer formal.safetensors:4 -o out/formal-model
  steerscale bake --steer formal.safetensors:4 -o out/formal-model --overwrite --json

Load it with plain transformers: AutoModelForCausalLM.from_pretrained("out/formal-model").
"""


def register(sub) -> None:
    e = sub.add_parser("export",
                       description="Write a vector as a llama.cpp control vector (direction.N = output of 0-based block N; "
                                   "the scale is folded in, so use strength 1 in llama.cpp).",
                       epilog=EXPORT_EPILOG)
    e.add_argument("vector", help="steering vector (.safetensors)")
    e.add_argument("--gguf", required=True, metavar="OUT", help="output .gguf file")
    e.add_argument("--scale", type=float, default=1.0, help="fold this scale into the directions (default: 1)")
    e.add_argument("--model-hint", default=None,
                   help="controlvector.model_hint to write, e.g. llama (default: from the vector's metadata)")
    e.add_argument("--drop-layer0", action="store_true",
                   help="skip edits of block 0's output, which llama.cpp cannot apply, instead of failing")
    e.set_defaults(func=run_export)

    i = sub.add_parser("import",
                       description="Read a GGUF control vector as a steerscale vector (direction.N becomes resid_post.N).",
                       epilog=IMPORT_EPILOG)
    i.add_argument("gguf", help="control vector .gguf file")
    i.add_argument("-o", "--output", required=True, help="output .safetensors")
    i.set_defaults(func=run_import)

    b = sub.add_parser("bake",
                       description="Write a Hugging Face checkpoint whose biases carry the edit, so plain transformers "
                                   "or vLLM serve the steered model with no hooks. The checkpoint is reloaded and its "
                                   "logits compared with the hooked model before it is kept.",
                       epilog=BAKE_EPILOG)
    add_model_args(b)
    b.add_argument("--steer", action="append", required=True, metavar="VEC[:SCALE]",
                   help="steering vector to bake at SCALE (default 1); repeatable")
    b.add_argument("-o", "--output", required=True, help="output directory")
    b.add_argument("--overwrite", action="store_true", help="replace the output directory if it holds an earlier bake")
    b.add_argument("--no-verify", action="store_true", help="skip reloading the checkpoint to compare logits")
    b.add_argument("--json", action="store_true", help="print the bake report as JSON")
    b.set_defaults(func=run_bake)


def run_export(args) -> int:
    from ..steer.gguf import export_gguf
    from ..steer.vector import SteeringVector

    vector = SteeringVector.load(args.vector)
    out = export_gguf(vector, args.gguf, args.scale, model_hint=args.model_hint, drop_layer0=args.drop_layer0)
    print(f"wrote {out}: control vector at scale {args.scale:g} ({len(vector.sites)} sites)")
    print(f"use it with: llama-cli -m MODEL.gguf --control-vector {out}")
    return 0


def run_import(args) -> int:
    from ..steer.gguf import import_gguf

    vector = import_gguf(args.gguf)
    out = vector.save(args.output)
    print(f"wrote {out}: {vector.method} vector at {', '.join(s.key() for s in vector.sites[:6])}"
          + (" ..." if len(vector.sites) > 6 else ""))
    return 0


def run_bake(args) -> int:
    from ..steer.bake import bake
    from ..steer.vector import SteeringVector, parse_steer_arg

    specs = [parse_steer_arg(s) for s in args.steer]
    vectors = [(SteeringVector.load(path), scale) for path, scale in specs]
    lm = load(args)
    report = bake(lm.model, lm.layout, vectors, 1.0, Path(args.output), lm.tokenizer, verify=not args.no_verify,
                  overwrite=args.overwrite, source=lm.name)
    if args.json:
        emit_json(report)
        return 0
    check = report["check"]
    diff = check.get("reload_max_abs_diff", check["in_memory_max_abs_diff"])
    print(f"wrote {report['out_dir']}: {len(report['edits'])} edits folded into biases "
          f"(max logit difference vs hooked model {diff:.2g}{'' if 'reload_max_abs_diff' in check else ', not reloaded'})")
    if report["saved_as"] != report["architecture"]:
        print(f"note: saved as {report['saved_as']} (an exact equivalent of {report['architecture']} that can hold biases)")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({report['out_dir']!r})")
    return 0
