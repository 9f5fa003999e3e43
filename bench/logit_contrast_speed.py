"""Decoding speed under an early-layer logit contrast (DoLa / VISTA) relative to plain decoding, same run.

Greedy ``generate`` of ``--tokens`` new tokens (EOS suppressed, so every configuration decodes the same number) at
batch 1 and batch 8 on SmolLM2-135M-Instruct, plain vs each contrast; configurations interleaved per repeat and the
median of ``--repeats`` taken, so a loaded machine slows them alike. The contrast reads every candidate block's
output through the final norm and the LM head at each step: ``dola:high`` has 7 candidates on a 30-block model, so
it runs the LM head 8 times per token instead of once. Last line: one JSON object.

    python bench/logit_contrast_speed.py                 # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import steerscale
from steerscale.engine.generation import generate

PROMPTS = ["Tell me about the history of tea.", "How do airplanes fly?", "What is a prime number?",
           "Describe a sunset.", "Why is the sky blue?", "Give me a tip for studying.", "What do cats eat?",
           "Explain gravity simply."]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--contrasts", default="dola:high;dola:15;vista:high,weight=0.5")
    args = ap.parse_args(argv)
    lm = steerscale.load_model(args.model)
    configs = [None] + [c for c in args.contrasts.split(";") if c]
    out = {}
    for batch in (1, 8):
        prompts = PROMPTS[:batch]
        times = {c: [] for c in configs}
        generate(lm.model, lm.tokenizer, lm.layout, prompts, max_new_tokens=4)  # warm-up
        for _ in range(args.repeats):
            for c in configs:
                t = time.perf_counter()
                generate(lm.model, lm.tokenizer, lm.layout, prompts, max_new_tokens=args.tokens,
                         min_new_tokens=args.tokens, logit_contrast=c)
                times[c].append(time.perf_counter() - t)
        base = statistics.median(times[None])
        for c in configs[1:]:
            ratio = base / statistics.median(times[c])
            out[f"{c} batch{batch}"] = round(ratio, 3)
            print(f"batch {batch}: {c:28s} speed vs plain {ratio:.3f}  (plain {base:.2f} s, "
                  f"{statistics.median(times[c]):.2f} s for {args.tokens} tokens)", flush=True)
    print(json.dumps({"speed_vs_plain": out, "tokens": args.tokens, "repeats": args.repeats,
                      "threads": torch.get_num_threads()}))
    return out


if __name__ == "__main__":
    main()
