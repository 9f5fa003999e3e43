"""Throughput of log-likelihood multiple-choice scoring: shared-prompt batching vs one sequence at a time.

Both methods score the same ARC-Easy questions with the same model in the same process; the script checks
that they agree (max |difference| of choice log-probs) and reports questions per second. The last line is
one JSON object with ``vs_one_at_a_time`` (speed-up of the batched path) and, when lm-eval is installed,
``vs_lm_eval``: the same questions as an lm-eval task on a local JSONL file (the context is our chat-templated
prompt, the continuation each choice, no delimiter), scored by lm-eval's own HF model (``HFLM``, same model
object, ``--lm-eval-batch`` rows per forward), timed in the same process. Its log-likelihoods are compared with
ours too.

    python bench/eval_speed.py [--n 40] [--model smollm2-135m-instruct] [--threads N] [--no-lm-eval]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def time_lm_eval(lm, prompts, choices, golds, batch_size):
    """Score the questions with lm-eval's HFLM on an offline local-file task; (seconds, flat log-likelihoods)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "mc.jsonl"
        data.write_text("".join(json.dumps({"prompt": p, "choices": c, "gold": g}) + "\n"
                                for p, c, g in zip(prompts, choices, golds)))
        (Path(tmp) / "task.yaml").write_text(
            "task: steerscale_eval_speed\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{{{prompt}}}}\"\n"
            "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{gold}}\"\ntarget_delimiter: \"\"\n"
            "metric_list:\n  - metric: acc\n")
        manager = TaskManager(include_path=tmp)
        model = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=model, tasks=["steerscale_eval_speed"], task_manager=manager,
                                      verbosity="ERROR")
        seconds = time.perf_counter() - t0
    samples = sorted(res["samples"]["steerscale_eval_speed"], key=lambda s: s["doc_id"])
    return seconds, [float(r[0][0]) for s in samples for r in s["resps"]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--n", type=int, default=40, help="questions")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--lm-eval-batch", type=int, default=16, help="lm-eval HFLM batch size")
    ap.add_argument("--no-lm-eval", action="store_true", help="skip the lm-eval comparison")
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

    vs_lm_eval = t_lm_eval = lm_eval_diff = None
    if not args.no_lm_eval:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            print("lm-eval not installed: vs_lm_eval not measured (pip install -e '.[dev]')", file=sys.stderr)
        else:
            from steerscale.engine.generation import format_prompt

            prompts = [format_prompt(lm.tokenizer, q) for q in qs]
            t_lm_eval, theirs = time_lm_eval(lm, prompts, chs, [e.gold for e in ex], args.lm_eval_batch)
            ours = [v for r in batched for v in r["logprobs"]]
            lm_eval_diff = max(abs(a - b) for a, b in zip(ours, theirs))
            vs_lm_eval = round(t_lm_eval / t_batched, 2)

    flat = [v for r in batched for v in r["logprobs"]]
    diff = max(abs(a - b) for a, b in zip(flat, single))
    acc_b = sum(max(range(len(r["logprobs"])), key=r["logprobs"].__getitem__) == e.gold for r, e in zip(batched, ex)) / len(ex)
    result = {
        "bench": "eval_speed", "model": args.model, "task": args.task, "questions": len(ex),
        "choices": sum(map(len, chs)), "threads": torch.get_num_threads(),
        "batched_q_per_s": round(len(ex) / t_batched, 3), "one_at_a_time_q_per_s": round(len(ex) / t_single, 3),
        "batched_s": round(t_batched, 2), "one_at_a_time_s": round(t_single, 2),
        "vs_one_at_a_time": round(t_single / t_batched, 2), "max_abs_logprob_diff": diff, "acc": acc_b,
        "vs_lm_eval": vs_lm_eval, "lm_eval_s": None if t_lm_eval is None else round(t_lm_eval, 2),
        "lm_eval_batch": args.lm_eval_batch, "lm_eval_max_abs_logprob_diff": lm_eval_diff,
    }
    print(f"batched (shared prompt): {result['batched_q_per_s']} q/s; one at a time: "
          f"{result['one_at_a_time_q_per_s']} q/s; speed-up x{result['vs_one_at_a_time']}; max |diff| {diff:.2e}",
          file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
