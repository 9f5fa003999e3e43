"""Hogwild! shared-cache workers against independent samples and against one long worker (issue 27, item 1).

Protocol (everything paired on the same generated problems, one seed stream per problem and arm):

* Task: ``--problems`` seeded arithmetic problems from steerscale's generator (``measure.tasks.arith.make_problems``,
  ``--difficulty``; difficulty 2 is ``NN +/- NN``), in its one-shot chat prompt; answers read by
  ``answers.extract_answer`` and compared as numbers.
* Arms, each at most ``N x T`` generated tokens per problem (``--workers`` N, ``--tokens`` T), temperature
  ``--temperature``:

  ``hogwild``       the ``hogwild`` strategy: N workers on one shared KV cache, seeing each other's tokens, told by
                    the prompt protocol that they collaborate; T tokens each; the answer is their vote;
  ``isolated``      the same N protocol prompts on one cache, but the workers cannot see each other
                    (``see_others=false``): what the protocol alone does;
  ``independent``   N independent samples of the plain prompt, T tokens each, majority vote (``majority``);
  ``single``        one sample of the plain prompt with N x T tokens;
  ``single_wall``   one sample of the plain prompt with N x T tokens, stopped at the wall time the ``hogwild`` arm
                    took on that problem (``Budget(wall=...)``): the equal-wall-time comparison.

* Per arm: accuracy of its answer, of each worker / sample on its own (``per_sample``), and the oracle (any right).
* ``hogwild_gain`` = accuracy(hogwild) - accuracy(independent), with its 95% paired bootstrap interval
  (``measure.stats.paired_compare``); the other differences likewise. Tokens and wall seconds per problem per arm.

The last stdout line is one JSON object.

    STEERSCALE_THREADS=1 OMP_NUM_THREADS=1 python bench/hogwild.py --problems 40 --workers 2 --tokens 96
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ARMS = ("hogwild", "isolated", "independent", "single", "single_wall")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--problems", type=int, default=40)
    p.add_argument("--difficulty", type=int, default=2, help="make_problems difficulty 1..4 (default 2: NN +/- NN)")
    p.add_argument("--workers", type=int, default=2, help="N: workers / independent samples (default 2)")
    p.add_argument("--tokens", type=int, default=96, help="T: max tokens per worker / sample (default 96)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    threads = os.environ.get("STEERSCALE_THREADS", "1")
    torch.set_num_threads(int(threads) if threads.isdigit() else 1)  # models/threads.py may refine an "auto"
    sys.path.insert(0, os.path.dirname(__file__))
    from _common import log, machine_info, paired

    from steerscale import load_model
    from steerscale.answers import same_number
    from steerscale.measure.tasks.arith import make_problems
    from steerscale.scale import Budget, LocalBackend, derive_seed
    from steerscale.scale.spec import run_strategy

    t0 = time.perf_counter()
    lm = load_model(args.model, dtype="float32")
    backend = LocalBackend(lm.model, lm.tokenizer, lm.layout)
    load_s = time.perf_counter() - t0
    problems = make_problems(args.problems, args.seed, args.difficulty)
    N, T = args.workers, args.tokens
    common = dict(temperature=args.temperature)
    rows = {a: {"right": [], "tokens": [], "wall": [], "per_sample": [], "oracle": []} for a in ARMS}
    examples = []

    def record(arm, res, ref):
        spent = res.budget["spent"]
        rows[arm]["right"].append(1.0 if same_number(res.answer, ref) else 0.0)
        rows[arm]["tokens"].append(spent["generated_tokens"])
        rows[arm]["wall"].append(spent["wall_seconds"])
        hits = [same_number(c.answer, ref) for c in res.candidates]  # each worker / sample on its own
        rows[arm]["per_sample"].append(sum(hits) / len(hits))
        rows[arm]["oracle"].append(1.0 if any(hits) else 0.0)

    for i, pb in enumerate(problems):
        q = pb.question
        seed = derive_seed(args.seed, "hogwild-bench", i)
        hog = run_strategy("hogwild", q, backend, budget=Budget.of(tokens=N * T), n=N, max_tokens=T, seed=seed, **common)
        record("hogwild", hog, pb.answer)
        iso = run_strategy("hogwild", q, backend, budget=Budget.of(tokens=N * T), n=N, max_tokens=T, seed=seed,
                           see_others=False, **common)
        record("isolated", iso, pb.answer)
        ind = run_strategy("majority", q, backend, budget=Budget.of(tokens=N * T), n=N, max_tokens=T, seed=seed, **common)
        record("independent", ind, pb.answer)
        one = run_strategy("majority", q, backend, budget=Budget.of(tokens=N * T), n=1, max_tokens=N * T, seed=seed,
                           **common)
        record("single", one, pb.answer)
        wall = max(hog.budget["spent"]["wall_seconds"], 1e-3)
        onew = run_strategy("majority", q, backend, budget=Budget.of(tokens=N * T, wall=wall), n=1, max_tokens=N * T,
                            seed=seed, **common)
        record("single_wall", onew, pb.answer)
        if i < 2:
            examples.append({"question": pb.expression, "answer": pb.answer,
                             "hogwild": [c.text for c in hog.candidates], "independent": [c.text for c in ind.candidates]})
        log(f"[{i + 1}/{len(problems)}] {pb.expression} = {pb.answer}: " + " ".join(
            f"{a}={rows[a]['right'][-1]:.0f}" for a in ARMS) + f"  ({time.perf_counter() - t0:.0f}s)")

    def mean(xs):
        return round(sum(xs) / len(xs), 4) if xs else None

    acc = {a: mean(rows[a]["right"]) for a in ARMS}
    per_sample = {a: mean(rows[a]["per_sample"]) for a in ARMS}
    oracle = {a: mean(rows[a]["oracle"]) for a in ARMS}
    tokens = {a: mean(rows[a]["tokens"]) for a in ARMS}
    wall = {a: mean(rows[a]["wall"]) for a in ARMS}
    gain = paired(rows["independent"]["right"], rows["hogwild"]["right"])
    vs_single = paired(rows["single"]["right"], rows["hogwild"]["right"])
    vs_single_wall = paired(rows["single_wall"]["right"], rows["hogwild"]["right"])
    vs_isolated = paired(rows["isolated"]["right"], rows["hogwild"]["right"])
    print(f"{args.model}, arithmetic difficulty {args.difficulty}, {len(problems)} problems, N={N} workers x T={T} "
          f"tokens, T={args.temperature}")
    print(f"  {'arm':<12} {'acc':>6} {'per-sample':>10} {'oracle':>7} {'tokens/problem':>15} {'wall s/problem':>15} "
          f"{'tokens/s':>9}")
    for a in ARMS:
        rate = tokens[a] / wall[a] if wall[a] else float("nan")
        print(f"  {a:<12} {acc[a]:>6.3f} {per_sample[a]:>10.3f} {oracle[a]:>7.3f} {tokens[a]:>15.1f} {wall[a]:>15.2f} "
              f"{rate:>9.1f}")
    print(f"  hogwild - independent (equal tokens)   {gain}")
    print(f"  hogwild - isolated (protocol only)     {vs_isolated}")
    print(f"  hogwild - single (equal tokens)        {vs_single}")
    print(f"  hogwild - single (equal wall time)     {vs_single_wall}")
    for ex in examples:
        log(json.dumps(ex)[:1500])
    print(json.dumps({
        "bench": "hogwild", "model": args.model, "task": f"arith:difficulty{args.difficulty}",
        "problems": len(problems), "workers": N, "tokens_per_worker": T, "temperature": args.temperature,
        "accuracy": acc, "per_sample_accuracy": per_sample, "oracle": oracle, "hogwild_gain": gain["diff"], "hogwild_gain_ci": [gain["lo"], gain["hi"]],
        "hogwild_vs_independent": gain, "hogwild_vs_isolated": vs_isolated, "hogwild_vs_single": vs_single,
        "hogwild_vs_single_wall": vs_single_wall, "tokens_per_problem": tokens, "wall_seconds_per_problem": wall,
        "load_seconds": round(load_s, 1), "wall_seconds": round(time.perf_counter() - t0, 1),
        "machine": machine_info()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
