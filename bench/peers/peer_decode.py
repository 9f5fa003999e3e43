"""Decode throughput of the peer libraries with a steering vector at every layer (runs in the peer venv).

    python bench/peers/peer_decode.py --model-dir DIR --prompts prompts.json --vectors vec.safetensors \
        [--batch-sizes 1,8] [--new-tokens 128] [--reps 5] [--scale 1.0] [--libraries repeng,steering-vectors]

Conditions, interleaved within each repetition (order rotated every rep): ``plain`` (the unwrapped model, no
hooks), ``repeng`` (``ControlModel`` wrapping every block, ``set_control`` with the vector) and
``steering-vectors`` (``SteeringVector.apply(model)``, all tokens). Generation: greedy, KV cache,
``min_new_tokens = max_new_tokens`` so every run makes exactly that many tokens. The set-up of each
library (wrapping / hook registration) is inside the timed region, as steerscale's ``intervene`` is.

With ``--step-pairs N``, also the per-step overhead: N alternating single decode steps, plain and steered, each
timed by CPU time with the steering attached outside the timed region (see ``_peer_common.decode_step_pairs``).

Last stdout line: JSON ``{"results": {"b1": {"plain": {...}, "repeng": {...}, ...}}, "ratios": {...}}``;
a ratio is the median over reps of (steered tokens/s) / (plain tokens/s) of the same rep.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import _peer_common as pc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of already formatted prompts")
    ap.add_argument("--vectors", required=True, help="safetensors with tensors layer.<i> (output of block i)")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--libraries", default="repeng,steering-vectors")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--step-pairs", type=int, default=0, help="also time N alternating single decode steps (CPU time)")
    args = ap.parse_args()
    pc.set_threads(args.threads)

    from repeng import ControlModel, ControlVector
    from steering_vectors import SteeringVector

    model, tok = pc.load_model(args.model_dir)
    prompts = json.loads(Path(args.prompts).read_text())
    vectors = {int(k.split(".")[1]): v.float() for k, v in load_file(args.vectors).items()}
    layers = sorted(vectors)
    libs = [x for x in args.libraries.split(",") if x]

    cv = ControlVector(model_type=model.config.model_type, directions={i: vectors[i].numpy().astype(np.float32) for i in layers})
    sv = SteeringVector({i: vectors[i] for i in layers}, "decoder_block")

    def gen(inputs, n):
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                             pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
        return out.shape[1] - inputs["input_ids"].shape[1]

    def run(cond, inputs, n):
        if cond == "plain":
            return gen(inputs, n)
        if cond == "repeng":
            cm = ControlModel(model, layers)  # wraps the blocks in place
            try:
                cm.set_control(cv, coeff=args.scale)
                out = cm.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                                  pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
                return out.shape[1] - inputs["input_ids"].shape[1]
            finally:
                cm.unwrap()
        if cond == "steering-vectors":
            with sv.apply(model, multiplier=args.scale):
                return gen(inputs, n)
        raise ValueError(cond)

    conds = ["plain"] + libs

    # attach/detach pairs for the per-step measurement (outside the timed region)
    state = {}

    def repeng_attach():
        state["cm"] = ControlModel(model, layers)
        state["cm"].set_control(cv, coeff=args.scale)

    def sv_attach():
        state["h"] = sv.patch_activations(model, multiplier=args.scale, min_token_index=0)

    attachers = {"repeng": (repeng_attach, lambda: state.pop("cm").unwrap()),
                 "steering-vectors": (sv_attach, lambda: state.pop("h").remove())}
    results, ratios = {}, {}
    with torch.no_grad():
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            batch = (prompts * ((bs + len(prompts) - 1) // len(prompts)))[:bs]
            inputs = tok(batch, return_tensors="pt", padding=True)
            for c in conds:  # warm-up
                run(c, inputs, 8)
            tps = {c: [] for c in conds}  # tokens per wall second
            cps = {c: [] for c in conds}  # tokens per CPU second of this process
            for rep in range(args.reps):
                order = conds[rep % len(conds):] + conds[: rep % len(conds)]
                for c in order:
                    c0 = time.process_time()
                    with pc.Timer() as t:
                        n = run(c, inputs, args.new_tokens)
                    cpu = time.process_time() - c0
                    assert n == args.new_tokens, (c, n)
                    tps[c].append(bs * n / t.seconds)
                    cps[c].append(bs * n / cpu)
                pc.log(f"[peer decode] b{bs} rep {rep + 1}/{args.reps}: "
                       + ", ".join(f"{c} {tps[c][-1]:.1f} tok/s ({cps[c][-1]:.1f} per CPU s)" for c in conds))
            key = f"b{bs}"
            results[key] = {c: {"tokens_per_s": tps[c], "median_tokens_per_s": pc.median(tps[c]),
                                "tokens_per_cpu_s": cps[c]} for c in conds}
            for c in libs:
                paired = [s / p for s, p in zip(tps[c], tps["plain"])]
                paired_cpu = [s / p for s, p in zip(cps[c], cps["plain"])]
                results[key][c]["paired_ratios"] = paired
                results[key][c]["paired_cpu_ratios"] = paired_cpu
                ratios[f"{c.replace('-', '_')}_{key}"] = pc.median(paired)
                ratios[f"{c.replace('-', '_')}_cpu_{key}"] = pc.median(paired_cpu)
                if args.step_pairs:
                    attach, detach = attachers[c]
                    step = pc.decode_step_pairs(model, dict(inputs), attach, detach, args.step_pairs)
                    results[key][c]["step"] = step
                    ratios[f"{c.replace('-', '_')}_step_{key}"] = step["ratio"]
                    pc.log(f"[peer decode] b{bs} {c}: per-step CPU {step['plain_ms']:.2f} -> {step['steered_ms']:.2f} ms, ratio {step['ratio']:.4f}")
    import transformers

    pc.emit({"results": results, "ratios": ratios, "new_tokens": args.new_tokens, "reps": args.reps,
             "layers": layers, "scale": args.scale, "torch_threads": torch.get_num_threads(),
             "transformers": transformers.__version__, "torch": torch.__version__})


if __name__ == "__main__":
    main()
