"""Unsteered baselines on every registered benchmark task, with 95% bootstrap intervals (issue 3, section 5).

Each task runs through ``steerscale.measure.evaluate`` (the same path as ``steerscale eval``), so every row is a
resumable, config-hashed run directory under ``--out``: rerunning the script skips finished examples, and a
larger ``--scale`` only scores the new ones. The limits per task (``PLANS``) are what fits a 2-core CPU; the
full set size is printed beside each limit, and ``--full`` drops the limits.

    python bench/baselines.py --model smollm2-135m-instruct --out runs/baselines
    python bench/baselines.py --model gemma3-270m --plan mc --scale 0.5

Writes ``OUT/baselines_<model>.md`` (a Markdown table) and prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# (task, limit, evaluate() keyword arguments). Limits keep a CPU run near half an hour per plan.
PLANS = {
    "mc": [
        ("arc_easy", 570, {}), ("arc_challenge", 299, {}), ("truthfulqa_mc1", 817, {}),
        ("truthfulqa_mc2", 817, {}), ("openbookqa", 500, {}), ("hellaswag", 500, {}), ("boolq", 500, {}),
        ("piqa", 500, {}), ("sciq", 500, {}),
    ],
    "generate": [
        ("gsm8k", 64, {}), ("math500", 64, {"max_new_tokens": 384}), ("triviaqa", 200, {"max_new_tokens": 32}),
        ("naturalqs", 200, {"max_new_tokens": 32}), ("gym:basic_arithmetic:100", 100, {}),
        ("gym:chain_sum:100", 100, {}), ("gym:countdown:50", 50, {}),
    ],
}
PLANS["all"] = PLANS["mc"] + PLANS["generate"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--plan", default="all", choices=sorted(PLANS))
    ap.add_argument("--tasks", default=None, help="comma-separated subset of the plan's task names")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every limit (e.g. 0.25 for a quick look)")
    ap.add_argument("--full", action="store_true", help="no limits: whole sets (hours on a CPU)")
    ap.add_argument("--out", default="runs/baselines")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from steerscale import load_model
    from steerscale.measure import evaluate
    from steerscale.measure.tasks import get_task

    plan = PLANS[args.plan]
    if args.tasks:
        wanted = {t.strip() for t in args.tasks.split(",")}
        plan = [p for p in plan if p[0] in wanted]
    lm = load_model(args.model)
    rows, results = [], {}
    for name, limit, kwargs in plan:
        task = get_task(name)
        try:
            size = len(task.load())
        except Exception as exc:  # a data package missing: say so in the table, keep going
            print(f"{name}: cannot load ({exc})", file=sys.stderr, flush=True)
            rows.append(f"| {name} | - | - | not run: {exc} |")
            continue
        n = size if args.full else max(1, min(size, int(round(limit * args.scale))))
        t0 = time.time()
        res = evaluate(lm, task, limit=n, outdir=args.out, progress=True, **kwargs)
        seconds = time.time() - t0
        s = res.summary
        primary, score = s["primary"], s["score"]
        others = "; ".join(f"{k} {v['mean']:.3f}" for k, v in s["metrics"].items()
                           if k != primary and isinstance(v, dict) and "mean" in v)
        line = (f"| {name} | {n} of {size} | {primary} | {score['mean']:.3f} [{score['lo']:.3f}, {score['hi']:.3f}] | "
                f"{others} | {s.get('n_failed', 0)} | {seconds:.0f} |")
        rows.append(line)
        results[name] = {"n": n, "size": size, "metric": primary, **{k: score[k] for k in ("mean", "lo", "hi")},
                         "failed": s.get("n_failed", 0), "seconds": round(seconds, 1)}
        print(line, flush=True)
    header = ["| task | N (of set) | metric | score [95% CI] | other metrics | failed | seconds (cached: ~0) |",
              "|---|---|---|---|---|---|---|"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"baselines_{args.model.replace('/', '_')}.md").write_text("\n".join(header + rows) + "\n")
    print("\n".join(header + rows))
    print(json.dumps({"model": args.model, "plan": args.plan, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
