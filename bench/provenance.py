"""Provenance-aware decoding (issue 27, item 5): how often a model repeats a flagged text verbatim with and without
the decoding-time veto, and what the veto costs in speed. One run, SmolLM2, this machine.

The flagged corpus is the model's own greedy answer (``--tokens`` tokens) to each of 16 prompts: text it is known
to produce. Then each prompt is answered again by sampling (temperature 0.7, ``--samples`` seeds), once without and
once with the veto (``generate(block=SpanIndex)``), each pair with the same seed. ``verbatim_rate_*``: the share of
sampled answers that contain a span of ``k`` (8) or more tokens of a flagged answer (Wilson 95% intervals).
``prov_decode_speed_ratio``: tokens per second of the 16 prompts as one batch with the veto / without, greedy,
``--repeats`` alternating pairs, the median ratio. ``accuracy_change``: ``--accuracy-problems`` problems of
steerscale's arithmetic generator (``measure.tasks.arith``, ``--accuracy-difficulty``), greedy, with the veto minus
without (the same flagged corpus; paired 95% interval): what blocking costs answers that have nothing to do with
the flagged texts.

    python bench/provenance.py [--tokens 48] [--samples 2] [--repeats 3] [--accuracy-problems 30]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from _common import PROMPTS, log, machine_info, paired

MORE = [
    "What is the capital of France, and why is it famous?",
    "Give two reasons why exercise is good for health.",
    "How does a refrigerator keep food cold?",
    "Write a haiku about autumn leaves.",
    "What is photosynthesis?",
    "Describe a good morning routine.",
    "Why is the sky blue?",
    "Explain what a computer program is to a child.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("-k", type=int, default=8)
    ap.add_argument("--accuracy-difficulty", type=int, default=1,
                    help="arithmetic difficulty 1-4 of the accuracy problems (measure.tasks.arith; default 1)")
    ap.add_argument("--accuracy-problems", type=int, default=30, help="its problems (0: skip; default 30)")
    ap.add_argument("--accuracy-tokens", type=int, default=64, help="new tokens per answer there (default 64)")
    args = ap.parse_args()
    load0 = round(os.getloadavg()[0], 2)
    wall0 = time.perf_counter()

    from steerscale import load_model
    from steerscale.engine.generation import generate
    from steerscale.engine.provenance import SpanIndex
    from steerscale.answers import extract_answer, same_number
    from steerscale.measure.tasks.arith import make_problems
    from steerscale.measure.stats import wilson_ci

    lm = load_model(args.model, dtype="float32")
    prompts = PROMPTS + MORE
    kw = dict(max_new_tokens=args.tokens)
    log("flagged texts: greedy answers ...")
    greedy = generate(lm.model, lm.tokenizer, lm.layout, prompts, **kw)
    corpus = SpanIndex.from_token_ids({f"answer {i}": g.token_ids for i, g in enumerate(greedy)}, k=args.k)
    log(f"corpus: {corpus.describe()}")
    hits = {"without": 0, "with": 0}
    n = 0
    for seed in range(args.samples):
        for name, block in (("without", None), ("with", corpus)):
            log(f"sampling, seed {seed}, {name} the veto ...")
            outs = generate(lm.model, lm.tokenizer, lm.layout, prompts, do_sample=True, temperature=0.7, seed=seed,
                            block=block, **kw)
            hits[name] += sum(bool(corpus.spans(o.token_ids)) for o in outs)
        n += len(prompts)
    speeds = []
    for r in range(args.repeats):
        rates = {}
        for name in (("without", "with") if r % 2 == 0 else ("with", "without")):
            t0 = time.perf_counter()
            outs = generate(lm.model, lm.tokenizer, lm.layout, prompts, min_new_tokens=args.tokens,
                            block=corpus if name == "with" else None, **kw)
            rates[name] = sum(o.n_tokens for o in outs) / (time.perf_counter() - t0)
        speeds.append(rates["with"] / rates["without"])
        log(f"speed pair {r}: with {rates['with']:.1f} tok/s, without {rates['without']:.1f} tok/s")
    speeds.sort()
    accuracy = None
    if args.accuracy_problems:
        problems = make_problems(args.accuracy_problems, seed=0, difficulty=args.accuracy_difficulty)
        right = {}
        for name in ("without", "with"):
            log(f"arithmetic: {len(problems)} problems, greedy, {name} the veto ...")
            outs = generate(lm.model, lm.tokenizer, lm.layout, [p.question for p in problems],
                            max_new_tokens=args.accuracy_tokens, block=corpus if name == "with" else None)
            right[name] = [float(same_number(extract_answer(o.text), p.answer)) for p, o in zip(problems, outs)]
        accuracy = {"task": f"arith:difficulty{args.accuracy_difficulty}", "problems": len(problems),
                    "without": round(sum(right["without"]) / len(problems), 4),
                    "with": round(sum(right["with"]) / len(problems), 4),
                    "with_minus_without": paired(right["without"], right["with"])}
    ci = {name: wilson_ci(h, n) for name, h in hits.items()}
    print(f"provenance-aware decoding, {args.model}: {len(prompts)} prompts x {args.samples} sampled answers, "
          f"k={args.k}, flagged corpus = the model's greedy answers ({corpus.n_tokens} tokens)")
    for name in ("without", "with"):
        e = ci[name]
        print(f"  {name:8s} the veto: {hits[name]:3d} / {n} answers repeat a flagged span "
              f"({e.mean:.2f}, 95% CI [{e.lo:.2f}, {e.hi:.2f}])")
    print(f"  speed, batch of {len(prompts)} greedy, with / without: {[round(s, 3) for s in speeds]} "
          f"(median {speeds[len(speeds) // 2]:.3f})")
    if accuracy:
        print(f"  {accuracy['task']}, {accuracy['problems']} problems greedy: accuracy {accuracy['without']:.3f} "
              f"without the veto, {accuracy['with']:.3f} with; difference {accuracy['with_minus_without']}")
    print(json.dumps({
        "bench": "provenance", "model": args.model, "prompts": len(prompts), "samples_per_prompt": args.samples,
        "k": args.k, "corpus": corpus.describe(), "answers": n,
        "verbatim_rate_without": round(ci["without"].mean, 3),
        "verbatim_rate_without_ci": [round(ci["without"].lo, 3), round(ci["without"].hi, 3)],
        "verbatim_rate_with": round(ci["with"].mean, 3),
        "verbatim_rate_with_ci": [round(ci["with"].lo, 3), round(ci["with"].hi, 3)],
        "prov_decode_speed_ratio": round(speeds[len(speeds) // 2], 3), "speed_ratios": [round(s, 3) for s in speeds],
        "accuracy_change": accuracy and accuracy["with_minus_without"]["diff"], "accuracy": accuracy,
        "wall_s": round(time.perf_counter() - wall0, 1), "loadavg_1m_at_start": load0,
        "machine": machine_info()}))


if __name__ == "__main__":
    main()
