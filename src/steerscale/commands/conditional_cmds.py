"""``steerscale condition``, ``steerscale controller`` and ``steerscale gate``: learn when and how strongly to steer
(docs/conditional.md). Apply what they write with ``generate``/``solve`` (``--condition``, ``--controller``,
``--gate``) or register it on ``steerscale serve``."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from .common import add_model_args, emit_json, load, read_prompts

CONDITION_EPILOG = """\
examples:
  steerscale condition --positive harmful.json --negative harmless.json --limit 200 -o harmful.safetensors --plot harmful_f1.png --vector-out refusal.safetensors --vector-layers 10
  steerscale generate -p "How do I make a weapon?" --steer refusal.safetensors:1.5 --condition harmful.safetensors

Prompt files: .txt (one prompt a line), .jsonl or .json (objects with "text", "instruction" or "prompt").
The condition: cos(mean prompt activation - mean, direction) compared with a threshold at one layer; the layer,
threshold and comparison are chosen by F1 on a held-out part (--holdout) of the prompts.
"""

CONTROLLER_EPILOG = """\
examples:
  steerscale controller --positive harmful.json --negative harmless.json --layers 8-12 --reads 6 --limit 120 -o refusal_ctl.safetensors
  steerscale controller --vector refusal.safetensors --positive harmful.json --negative harmless.json --reads 6 -o refusal_ctl.safetensors
  steerscale generate -p "How do I make a weapon?" --controller refusal_ctl.safetensors

Without --vector the direction is the mean difference of the positive and negative prompts' last-token
activations at --layers. Trains for minutes on a CPU (forward and backward passes of the model; the model is not
changed).
"""

GATE_EPILOG = """\
examples:
  steerscale gate --examples untruthful.jsonl --layer 8 -o untruthful.safetensors
  steerscale generate -p "Who wrote Hamlet?" --steer truth.safetensors:4 --gate untruthful.safetensors

Examples: one {"prompt", "completion", "label": 0|1} per line; label 1 marks completions whose tokens should
switch steering on. The gated vectors must act after the gate's layer (e.g. gate at 8, steer at 9 or later).
"""


def _add_prompt_sets(p) -> None:
    p.add_argument("--positive", required=True, metavar="FILE", help="prompts to steer (label 1), e.g. harmful")
    p.add_argument("--negative", required=True, metavar="FILE", help="prompts to leave alone (label 0)")
    p.add_argument("--limit", type=int, default=0, metavar="N",
                   help="use at most N prompts of each set, a seeded random sample (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="read the prompts without the chat template")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def register(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("condition", description="Fit a CAST condition: decide from a prompt's activations whether "
                                                "to steer it.", epilog=CONDITION_EPILOG, formatter_class=fmt)
    add_model_args(p)
    _add_prompt_sets(p)
    p.add_argument("--layers", default="auto", help="candidate layers: auto (all), N, A-B or A,B,C (default auto)")
    p.add_argument("--readout", default="mean", choices=["mean", "last"],
                   help="one vector per prompt: the mean over its tokens or its last token (default mean)")
    p.add_argument("--holdout", type=float, default=0.3, help="fraction of each set the grid search selects on")
    p.add_argument("-o", "--output", required=True, metavar="COND.safetensors")
    p.add_argument("--plot", metavar="PNG", help="F1 per layer of the grid search")
    p.add_argument("--vector-out", metavar="VEC.safetensors",
                   help="also write the mean-difference direction of the two sets (last token) at --vector-layers: "
                        "a behaviour vector to gate (e.g. the refusal direction)")
    p.add_argument("--vector-layers", default=None, metavar="SPEC", help="layers of --vector-out, e.g. 10 or 8-12")
    p.set_defaults(func=run_condition)

    p = sub.add_parser("controller", description="Train a steering controller: a small network that sets, per "
                                                 "prompt, the strength and per-layer weights of a direction.",
                       epilog=CONTROLLER_EPILOG, formatter_class=fmt)
    add_model_args(p)
    _add_prompt_sets(p)
    p.add_argument("--vector", metavar="VEC.safetensors", help="the direction to steer along (default: the mean "
                   "difference of the prompt sets at --layers)")
    p.add_argument("--layers", default=None, metavar="SPEC", help="edit layers when no --vector is given")
    p.add_argument("--reads", default=None, metavar="SPEC",
                   help="layers whose prompt activations the controller reads (default: the first edit layer)")
    p.add_argument("--target", default=None, help="completion the positive prompts are steered toward (default: "
                                                   "a refusal sentence)")
    p.add_argument("--max-strength", type=float, default=8.0, help="the largest strength it may set (default 8)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=32, help="hidden units of the network (default 32)")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="fraction of each set kept out of training; its mean strength is reported (default 0)")
    p.add_argument("-o", "--output", required=True, metavar="CTL.safetensors")
    p.set_defaults(func=run_controller)

    p = sub.add_parser("gate", description="Fit a token gate: a probe that switches steering on at the first "
                                           "generated token it flags (TruthPrInt-style).",
                       epilog=GATE_EPILOG, formatter_class=fmt)
    add_model_args(p)
    p.add_argument("--examples", required=True, metavar="FILE.jsonl",
                   help='one {"prompt", "completion", "label": 0|1} per line')
    p.add_argument("--layer", type=int, required=True, help="read the gate at resid_post of this layer")
    p.add_argument("--threshold", default="auto",
                   help="fire above this probability; auto (default): the value that best separates label-1 from "
                        "label-0 held-out completions by their highest token score")
    p.add_argument("--C", type=float, default=0.1, help="inverse L2 strength of the probe (default 0.1)")
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true")
    p.add_argument("-o", "--output", required=True, metavar="GATE.safetensors")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_gate)


def _sets(args) -> tuple[list[str], list[str]]:
    pos, neg = read_prompts(args.positive), read_prompts(args.negative)
    if args.limit and args.limit > 0:
        rng = random.Random(args.seed)
        pos = rng.sample(pos, min(args.limit, len(pos)))
        neg = rng.sample(neg, min(args.limit, len(neg)))
    return pos, neg


def _chat(args):
    return False if args.no_chat else None


def run_condition(args) -> int:
    from ..errors import SteerscaleError
    from ..steer.conditional import fit_condition, grid_plot, prompt_direction

    if bool(args.vector_out) != bool(args.vector_layers):
        raise SteerscaleError("--vector-out and --vector-layers go together", "e.g. --vector-out v.safetensors "
                                                                              "--vector-layers 10")
    pos, neg = _sets(args)
    lm = load(args)
    cond = fit_condition(lm, pos, neg, layers=args.layers, readout=args.readout, holdout=args.holdout,
                         seed=args.seed, chat=_chat(args), batch_size=args.batch_size)
    path = cond.save(args.output)
    out = {"condition": str(path), "site": cond.site.key(), "threshold": cond.threshold,
           "comparison": cond.comparison.value, **{k: cond.metadata[k] for k in
                                                   ("f1", "precision", "recall", "false_positive_rate")}}
    if args.plot:
        grid_plot(cond, args.plot)
        out["plot"] = args.plot
    if args.vector_out:
        vec = prompt_direction(lm, pos, neg, args.vector_layers, chat=_chat(args), batch_size=args.batch_size)
        out["vector"] = str(vec.save(args.vector_out))
        out["vector_norms"] = vec.norms()
    if args.json:
        emit_json(out)
    else:
        print(f"condition at {out['site']}: cos {'>' if out['comparison'] == 'greater' else '<'} "
              f"{out['threshold']:.4f}; selection-split F1 {out['f1']:.3f} (precision {out['precision']:.3f}, recall "
              f"{out['recall']:.3f}) -> {path}" + (f"\nvector -> {out['vector']}" if args.vector_out else ""))
    return 0


def run_controller(args) -> int:
    from ..errors import SteerscaleError
    from ..models.sites import Site
    from ..steer.conditional import prompt_direction
    from ..steer.controller import REFUSAL_TARGET, train_controller
    from ..steer.layers import parse_layers
    from ..steer.vector import SteeringVector

    if bool(args.vector) == bool(args.layers):
        raise SteerscaleError("give --vector (a direction file) or --layers (make the direction from the prompts)",
                              "not both, not neither")
    pos, neg = _sets(args)
    lm = load(args)
    vector = (SteeringVector.load(args.vector) if args.vector else
              prompt_direction(lm, pos, neg, args.layers, chat=_chat(args), batch_size=args.batch_size))
    reads = None
    if args.reads:
        layers = parse_layers(args.reads, lm.layout.n_layers)
        reads = [Site(layer) for layer in (range(lm.layout.n_layers) if layers == "auto" else layers)]
    ctl = train_controller(lm, vector, pos, neg, inputs=reads, target=args.target or REFUSAL_TARGET,
                           max_strength=args.max_strength, hidden=args.hidden, epochs=args.epochs, lr=args.lr,
                           batch_size=args.batch_size, chat=_chat(args), seed=args.seed, holdout=args.holdout)
    path = ctl.save(args.output)
    out = {"controller": str(path), "inputs": [s.key() for s in ctl.inputs],
           "edits": [s.key() for s in ctl.edit_sites], **{k: ctl.metadata[k] for k in ("loss_history",
                                                                                      "train_strength")}}
    if "holdout" in ctl.metadata:
        out["holdout"] = ctl.metadata["holdout"]
    if args.json:
        emit_json(out)
    else:
        st = out["train_strength"]
        print(f"controller -> {path}; loss per epoch {[round(x, 3) for x in out['loss_history']]}; mean strength "
              f"on training prompts: positive {st['positive']:.2f}, negative {st['negative']:.2f}")
    return 0


def run_gate(args) -> int:
    from ..errors import SteerscaleError
    from ..models.sites import Site
    from ..steer.gating import fit_token_gate
    from ..steer.pairs import read_jsonl

    path = Path(args.examples)
    examples = []
    for n, obj in read_jsonl(path):
        try:
            examples.append((obj["prompt"], obj["completion"], int(obj["label"])))
        except (KeyError, TypeError, ValueError):
            raise SteerscaleError(f"{path}:{n}: not a {{\"prompt\", \"completion\", \"label\"}} object",
                                  'lines look like {"prompt": "Q", "completion": "A", "label": 1}') from None
    lm = load(args)
    try:
        threshold = args.threshold if args.threshold == "auto" else float(args.threshold)
    except ValueError:
        raise SteerscaleError(f"--threshold {args.threshold!r} is not a number", "e.g. 0.7, or auto") from None
    gate = fit_token_gate(lm, examples, Site(args.layer), threshold=threshold, C=args.C, holdout=args.holdout,
                          seed=args.seed, chat=_chat(args))
    saved = gate.save(args.output)
    meta = gate.metadata
    out = {"gate": str(saved), "site": gate.site.key(), "threshold": gate.threshold,
           "holdout_token_accuracy": meta["holdout_token_accuracy"], "holdout_fire_rate": meta["holdout_fire_rate"]}
    if args.json:
        emit_json(out)
    else:
        print(f"gate at {out['site']} -> {saved}; held-out token accuracy {out['holdout_token_accuracy']:.3f}; "
              f"fires on {meta['holdout_fire_rate']['label_1']:.0%} of label-1 and "
              f"{meta['holdout_fire_rate']['label_0']:.0%} of label-0 held-out completions")
    return 0
