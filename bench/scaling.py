"""Scaling curves: accuracy against generated tokens for every strategy in ``steerscale.scale`` on seeded
arithmetic: greedy, self-consistency@k, best-of-k (arithmetic PRM), weighted vote, particle filtering,
entropic PF, A*-decoding, beam search, DVTS, early pruning, verifier-guided refinement, adaptive
self-consistency and compute-optimal allocation.

    nice python bench/scaling.py --problems 12 --seeds 2 --source gym --terms 2 --digits 2

Self-consistency / best-of-k / weighted vote / pass@k at k = 1, 2, 4, 8, 16 are read off prefixes of one
16-sample pool per (problem, seed), drawn by the ``majority`` strategy (prompt encoded once). The search
strategies (PRM-guided: ``SEARCH_RUNS``) and adaptive SC are separate real runs per (problem, seed); adaptive
SC's stopping rule is also replayed on the pool at several confidences (``ADAPTIVE_REPLAY``); compute-optimal
allocation is one run per seed over the whole batch with the samples of SC@4. Every (problem, seed) samples
from its own random stream (``derive_seed``), so samples are independent across problems.
Intervals: paired bootstrap over problems (numpy).
Writes ``OUT/scaling.png``, ``OUT/scaling_runs.jsonl``, ``OUT/scaling_table.md``; the last stdout line is
one JSON object. ``--source gym`` draws the problems from reasoning-gym's ``basic_arithmetic`` (``--terms``,
``--digits``); ``--source builtin`` from ``steerscale.measure.tasks.arith.make_problems`` (``--difficulty``).
``--shots 3`` gives a 3-shot plain-text prompt completed without the chat template, e.g. multi-step sums:

    nice python bench/scaling.py --problems 36 --seeds 2 --source gym --terms 3 --digits 1 --shots 3 \
        --max-tokens 40 --pf 2,4,6,8 --search-runs epf@8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


# (row name, strategy, knobs, plot marker): PRM-guided search runs, one per (problem, seed), besides PF and A*
SEARCH_RUNS = [
    ("beam@8", "beam_search", dict(n=8, width=4), "v"),
    ("dvts@8", "dvts", dict(n=8, width=2), "<"),
    ("epf@8", "entropic_pf", dict(n=8), ">"),
    ("prune@8", "early_pruning", dict(n=8, keep=0.5, prune_after=1, select="best"), "p"),
    ("refine@3x2", "refine", dict(rounds=3, n=2), "X"),
]


# Beta-test confidences of adaptive SC replayed on every 16-sample pool (``samples_needed``: the same stopping rule
# on prefixes of the pool, batch 2, at least 2 samples): its accuracy/samples trade-off without drawing again
ADAPTIVE_REPLAY = (0.6, 0.7, 0.8, 0.9, 0.95)


def replay_adaptive(pool, gold: str, confidence: float) -> tuple[bool, int, int]:
    """(correct, generated tokens, samples) of adaptive SC stopped by ``confidence`` on this pool's prefixes."""
    from steerscale.scale.strategies.adaptive import samples_needed
    from steerscale.scale.strategies.base import vote

    k = samples_needed([c.answer for c in pool], batch=2, min_samples=2, confidence=confidence)
    return vote(pool[:k])[0] == gold, sum(c.n_tokens for c in pool[:k]), k


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--problems", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--source", default="gym", choices=["gym", "builtin"])
    ap.add_argument("--terms", type=int, default=2, help="gym: numbers per expression")
    ap.add_argument("--digits", type=int, default=2, help="gym: at most this many digits per number")
    ap.add_argument("--difficulty", type=int, default=1, help="builtin: 1..4")
    ap.add_argument("--shots", type=int, default=0,
                    help="k-shot plain-text prompt, completed without the chat template (0: one-shot chat prompt)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    ap.add_argument("--pf", default="4,8", help="particle counts for particle filtering")
    ap.add_argument("--search-runs", default=",".join(r[0] for r in SEARCH_RUNS),
                    help="which other PRM-guided runs to include (comma list of row names, or 'none'); PF, A*, "
                         "adaptive SC and allocation always run")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--boot", type=int, default=2000)
    args = ap.parse_args(argv)
    wanted = set() if args.search_runs == "none" else set(args.search_runs.split(","))
    unknown = wanted - {r[0] for r in SEARCH_RUNS}
    if unknown:
        ap.error(f"unknown --search-runs {sorted(unknown)}; choose from {[r[0] for r in SEARCH_RUNS]} or 'none'")
    search_runs = [r for r in SEARCH_RUNS if r[0] in wanted]

    import torch

    torch.set_num_threads(args.threads)
    from steerscale import load_model
    from steerscale.scale import Budget, LocalBackend, derive_seed, get_verifier, run_strategy
    from steerscale.scale.strategies import run_compute_optimal
    from steerscale.scale.strategies.base import best_of, vote
    from steerscale.measure.tasks.arith import gym_problems, make_problems

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok, layout = load_model(args.model)
    backend = LocalBackend(model, tok, layout, chat=False if args.shots else None)
    if args.source == "gym":
        problems = gym_problems(args.problems, 0, args.terms, args.digits, shots=args.shots)
        task_name = f"reasoning-gym basic_arithmetic, {args.terms} terms, <= {args.digits} digits, +/-"
    else:
        problems = make_problems(args.problems, 0, args.difficulty, shots=args.shots)
        task_name = f"tasks_arith difficulty {args.difficulty}"
    task_name += f", {args.shots}-shot raw prompt" if args.shots else ", one-shot chat prompt"
    prm = get_verifier("arith_prm")
    knobs = dict(max_tokens=args.max_tokens, temperature=args.temperature, step="\n", stop=["\n\n", "Question:"],
                 max_step_tokens=args.max_tokens)
    ks = [1, 2, 4, 8, 16]
    pfs = [int(x) for x in args.pf.split(",") if x]
    P, S = len(problems), args.seeds
    acc = {}  # method -> (P, S) array of 0/1
    tok_used = {}  # method -> (P, S) generated tokens
    samples_used = {}  # adaptive method -> (P, S) samples drawn

    def put(name, p, s, correct, tokens):
        acc.setdefault(name, np.zeros((P, S)))[p, s] = float(correct)
        tok_used.setdefault(name, np.zeros((P, S)))[p, s] = tokens

    runs = open(out / "scaling_runs.jsonl", "w")
    t0 = time.time()
    for p, prob in enumerate(problems):
        g = run_strategy("greedy", prob.question, backend, None, Budget(), **knobs)
        for s in range(S):
            put("greedy", p, s, g.answer == prob.answer, g.generated_tokens)
        for s in range(S):
            ps = derive_seed(s, p)  # seed s, problem p: no two problems share a random stream
            pool = run_strategy("majority", prob.question, backend, None, Budget(), n=16, seed=derive_seed(ps, "pool"),
                                **knobs).candidates
            from steerscale.scale.verifiers import score_candidates

            score_candidates(prm, prob.question, pool, Budget())
            for k in ks:
                sub = pool[:k]
                tokens = sum(c.n_tokens for c in sub)
                put(f"sc@{k}", p, s, vote(sub)[0] == prob.answer, tokens)
                put(f"bon@{k}", p, s, best_of(sub).answer == prob.answer, tokens)
                w = [c.score or 0.0 for c in sub]
                put(f"wvote@{k}", p, s, vote(sub, w)[0] == prob.answer, tokens)
                put(f"pass@{k}", p, s, any(c.answer == prob.answer for c in sub), tokens)
            for conf in ADAPTIVE_REPLAY:
                ok, tokens, used = replay_adaptive(pool, prob.answer, conf)
                put(f"asc-replay@{conf}", p, s, ok, tokens)
                samples_used.setdefault(f"asc-replay@{conf}", np.zeros((P, S)))[p, s] = used
            for n in pfs:
                r = run_strategy("particle_filter", prob.question, backend, prm, Budget(), n=n, seed=ps, **knobs)
                put(f"pf@{n}", p, s, r.answer == prob.answer, r.generated_tokens)
            r = run_strategy("astar", prob.question, backend, prm, Budget(), n=4, expand=1, seed=ps, **knobs)
            put("astar@4", p, s, r.answer == prob.answer, r.generated_tokens)
            for name, strat, extra_knobs, _ in search_runs:
                r = run_strategy(strat, prob.question, backend, prm, Budget(), seed=ps, **extra_knobs, **knobs)
                put(name, p, s, r.answer == prob.answer, r.generated_tokens)
            r = run_strategy("adaptive_sc", prob.question, backend, None, Budget(), n=16, batch=2, min_samples=2,
                             seed=ps, **knobs)
            put("adaptive_sc", p, s, r.answer == prob.answer, r.generated_tokens)
            samples_used.setdefault("adaptive_sc", np.zeros((P, S)))[p, s] = r.info["samples_used"]
            runs.write(json.dumps({"problem": p, "seed": s, "answer": prob.answer,
                                   **{m: [acc[m][p, s], tok_used[m][p, s]] for m in acc},
                                   "pool": [[c.answer, c.n_tokens, c.score] for c in pool]}) + "\n")
            runs.flush()
        print(f"[{p + 1}/{P}] {time.time() - t0:.0f}s greedy={acc['greedy'][:p + 1, 0].mean():.2f} "
              f"sc@16={acc['sc@16'][:p + 1].mean():.2f} pf@{pfs[-1]}={acc[f'pf@{pfs[-1]}'][:p + 1].mean():.2f}",
              file=sys.stderr, flush=True)

    # compute-optimal allocation: one batch-level run per seed, the same total samples as SC@4 on every problem
    for s in range(S):
        t_alloc = time.time()
        results = run_compute_optimal([prob.question for prob in problems], backend, None, Budget(), total=4 * P,
                                      probe=2, cap=16, seed=s, **knobs)
        for p, (prob, r) in enumerate(zip(problems, results)):
            put("alloc@4", p, s, r.answer == prob.answer, sum(c.n_tokens for c in r.candidates))
        print(f"compute_optimal seed {s}: {time.time() - t_alloc:.0f}s", file=sys.stderr, flush=True)

    rng = np.random.default_rng(0)
    boot_idx = rng.integers(0, P, size=(args.boot, P))

    def ci(values):  # values: (P,) per-problem means
        means = values[boot_idx].mean(1)
        return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))

    table = []
    for m in acc:
        a = acc[m].mean(1)
        lo, hi = ci(a)
        table.append((m, float(a.mean()), lo, hi, float(tok_used[m].mean())))
    greedy_acc = float(acc["greedy"].mean())
    gain = acc["sc@16"].mean(1) - acc["greedy"].mean(1)
    gain_lo, gain_hi = ci(gain)
    bon = [(float(acc[f"bon@{k}"].mean()), float(tok_used[f"bon@{k}"].mean()), k) for k in ks]
    bon_best_acc = max(b[0] for b in bon)
    bon_best_tokens = min(b[1] for b in bon if b[0] == bon_best_acc)
    search = [(float(acc[m].mean()), float(tok_used[m].mean()), m) for m in acc
              if m.startswith(("pf@", "astar", "epf@"))]
    reach = [t for a_, t, _ in search if a_ >= bon_best_acc]
    ratio = (min(reach) / bon_best_tokens) if reach and bon_best_acc > 0 else None  # nothing to reach at 0
    sc16 = float(acc["sc@16"].mean())
    asc = float(acc["adaptive_sc"].mean())

    def gain_fraction(a):
        return round((a - greedy_acc) / (sc16 - greedy_acc), 4) if sc16 > greedy_acc else None  # no gain to keep

    gain_frac = gain_fraction(asc)
    replay = [{"confidence": conf, "acc": round(float(acc[f"asc-replay@{conf}"].mean()), 4),
               "sample_fraction": round(float(samples_used[f"asc-replay@{conf}"].mean()) / 16, 4),
               "gain_fraction": gain_fraction(float(acc[f"asc-replay@{conf}"].mean()))} for conf in ADAPTIVE_REPLAY]

    lines = ["| method | accuracy | 95% CI | generated tokens / problem |", "|---|---|---|---|"]
    for m, a, lo, hi, t in table:
        lines.append(f"| {m} | {a:.3f} | [{lo:.3f}, {hi:.3f}] | {t:.1f} |")
    (out / "scaling_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    for fam, style in (("sc@", "o-"), ("bon@", "s-"), ("wvote@", "^-"), ("pass@", "k:")):
        pts = [(tok_used[f"{fam}{k}"].mean(), acc[f"{fam}{k}"].mean()) for k in ks]
        ax.plot(*zip(*pts), style, label=fam.rstrip("@") + "@k (k=1..16)")
    pts = [(tok_used[f"asc-replay@{c}"].mean(), acc[f"asc-replay@{c}"].mean()) for c in ADAPTIVE_REPLAY]
    ax.plot(*zip(*pts), "P--", color="grey",
            label=f"adaptive SC replayed (conf {ADAPTIVE_REPLAY[0]}..{ADAPTIVE_REPLAY[-1]})")
    markers = [(f"pf@{n}", "D") for n in pfs] + [("astar@4", "*"), ("adaptive_sc", "P"), ("greedy", "x"),
                                                  ("alloc@4", "h")] + [(name, mk) for name, _, _, mk in search_runs]
    for m, mk in markers:
        ax.plot(tok_used[m].mean(), acc[m].mean(), mk, markersize=10, label=m)
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem (log)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{args.model}: {task_name}\n{P} problems x {S} seeds", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: the curves stay visible
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120, bbox_inches="tight")

    summary = {
        "model": args.model, "task": task_name, "problems": P, "seeds": S,
        "greedy_acc": round(greedy_acc, 4), "sc16_acc": round(sc16, 4), "sc16_gain_ci_low": round(gain_lo, 4),
        "sc16_gain_ci_high": round(gain_hi, 4), "bon_best_acc": round(bon_best_acc, 4),
        "bon_best_tokens": round(bon_best_tokens, 1),
        "search_tokens_ratio": None if ratio is None else round(ratio, 4),
        "adaptive_acc": round(asc, 4),
        "adaptive_gain_fraction": gain_frac,
        "adaptive_sample_fraction": round(float(samples_used["adaptive_sc"].mean()) / 16, 4),
        "adaptive_replay": replay,
        "pass16_acc": round(float(acc["pass@16"].mean()), 4),
        "search": {m: {"acc": round(a_, 4), "tokens": round(t, 1)} for a_, t, m in search},
        "wall_seconds": round(time.time() - t0, 1), "threads": args.threads,
    }
    (out / "scaling_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
