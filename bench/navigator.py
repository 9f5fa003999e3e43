"""RL of Thoughts on SmolLM2-135M-Instruct: a learned reasoning navigator vs the best fixed block sequence and vs
self-consistency at equal tokens, on a generated task and a second (transfer) task (issue 27, item 2).

Protocol (one run; everything paired on the same problems):

1. **Train** (development split): ``--dev-problems`` problems of the training task generated with seed
   ``1000 + --seed`` (the test split uses seed ``2000 + --seed``, the transfer split ``3000 + --seed``: disjoint
   problem sets). ``train_navigator`` runs ``--explore`` random episodes per problem, then ``--epochs`` of REINFORCE
   (RLOO baseline, ``--episodes`` episodes per problem per epoch); reward = the task's score (1 when reasoning-gym's
   checker gives full credit, else 0; ``--reward score``, the default: its score with partial credit, which
   reasoning-gym makes as an RL reward) minus ``--token-cost`` per 100 generated tokens. Every block is a seeded
   sample cached in the block tree, so an epoch re-visiting a node costs no model call.
2. **Best fixed block sequence**: every sequence of at most ``--max-blocks`` work blocks (then ``stop``) is scored on
   the same dev problems (the tree again: the nodes RL did not visit are run now); the best mean score (ties to the
   cheaper, then the shorter) is the baseline.
3. **Test** (``--test-problems`` of the training task): per problem, the navigator (greedy policy), the best fixed
   sequence (both through the ``navigator`` strategy, same seed per problem: common random numbers) and
   self-consistency *at equal tokens*: ``--sc-max`` samples (``--sc-tokens`` each) are drawn once and the first k
   kept, k the largest whose generated tokens do not exceed the navigator's on that problem (at least one);
   majority vote over their answers.
4. **Transfer** (``--transfer-problems`` of ``--transfer-task``, not trained on): the same three.

95% paired bootstrap intervals (``measure.stats.paired_compare``); tokens and wall seconds per problem for each
method; the machine's load average before and after. The last stdout line is one JSON object; ``navigator_gain`` is
the navigator minus the best fixed sequence on the test split. ``cpu_seconds`` (the process' CPU time) is the run's
single-threaded cost, which the machine's load does not inflate (its wall time it does).

    STEERSCALE_THREADS=1 OMP_NUM_THREADS=1 python bench/navigator.py     # docs/reasoning.md, "Reasoning navigator"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from _common import paired

TASKS = {
    # generated tasks (reasoning-gym), sized for a 135M model: two 1-2 digit terms, + and -
    "arith": ("basic_arithmetic", dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2, operators=("+", "-"),
                                       allow_parentheses=False, allow_negation=False)),
    "chain": ("chain_sum", dict(min_terms=2, max_terms=3, min_digits=1, max_digits=1)),
    # yes/no and true/false tasks: chance is 1/2, so a block choice that changes the answer or its format shows
    "syllogism": ("syllogism", {}),
    "ransom": ("ransom_note", {}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--task", default="arith", help=f"training task: {', '.join(TASKS)} or gym:NAME (default arith)")
    p.add_argument("--transfer-task", default="chain", help="second task, not trained on (default chain)")
    p.add_argument("--dev-problems", type=int, default=3)
    p.add_argument("--test-problems", type=int, default=8)
    p.add_argument("--transfer-problems", type=int, default=4)
    p.add_argument("--max-blocks", type=int, default=2)
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--features", default="self_eval", choices=("self_eval", "self_eval+hidden"))
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--explore", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--token-cost", type=float, default=0.05,
                   help="reward cost per 100 generated tokens (default 0.05: a tie-breaker toward cheaper paths)")
    p.add_argument("--sc-max", type=int, default=6, help="self-consistency samples drawn per problem (a prefix is kept)")
    p.add_argument("--sc-tokens", type=int, default=32, help="max tokens of one self-consistency sample")
    p.add_argument("--reward", default="score", choices=("score", "acc"),
                   help="training reward: the task's score with partial credit (default) or full credit only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out/navigator.safetensors", help="where the trained navigator is saved")
    return p.parse_args(argv)


def make_task(name: str):
    from steerscale.measure.tasks import GymTask, get_task

    if name in TASKS:
        dataset, kwargs = TASKS[name]
        return GymTask(dataset, 200, **kwargs)
    return get_task(name)


def right(task, ex, text) -> float:
    return float(task.check(ex, text)["acc"] >= 1.0)  # gym checkers give partial credit to wrong numbers


def graded(task, ex, text) -> float:
    """The task's own score with its partial credit (reasoning-gym's ``score_answer``, made as an RL reward: e.g.
    0.75 for "Yes." where "Yes" is due)."""
    return float(task.check(ex, text)["acc"])


def mean(xs) -> float | None:
    xs = list(xs)
    return round(sum(xs) / len(xs), 4) if xs else None


def evaluate(task, examples, backend, nav_path, best_seq, args, desc):
    """Per problem: navigator, best fixed sequence and self-consistency at the navigator's tokens."""
    from tqdm import tqdm

    from steerscale.scale import Budget, StrategySpec
    from steerscale.scale.backend import SamplingParams, derive_seed
    from steerscale.scale.strategies.base import vote

    nav_spec = StrategySpec.of("navigator", navigator=nav_path)
    seq_spec = StrategySpec.of("navigator", sequence=",".join(best_seq) or "stop", max_tokens=args.block_tokens,
                               temperature=args.temperature)
    rows = []
    for ex in tqdm(examples, desc=desc, file=sys.stderr):
        prompt, seed = task.format(ex), derive_seed(args.seed, "test", ex.id)
        row = {"id": ex.id}
        for name, spec in (("navigator", nav_spec.with_knobs(seed=seed)), ("fixed", seq_spec.with_knobs(seed=seed))):
            t0 = time.perf_counter()
            res = spec.run(prompt, backend, answer_fn=lambda t: task.read_answer(t, ex))
            row[name] = {"acc": right(task, ex, res.best.text), "score": graded(task, ex, res.best.text),
                         "tokens": res.generated_tokens,
                         "seconds": time.perf_counter() - t0, "blocks": res.info["blocks"]}
        t0 = time.perf_counter()
        budget = Budget()
        cands = backend.sample(prompt, args.sc_max, SamplingParams(max_tokens=args.sc_tokens,
                                                                   temperature=args.temperature), budget,
                               seed=derive_seed(args.seed, "sc", ex.id))
        seconds_all = time.perf_counter() - t0
        keep, used = [], 0
        for c in cands:
            if keep and used + c.n_tokens > row["navigator"]["tokens"]:
                break
            keep.append(c)
            used += c.n_tokens
        for c in keep:
            c.answer = task.read_answer(c.text, ex)
        answer, _ = vote(keep)
        chosen = next((c for c in keep if c.answer == answer), keep[0])
        row["sc"] = {"acc": right(task, ex, chosen.text), "score": graded(task, ex, chosen.text), "tokens": used,
                     "k": len(keep),
                     "seconds": seconds_all * len(keep) / max(1, len(cands))}  # the kept share of one batched call
        rows.append(row)
    return rows


def summary(rows) -> dict:
    out = {}
    for m in ("navigator", "fixed", "sc"):
        out[m] = {"acc": mean(r[m]["acc"] for r in rows), "score": mean(r[m]["score"] for r in rows),
                  "tokens_per_problem": mean(r[m]["tokens"] for r in rows),
                  "seconds_per_problem": mean(r[m]["seconds"] for r in rows)}
    out["sc"]["k_mean"] = mean(r["sc"]["k"] for r in rows)
    acc = {m: [r[m]["acc"] for r in rows] for m in ("navigator", "fixed", "sc")}
    out["navigator_vs_fixed"] = paired(acc["fixed"], acc["navigator"])
    out["navigator_vs_sc"] = paired(acc["sc"], acc["navigator"])
    score = {m: [r[m]["score"] for r in rows] for m in ("navigator", "fixed", "sc")}
    out["score_navigator_vs_fixed"] = paired(score["fixed"], score["navigator"])
    out["score_navigator_vs_sc"] = paired(score["sc"], score["navigator"])
    blocks: dict = {}
    for r in rows:
        key = ",".join(r["navigator"]["blocks"])
        blocks[key] = blocks.get(key, 0) + 1
    out["navigator_paths"] = blocks
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from steerscale import load_model
    from steerscale.scale import Budget, LocalBackend
    from steerscale.scale.navigator import NavProblem, all_sequences, greedy_paths, train_navigator

    wall0 = time.perf_counter()
    load_before = os.getloadavg()
    model, tok, layout = load_model(args.model)
    backend = LocalBackend(model, tok, layout)
    task, transfer = make_task(args.task), make_task(args.transfer_task)
    dev = task.load(args.dev_problems, seed=1000 + args.seed)
    test = task.load(args.test_problems, seed=2000 + args.seed)
    other = transfer.load(args.transfer_problems, seed=3000 + args.seed)
    reward = right if args.reward == "acc" else graded
    problems = [NavProblem(ex.id, task.format(ex), (lambda text, ex=ex: reward(task, ex, text))) for ex in dev]

    t0 = time.perf_counter()
    train_budget = Budget()

    def progress(row):
        if row["epoch"] % 25 == 0:
            print(f"  epoch {row['epoch']}: mean reward {row['mean_reward']:.3f}, entropy {row['entropy']:.2f}, "
                  f"{row['nodes']} nodes, {row['seconds']:.0f} s", file=sys.stderr, flush=True)

    nav, tree = train_navigator(problems, backend, budget=train_budget, progress=progress,
                                info={"model": args.model, "task": args.task, "seed": args.seed},
                                max_blocks=args.max_blocks, block_tokens=args.block_tokens,
                                temperature=args.temperature, features=args.features, epochs=args.epochs,
                                episodes=args.episodes, explore=args.explore, lr=args.lr, token_cost=args.token_cost,
                                seed=args.seed)
    train_seconds = time.perf_counter() - t0
    nav_path = str(nav.save(args.out))
    t0 = time.perf_counter()
    seq_scores = {}
    for seq in all_sequences(nav.blocks, args.max_blocks):
        scores = tree.sequence_scores(seq)
        tokens = mean(tree.outcome(i, seq)[1] for i in range(len(problems)))
        seq_scores[",".join(seq) or "stop"] = {args.reward: mean(scores), "tokens": tokens}
    best = max(seq_scores, key=lambda k: (seq_scores[k][args.reward], -seq_scores[k]["tokens"], -len(k)))
    best_seq = tuple(b for b in best.split(",") if b != "stop")
    dev_nav = mean(tree.outcome(i, p)[0] for i, p in enumerate(greedy_paths(nav, tree)))
    search_seconds = time.perf_counter() - t0
    spent = train_budget.spent()
    print(f"train: {len(problems)} dev problems, {nav.info['epochs_run']} epochs, {len(tree.nodes)} tree nodes, "
          f"{spent['generated_tokens']} generated tokens, {train_seconds:.0f} s (+{search_seconds:.0f} s for the "
          f"fixed sequences); dev {args.reward}: navigator {dev_nav}, best fixed '{best}' "
          f"{seq_scores[best][args.reward]}",
          flush=True)

    rows = evaluate(task, test, backend, nav_path, best_seq, args, "test")
    res = summary(rows)
    rows_t = evaluate(transfer, other, backend, nav_path, best_seq, args, "transfer")
    res_t = summary(rows_t)
    for label, r in (("test", res), ("transfer", res_t)):
        print(f"{label}: " + "  ".join(f"{m} acc {r[m]['acc']} tokens {r[m]['tokens_per_problem']} "
                                       f"s {r[m]['seconds_per_problem']}" for m in ("navigator", "fixed", "sc")))
        print(f"  navigator - fixed {r['navigator_vs_fixed']}\n  navigator - sc    {r['navigator_vs_sc']}\n"
              f"  score: navigator - fixed {r['score_navigator_vs_fixed']}, - sc {r['score_navigator_vs_sc']}\n"
              f"  navigator paths {r['navigator_paths']}")
    load_after = os.getloadavg()
    out = {"bench": "navigator", "model": args.model, "task": args.task, "transfer_task": args.transfer_task,
           "dev_problems": len(dev), "test_problems": len(test), "transfer_problems": len(other),
           "max_blocks": args.max_blocks, "block_tokens": args.block_tokens, "features": args.features,
           "reward": args.reward, "token_cost": args.token_cost,
           "navigator_gain": res["navigator_vs_fixed"], "navigator_vs_sc": res["navigator_vs_sc"],
           "best_fixed_sequence": best, "test": res, "transfer": res_t,
           "dev": {f"navigator_{args.reward}": dev_nav, "sequences": seq_scores},
           "train": {"epochs_run": nav.info["epochs_run"], "nodes": len(tree.nodes), "seconds": round(train_seconds, 1),
                     "generated_tokens": spent["generated_tokens"], "verifier_passes": spent["verifier_passes"],
                     "reward_first": nav.info["history"][0]["mean_reward"] if nav.info["history"] else None,
                     "reward_last": nav.info["history"][-1]["mean_reward"] if nav.info["history"] else None},
           "navigator_file": nav_path, "load_avg_before": [round(x, 2) for x in load_before],
           "load_avg_after": [round(x, 2) for x in load_after], "cpus": os.cpu_count(),
           "torch_threads": __import__("torch").get_num_threads(), "wall_seconds": round(time.perf_counter() - wall0, 1),
           "cpu_seconds": round(time.process_time(), 1)}  # the process' CPU time: what a loaded machine does not inflate
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
