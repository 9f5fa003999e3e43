"""``steerscale experts``: which MoE experts a behaviour uses, and a router steering vector toward or away from them."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import SteerscaleError
from .common import add_model_args, emit_json, load, read_prompts  # noqa: F401 (read_prompts: tests)

EPILOG = """\
examples:
  steerscale experts -m allenai/OLMoE-1B-7B-0924-Instruct --positive code.txt --negative prose.txt
  steerscale experts -m allenai/OLMoE-1B-7B-0924-Instruct --positive code.txt --negative prose.txt --plot e.png
  steerscale experts -m allenai/OLMoE-1B-7B-0924-Instruct --positive code.txt --negative prose.txt --layers 8 --json
  steerscale experts -m allenai/OLMoE-1B-7B-0924-Instruct --positive code.txt --negative prose.txt -o code.safetensors
  steerscale generate -m allenai/OLMoE-1B-7B-0924-Instruct -p "Tell me about rivers" --steer code.safetensors:1

Prompt files: plain text, one prompt per line (blank lines skipped), or .jsonl with one object a line whose "text",
"instruction" or "prompt" field is the prompt. The chat template is applied to each prompt when the tokenizer has
one (--no-chat: as written). diff is the positive set's usage minus the negative set's: the fraction of tokens
whose top-k routing selects the expert. -o writes +BIAS (--bias, default 2) on the --top K (default 2)
(layer, expert) pairs the positive set uses more (--away: -BIAS on the same experts; to boost the negative set's
experts, swap the files). Apply it like any vector (steerscale generate --steer VEC:SCALE; the scale multiplies the
logit biases). Needs an MoE model.
"""



def register(sub) -> None:
    p = sub.add_parser("experts", description="Compare MoE expert usage between a positive and a negative prompt set; "
                                              "optionally write a router steering vector.", epilog=EPILOG)
    add_model_args(p)
    p.add_argument("--positive", required=True, metavar="FILE", help="prompts showing the behaviour (.txt or .jsonl)")
    p.add_argument("--negative", required=True, metavar="FILE", help="prompts without it (.txt or .jsonl)")
    p.add_argument("--layers", default="all", help="MoE layers to read: all, N, A-B or A,B,C (default: all)")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template to the prompts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--show", type=int, default=10, metavar="N", help="rows of the table, largest |diff| first "
                                                                    "(default 10)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a layer x expert heatmap of diff")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    v = p.add_argument_group("router steering vector")
    v.add_argument("-o", "--output", default=None, metavar="VEC.safetensors", help="write a router steering vector")
    v.add_argument("--top", type=int, default=2, metavar="K",
                   help="number of (layer, expert) pairs the vector biases (default 2)")
    v.add_argument("--bias", type=float, default=2.0, metavar="B", help="router-logit bias magnitude (default 2.0)")
    v.add_argument("--away", action="store_true", help="bias the positive set's experts by -B instead of +B")
    p.set_defaults(func=run)


def check_args(args) -> None:
    """What can be refused before a model loads."""
    if args.output and Path(args.output).suffix not in ("", ".safetensors"):
        from ..steer.controls import CONTROLS

        why, fix = CONTROLS["router"].gguf_problem() or ("it is written as .safetensors", "use a .safetensors path")
        raise SteerscaleError(f"-o {args.output}: a router vector is written as .safetensors ({why})", fix)
    if args.top < 1:
        raise SteerscaleError(f"--top must be at least 1, got {args.top}")
    if not (math.isfinite(args.bias) and args.bias > 0):
        raise SteerscaleError(f"--bias must be a finite positive number, got {args.bias}", "--away makes it negative")
    if args.show < 0 or args.batch_size < 1:
        raise SteerscaleError("--show must be >= 0 and --batch-size >= 1")


def format_table(rows: list[dict]) -> str:
    """The contrast rows as aligned text columns."""
    lines = [f"{'layer':>5} {'expert':>6} {'usage+':>7} {'usage-':>7} {'diff':>8}"]
    lines += [f"{r['layer']:>5} {r['expert']:>6} {r['usage_pos']:>7.3f} {r['usage_neg']:>7.3f} {r['diff']:>+8.3f}"
              for r in rows]
    return "\n".join(lines)


def report(lm, args, positive: list[str], negative: list[str]) -> dict:
    """Contrast, plot and vector for a loaded model (``run`` without the loading; tests call it on a tiny model)."""
    from ..engine.generation import format_prompt
    from ..steer.router import expert_contrast, expert_usage, router_vector_from_contrast

    chat = False if args.no_chat else None
    pos = [format_prompt(lm.tokenizer, t, chat) for t in positive]
    neg = [format_prompt(lm.tokenizer, t, chat) for t in negative]
    contrast = expert_contrast(lm.model, lm.tokenizer, lm.layout, pos, neg, args.layers, args.batch_size)
    table = contrast.table()
    out = {"model": lm.name, "layers": contrast.layers, "n_experts": contrast.n_experts,
           "n_prompts": [len(pos), len(neg)], "n_tokens": [contrast.n_tokens_pos, contrast.n_tokens_neg],
           "top": table[: args.show]}
    if args.plot:
        contrast.plot(args.plot, f"{lm.name}: expert usage, positive - negative")
        out["plot"] = str(args.plot)
    if args.output:
        vector = router_vector_from_contrast(lm.layout, contrast, args.top, args.bias, args.away, lm.name)
        path = vector.save(args.output)
        chosen = vector.metadata["contrast"]["chosen"]
        # The same prompts under the vector at scale 1: does the bias move the routing it targets?
        steered = expert_usage(lm.model, lm.tokenizer, lm.layout, pos if args.away else neg, contrast.layers,
                               args.batch_size, interventions=vector.interventions(1.0, layout=lm.layout))
        for row in chosen:
            row["steered_usage"] = round(float(steered[row["layer"]][row["expert"]]), 4)
        out["vector"] = {"path": str(path), "bias": -args.bias if args.away else args.bias,
                         "steered_set": "positive" if args.away else "negative", "chosen": chosen}
    return out


def run(args) -> int:
    check_args(args)
    positive, negative = read_prompts(args.positive), read_prompts(args.negative)
    lm = load(args)
    out = report(lm, args, positive, negative)
    if args.json:
        emit_json(out)
        return 0
    print(f"{out['model']}: expert usage over {out['n_tokens'][0]} positive / {out['n_tokens'][1]} negative tokens, "
          f"layers {out['layers'][0]}..{out['layers'][-1]}, {out['n_experts']} experts per layer")
    print(format_table(out["top"]))
    if "plot" in out:
        print(f"wrote {out['plot']}")
    if "vector" in out:
        vec = out["vector"]
        print(f"wrote {vec['path']}: router bias {vec['bias']:+g} at "
              + ", ".join(f"layer {r['layer']} expert {r['expert']}" for r in vec["chosen"]))
        for r in vec["chosen"]:
            before = r["usage_pos"] if vec["steered_set"] == "positive" else r["usage_neg"]
            print(f"  layer {r['layer']} expert {r['expert']}: usage on the {vec['steered_set']} prompts "
                  f"{before:.3f} -> {r['steered_usage']:.3f} with the vector at scale 1")
        print(f"apply it with: steerscale generate -m {args.model} -p 'Hello' --steer {vec['path']}:1")
    return 0
