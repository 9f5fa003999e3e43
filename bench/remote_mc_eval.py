"""Multiple-choice accuracy scored locally and on a real ``vllm serve``: the same questions, the same prompt formatting
and metrics, log-likelihoods from steerscale's packed local scorer vs from vLLM's echoed prompt log-probs
(``OpenAIBackend.loglikelihood``, what ``steerscale eval --backend-url`` uses without ``--strategy``). One run.

    .venv/bin/python bench/remote_mc_eval.py [--task arc_easy] [--limit 20] [--model smollm2-135m-instruct]

Runs with the main venv's python; only the server runs in the vLLM venv (``.venv-vllm/bin/python -m
vllm.entrypoints.openai.api_server --model DIR --dtype float32 --enforce-eager ...``, started here as a subprocess
and stopped at the end; its log goes to a temporary folder, whose tail is printed if it fails). The local run goes
first, before the server starts, so the two never share the 2 cores. Both sides in float32; the model directory is
``checkpoint_dir(MODEL)`` and the client formats prompts with the same tokenizer's chat template.

Printed: both accuracies (``acc``, plus ``acc_norm``), the questions whose predicted choice differs, the largest
difference of a choice's summed log-prob, the choices whose token counts differ (the server tokenizes context +
choice in one piece, the local scorer each apart), the seconds each side took; last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path



def argmax(xs):
    return max(range(len(xs)), key=xs.__getitem__)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-model-len", type=int, default=1024)
    args = ap.parse_args()
    from steerscale.vllm.server import start_vllm, vllm_python

    if vllm_python() is None:
        raise SystemExit("no vLLM venv (build it with scripts/make_vllm_venv.sh)")

    import torch

    from steerscale import load_model
    from steerscale.measure.runs import evaluate
    from steerscale.models.loading import checkpoint_dir
    from steerscale.scale.remote import OpenAIBackend

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="remote_mc_eval-"))
    common = dict(limit=args.limit, outdir=tmp / "runs", progress=False, resume=False)

    lm = load_model(args.model, dtype="float32")
    t0 = time.perf_counter()
    loc = evaluate(lm, args.task, **common)
    local_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    server = start_vllm(str(checkpoint_dir(args.model)), name=args.model, log=tmp / "vllm.log",
                        max_model_len=args.max_model_len)
    start_s = time.perf_counter() - t0
    try:
        backend = OpenAIBackend(server.url, args.model, tokenizer=lm.tokenizer, timeout=300, max_n=16)
        t0 = time.perf_counter()
        rem = evaluate(None, args.task, backend=backend, **common)
        remote_s = time.perf_counter() - t0
    finally:
        server.stop()

    by_id = {r["id"]: r for r in rem.records}
    rows, max_diff, token_diffs, n_choices = [], 0.0, 0, 0
    for r in loc.records:
        q = by_id[r["id"]]
        lo, ro = r["output"], q["output"]
        diff = max(abs(a - b) for a, b in zip(lo["logprobs"], ro["logprobs"]))
        max_diff = max(max_diff, diff)
        token_diffs += sum(a != b for a, b in zip(lo["n_tokens"], ro["n_tokens"]))
        n_choices += len(lo["n_tokens"])
        rows.append({"id": r["id"], "gold": r["gold"], "local": argmax(lo["logprobs"]), "vllm": argmax(ro["logprobs"]),
                     "max_logprob_diff": diff})
    differ = [x for x in rows if x["local"] != x["vllm"]]
    ls, rs = loc.summary, rem.summary
    print(f"{args.task}, {len(rows)} questions, {args.model} (float32)")
    print(f"{'':10s} {'acc':>6s} {'acc_norm':>9s} {'seconds':>8s}")
    for name, s, secs in (("local", ls, local_s), ("vllm", rs, remote_s)):
        print(f"{name:10s} {s['metrics']['acc']['mean']:6.3f} {s['metrics']['acc_norm']['mean']:9.3f} {secs:8.1f}")
    print(f"predictions that differ: {len(differ)} {[d['id'] for d in differ]}")
    print(f"largest |local - vllm| summed log-prob of a choice: {max_diff:.2e}; choices with other token counts: "
          f"{token_diffs} of {n_choices}; vllm start {start_s:.1f} s")
    print(json.dumps({
        "task": args.task, "model": args.model, "n": len(rows),
        "local_acc": ls["metrics"]["acc"]["mean"], "vllm_acc": rs["metrics"]["acc"]["mean"],
        "local_acc_norm": ls["metrics"]["acc_norm"]["mean"], "vllm_acc_norm": rs["metrics"]["acc_norm"]["mean"],
        "prediction_differences": len(differ), "max_logprob_diff": max_diff,
        "token_count_differences": token_diffs, "n_choices": n_choices,
        "local_s": round(local_s, 1), "vllm_start_s": round(start_s, 1), "vllm_s": round(remote_s, 1),
        "wall_s": round(time.perf_counter() - t_start, 1)}))


if __name__ == "__main__":
    main()
