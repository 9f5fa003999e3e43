"""Throughput of log-likelihood multiple-choice scoring: shared-prompt batching vs one sequence at a time.

Both methods score the same ARC-Easy questions with the same model in the same process; the script checks
that they agree (max |difference| of choice log-probs) and reports questions per second. The last line is
one JSON object with ``vs_one_at_a_time`` (speed-up of the batched path).

    python bench/eval_speed.py [--n 40] [--model smollm2-135m-instruct] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--n", type=int, default=40, help="questions")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--batch-tokens", type=int, default=4096)
    args = ap.parse_args(argv)

    import torch

    import steerscale
    from steerscale.measure.mc import score_choices
    from steerscale.measure.tasks import get_task

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = steerscale.load_model(args.model)
    ex = get_task(args.task).load(limit=args.n, seed=None)
    qs, chs = [e.question for e in ex], [e.choices for e in ex]
    score_choices(lm.model, lm.tokenizer, qs[:2], chs[:2])  # warm-up (allocator, kernels)

    t0 = time.perf_counter()
    batched = score_choices(lm.model, lm.tokenizer, qs, chs, max_tokens=args.batch_tokens, progress=True)
    t_batched = time.perf_counter() - t0

    t0 = time.perf_counter()
    single = [score_choices(lm.model, lm.tokenizer, [q], [[c]], method="padded")[0]["logprobs"][0]
              for q, cs in zip(qs, chs) for c in cs]
    t_single = time.perf_counter() - t0

    flat = [v for r in batched for v in r["logprobs"]]
    diff = max(abs(a - b) for a, b in zip(flat, single))
    acc_b = sum(max(range(len(r["logprobs"])), key=r["logprobs"].__getitem__) == e.gold for r, e in zip(batched, ex)) / len(ex)
    result = {
        "bench": "eval_speed", "model": args.model, "task": args.task, "questions": len(ex),
        "choices": sum(map(len, chs)), "threads": torch.get_num_threads(),
        "batched_q_per_s": round(len(ex) / t_batched, 3), "one_at_a_time_q_per_s": round(len(ex) / t_single, 3),
        "batched_s": round(t_batched, 2), "one_at_a_time_s": round(t_single, 2),
        "vs_one_at_a_time": round(t_single / t_batched, 2), "max_abs_logprob_diff": diff, "acc": acc_b,
        "vs_lm_eval": None,  # lm-eval is not installed here; see docs/evaluation.md
    }
    print(f"batched (shared prompt): {result['batched_q_per_s']} q/s; one at a time: "
          f"{result['one_at_a_time_q_per_s']} q/s; speed-up x{result['vs_one_at_a_time']}; max |diff| {diff:.2e}",
          file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
