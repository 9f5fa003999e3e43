"""Searched inference program vs the best single strategy vs greedy, at the same per-problem budget (issue 26).

Protocol, on SmolLM2-135M-Instruct and a task from the bundled data (default ARC-Easy, answered by generating the
option letter; ``--task gsm8k`` works too, slower):

1. ``dev + test`` examples drawn by ``--data-seed``, split without overlap.
2. **Single strategies** (the baseline a search has to beat): majority@4, best-of-4 by log-prob and
   best-of-4 by self-evaluation, each run on the dev split within the per-problem budget; the best on dev is the
   chosen single strategy.
3. **Program search**: optuna TPE over program configs (``steerscale.scale.programs.search``) on the same dev
   split, ``--trials`` trials, each problem within the same per-problem budget, the whole search within
   ``--total``; the best config (dev accuracy, then fewer tokens) is kept. ``--random-trials N`` adds random
   search as its baseline (same budget rules).
4. **Held out**: greedy, the chosen single strategy and the searched program on the test split; accuracy with
   Wilson intervals, generated tokens per problem, and paired bootstrap intervals of the differences. Nothing is
   tuned on the test split.

Writes OUT/programs_search.png (dev accuracy vs tokens, every trial), OUT/programs_best.json and
OUT/programs_table.md; the last stdout line is one JSON object.

    STEERSCALE_THREADS=1 python bench/programs.py --dev 12 --test 40 --trials 8 --budget tokens=256 --max-tokens 32

``--part handbook`` measures the behaviour handbook instead (metacognitive reuse): built from the dev split's solved
problems, greedy with vs without it on the test split (accuracy, generated tokens, paired interval):

    STEERSCALE_THREADS=1 python bench/programs.py --part handbook --dev 24 --test 24 --data-seed 1 --max-tokens 32

``--part memory`` measures the parts built on the prompt, each within the same per-problem budget and each against
its baseline on the same held-out problems (paired bootstrap intervals, generated tokens per problem):

* behaviour handbook and ArcMemo concept memory (both written by the model from its solved dev problems; the concept
  memory is also updated as the test split goes on, from the model's own confident answers, never from gold) against
  greedy with the same prompt;
* the prompt router (k nearest dev questions, pool none/cot/direct) against the best single prompt of the pool,
  chosen on dev;
* teacher intervention (``teach``: the teacher -- ``--teacher``, by default the model itself -- explains when
  simulating the student says it helps; its tokens count in the same budget) against none;
* with ``--searched PATH`` (a best program saved by an earlier search on the dev split, e.g. bench/out/
  programs_best.json), the searched program against best-of-4 by ``--bon-verifier`` and against greedy.

    STEERSCALE_THREADS=1 python bench/programs.py --part memory --dev 8 --test 20 --budget tokens=128 --max-tokens 16 \
        --searched bench/out/programs_best.json

The last line holds ``search_vs_bon_gain`` (null without ``--searched``), ``handbook_gain``,
``handbook_token_ratio`` (null when the model wrote no behaviour), ``memory_gain``, ``router_gain`` and
``teacher_gain``, each gain with ``_ci_low``/``_ci_high``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SINGLES = [  # (row name, strategy, knobs, verifier)
    ("majority@4", "majority", {"n": 4, "temperature": 0.7}, None),
    ("best_of_4 (logprob)", "best_of_n", {"n": 4, "temperature": 0.7}, "logprob"),
    ("best_of_4 (self_eval)", "best_of_n", {"n": 4, "temperature": 0.7}, "self_eval"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--dev", type=int, default=12)
    ap.add_argument("--test", type=int, default=40)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--random-trials", type=int, default=0)
    ap.add_argument("--warm-start", action="store_true",
                    help="the search tries self-consistency@4 and best-of-4 (self-evaluation) first")
    ap.add_argument("--budget", default="tokens=256", help="per problem, every row")
    ap.add_argument("--total", default="tokens=60000", help="the whole search (each sampler)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--part", default="search", choices=["search", "handbook", "memory", "merge"],
                    help="search: the protocol above; handbook: greedy with vs without a behaviour handbook built "
                         "from the dev split's solved problems (--dev problems; --k behaviours retrieved); memory: "
                         "handbook, concept memory, router, teacher (and --searched) against their baselines")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--teacher", default="", help="--part memory: the teacher model (default: the model itself)")
    ap.add_argument("--searched", default="", help="--part memory: a searched program (JSON file) to score")
    ap.add_argument("--bon-verifier", default="self_eval", help="--part memory: best-of-4's verifier")
    ap.add_argument("--concept-min-score", type=float, default=0.0,
                    help="--part memory: the self-evaluation an answer needs to be learned from (default 0: every "
                         "answer; SmolLM2's self-evaluation gave 0.19-0.31 to right and wrong dev answers alike)")
    ap.add_argument("--teacher-tokens", type=int, default=48, help="--part memory: tokens per explanation")
    ap.add_argument("--only-searched", action="store_true",
                    help="--part memory: only greedy, the --searched program and best-of-4 (no dev builds)")
    ap.add_argument("--inputs", default="",
                    help="--part merge: summary files (OUT/programs_memory*.json), comma-separated")
    args = ap.parse_args(argv)
    if args.part == "handbook":
        return handbook_part(args)
    if args.part == "memory":
        return memory_part(args)
    if args.part == "merge":
        return merge_part(args)

    from steerscale.measure.stats import paired_compare, wilson_ci
    from steerscale.scale import Budget, StrategySpec
    from steerscale.scale.programs import load_program
    from steerscale.scale.programs.search import SINGLE_STRATEGY_PARAMS, evaluate, plot_trials, save_json, search

    out, per_problem, dev, test, backend, t0 = setup(args)

    def acc(outcomes):
        return sum(o.correct for o in outcomes) / len(outcomes)

    def tokens(outcomes):
        return sum(o.generated_tokens for o in outcomes) / len(outcomes)

    # 2. single strategies on dev
    dev_rows = {}
    for name, strategy, knobs, verifier in SINGLES:
        spec = StrategySpec.of(strategy, verifier=verifier, max_tokens=args.max_tokens, **knobs)
        res = evaluate(spec, dev, backend, per_problem, seed=args.seed)
        dev_rows[name] = (spec, acc(res), tokens(res))
        print(f"[dev] {name}: acc {acc(res):.3f}, {tokens(res):.0f} tokens/problem ({time.time() - t0:.0f}s)",
              file=sys.stderr, flush=True)
    single_name = max(dev_rows, key=lambda k: (dev_rows[k][1], -dev_rows[k][2]))

    # 3. program search on dev
    searches = [search(dev, backend, per_problem=per_problem, total=Budget.parse(args.total).limits,
                       trials=args.trials, sampler="tpe", seed=args.seed, max_tokens=args.max_tokens,
                       start_from=SINGLE_STRATEGY_PARAMS if args.warm_start else ())]
    if args.random_trials:
        searches.append(search(dev, backend, per_problem=per_problem, total=Budget.parse(args.total).limits,
                               trials=args.random_trials, sampler="random", seed=args.seed,
                               max_tokens=args.max_tokens))
    for s in searches:
        print(f"[dev] search {s.sampler}: best dev acc {s.best_dev_acc}, {len(s.trials)} trials, spent "
              f"{s.spent.get('generated_tokens')} generated tokens ({time.time() - t0:.0f}s)", file=sys.stderr,
              flush=True)
    plot_trials(searches, out / "programs_search.png", title=f"{args.task}: program search on {len(dev)} dev problems")
    best = load_program(searches[0].best)
    save_json(best.to_dict(), out / "programs_best.json")

    # 4. held out
    rows = {"greedy": StrategySpec.of("greedy", max_tokens=args.max_tokens),
            f"single: {single_name}": dev_rows[single_name][0],
            "searched program (tpe)": StrategySpec.of("program", program=best.to_json())}
    if args.random_trials and searches[1].best is not None:
        rows["searched program (random)"] = StrategySpec.of("program", program=load_program(searches[1].best).to_json())
    held = {}
    for name, spec in rows.items():
        held[name] = evaluate(spec, test, backend, per_problem, seed=args.seed)
        print(f"[test] {name}: acc {acc(held[name]):.3f} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)

    lines = [f"Task {args.task}: {len(dev)} dev / {len(test)} held-out problems (data seed {args.data_seed}), "
             f"per-problem budget {args.budget}, answers up to {args.max_tokens} tokens; model {args.model}.", "",
             "| method (held out) | accuracy | 95% CI | generated tokens / problem |", "|---|---|---|---|"]
    for name, res in held.items():
        ci = wilson_ci(int(sum(o.correct for o in res)), len(res))
        lines.append(f"| {name} | {ci.mean:.3f} | [{ci.lo:.3f}, {ci.hi:.3f}] | {tokens(res):.1f} |")
    lines += ["", "| dev (chooses) | accuracy | generated tokens / problem |", "|---|---|---|"]
    lines += [f"| {k} | {a:.3f} | {t:.1f} |" for k, (_, a, t) in dev_rows.items()]
    lines += [f"| program search {s.sampler}: best of {len(s.trials)} trials | {s.best_dev_acc:.3f} | "
              f"{min((t.tokens_per_problem for t in s.trials if t.dev_acc == s.best_dev_acc), default=0):.1f} |"
              for s in searches if s.best_dev_acc is not None]

    prog = [o.correct for o in held["searched program (tpe)"]]
    vs_single = paired_compare([o.correct for o in held[f"single: {single_name}"]], prog)
    vs_greedy = paired_compare([o.correct for o in held["greedy"]], prog)
    lines += ["", "| paired difference (held out) | mean | 95% CI | wins / losses |", "|---|---|---|---|",
              f"| searched - {single_name} | {vs_single.diff:+.3f} | [{vs_single.lo:+.3f}, {vs_single.hi:+.3f}] | "
              f"{vs_single.wins} / {vs_single.losses} |",
              f"| searched - greedy | {vs_greedy.diff:+.3f} | [{vs_greedy.lo:+.3f}, {vs_greedy.hi:+.3f}] | "
              f"{vs_greedy.wins} / {vs_greedy.losses} |", "",
              "Searched program: `" + best.to_json() + "`", "",
              f"Wall time {time.time() - t0:.0f} s (one thread)."]
    table = "\n".join(lines)
    (out / "programs_table.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    summary = {"task": args.task, "dev": len(dev), "test": len(test), "budget": args.budget,
               "single": single_name, "trials": len(searches[0].trials),
               "search_spent_generated_tokens": searches[0].spent.get("generated_tokens"),
               **{f"acc_{k.split(':')[0].split(' (')[0].replace(' ', '_')}": round(acc(v), 4) for k, v in held.items()
                  if "random" not in k},
               "search_vs_single_gain": round(vs_single.diff, 4), "search_vs_single_gain_ci_low": round(vs_single.lo, 4),
               "search_vs_single_gain_ci_high": round(vs_single.hi, 4),
               "search_vs_greedy_gain": round(vs_greedy.diff, 4), "search_vs_greedy_gain_ci_low": round(vs_greedy.lo, 4),
               "search_vs_greedy_gain_ci_high": round(vs_greedy.hi, 4),
               "tokens_per_problem": {k: round(tokens(v), 1) for k, v in held.items()},
               "wall_seconds": round(time.time() - t0, 1)}
    print(json.dumps(summary))
    return 0


def setup(args):
    """(out folder, per-problem limits, dev problems, test problems, backend, start time) of a part."""
    from steerscale import load_model
    from steerscale.commands.program_cmd import split_task
    from steerscale.scale import Budget, LocalBackend

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, dev, test = split_task(args.task, args.dev, args.test, args.data_seed)
    lm = load_model(args.model)
    return (out, Budget.parse(args.budget).limits, dev, test, LocalBackend(lm.model, lm.tokenizer, lm.layout),
            time.time())


def handbook_part(args) -> int:
    """Greedy with and without the handbook (behaviours written by the model from its solved dev problems, the k
    nearest by hidden-state similarity put before each test question): accuracy and generated tokens, paired."""
    from steerscale.measure.stats import paired_compare, wilson_ci
    from steerscale.scale import Budget, StrategySpec
    from steerscale.scale.programs import build_handbook
    from steerscale.scale.programs.search import evaluate

    out, per_problem, dev, test, backend, t0 = setup(args)
    book = build_handbook(dev, backend, Budget(), max_tokens=args.max_tokens, model=args.model)
    path = out / "programs_handbook.json"
    book.save(path)
    print(f"[dev] handbook: {len(book.behaviours)} behaviours from {len(dev)} problems ({time.time() - t0:.0f}s)",
          file=sys.stderr, flush=True)
    rows = {"greedy": StrategySpec.of("greedy", max_tokens=args.max_tokens)}
    if book.behaviours:
        rows["greedy + handbook"] = StrategySpec.of("program", max_tokens=args.max_tokens, program={"stages": [
            {"type": "handbook", "path": str(path.resolve()), "k": args.k}, {"type": "generate", "strategy": "greedy"}]})
    held = {name: evaluate(spec, test, backend, per_problem, seed=args.seed) for name, spec in rows.items()}
    lines = [f"Task {args.task}: handbook from {len(dev)} dev problems ({len(book.behaviours)} behaviours), "
             f"{len(test)} held-out problems, k={args.k}, answers up to {args.max_tokens} tokens; model {args.model}.",
             "", "| method (held out) | accuracy | 95% CI | generated tokens / problem |", "|---|---|---|---|"]
    for name, res in held.items():
        ci = wilson_ci(int(sum(o.correct for o in res)), len(res))
        lines.append(f"| {name} | {ci.mean:.3f} | [{ci.lo:.3f}, {ci.hi:.3f}] | "
                     f"{sum(o.generated_tokens for o in res) / len(res):.1f} |")
    lines += ["", "Behaviours: " + "; ".join(f"`{b.name}: {b.instruction}`" for b in book.behaviours)]
    summary = {"task": args.task, "dev": len(dev), "test": len(test), "behaviours": len(book.behaviours)}
    if book.behaviours:
        cmp = paired_compare([o.correct for o in held["greedy"]], [o.correct for o in held["greedy + handbook"]])
        tok = [sum(o.generated_tokens for o in held[k]) for k in ("greedy", "greedy + handbook")]
        lines += ["", f"handbook - greedy: {cmp.diff:+.3f} [{cmp.lo:+.3f}, {cmp.hi:+.3f}] ({cmp.wins} wins, "
                      f"{cmp.losses} losses); token ratio {tok[1] / max(1, tok[0]):.2f}"]
        summary.update(handbook_gain=round(cmp.diff, 4), handbook_gain_ci_low=round(cmp.lo, 4),
                       handbook_gain_ci_high=round(cmp.hi, 4), handbook_token_ratio=round(tok[1] / max(1, tok[0]), 3))
    table = "\n".join(lines + ["", f"Wall time {time.time() - t0:.0f} s (one thread)."])
    (out / "programs_handbook_table.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(json.dumps({**summary, "wall_seconds": round(time.time() - t0, 1)}))
    return 0


def memory_part(args) -> int:
    """Handbook, concept memory, router and teacher (and a searched program, when given) against their baselines on
    the same held-out problems, each within the per-problem budget; see the module docstring."""
    import shutil

    from steerscale.measure.stats import paired_compare, wilson_ci
    from steerscale.scale import Budget, LocalBackend, StrategySpec
    from steerscale.scale.programs import ConceptMemory, build_concepts, build_handbook, build_router, load_program
    from steerscale.scale.programs.search import evaluate

    out, per_problem, dev, test, backend, t0 = setup(args)
    cpu0 = time.process_time()  # the machine is shared: CPU time says what the run costs, wall time what it took
    log = lambda msg: print(f"{msg} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)  # noqa: E731
    def greedy_after(*stages):
        return StrategySpec.of("program", max_tokens=args.max_tokens, program={"stages": [
            *stages, {"type": "generate", "strategy": "greedy"}]})

    rows = {"greedy": StrategySpec.of("greedy", max_tokens=args.max_tokens)}
    summary = {"task": args.task, "dev": len(dev), "test": len(test), "budget": args.budget,
               "max_tokens": args.max_tokens}
    if not args.only_searched:
        # -- built on the dev split only --------------------------------------------------------------------------
        book = build_handbook(dev, backend, Budget(), max_tokens=args.max_tokens, model=args.model)
        book.save(out / "programs_handbook.json")
        log(f"[dev] handbook: {len(book.behaviours)} behaviours from {len(dev)} problems")
        memory = build_concepts(dev, backend, Budget(), max_tokens=args.max_tokens, model=args.model)
        memory.save(out / "programs_concepts_dev.json")
        shutil.copy(out / "programs_concepts_dev.json", out / "programs_concepts.json")  # the copy the test updates
        log(f"[dev] concepts: {len(memory.concepts)} from {len(dev)} problems")
        router = build_router(dev, backend, ("none", "cot", "direct"), Budget(), max_tokens=args.max_tokens,
                              model=args.model)
        router.save(out / "programs_router.json")
        overall = router.overall()
        best_prompt = max(router.prompts, key=lambda p: (overall[p], -router.prompts.index(p)))
        log(f"[dev] router: dev accuracy per prompt {overall}; best single prompt {best_prompt!r}")
        teach = {"type": "teach", "max_tokens": args.teacher_tokens, **({"model": "teacher"} if args.teacher else {})}
        rows.update({
            "greedy + concept memory (updated)": greedy_after(
                {"type": "concepts", "path": str((out / "programs_concepts.json").resolve()), "k": args.k,
                 "update": True, "min_score": args.concept_min_score}),
            "router": greedy_after({"type": "route", "path": str((out / "programs_router.json").resolve())}),
            f"best single prompt ({best_prompt})": (greedy_after({"type": "prompt", "preset": best_prompt})
                                                    if best_prompt != "none" else None),
            "greedy + teacher": greedy_after(teach)})
        if book.behaviours:
            rows["greedy + handbook"] = greedy_after({"type": "handbook", "path": str((out / "programs_handbook.json")
                                                                                      .resolve()), "k": args.k})
        summary.update(teacher=args.teacher or args.model, behaviours=len(book.behaviours),
                       concepts_dev=len(memory.concepts), router_best_single=best_prompt,
                       router_dev_accuracy={k: round(v, 4) for k, v in overall.items()})
    if args.searched:
        rows["searched program"] = StrategySpec.of("program", program=load_program(args.searched).to_json())
        rows[f"best_of_4 ({args.bon_verifier})"] = StrategySpec.of("best_of_n", n=4, temperature=0.7,
                                                                  verifier=args.bon_verifier,
                                                                  max_tokens=args.max_tokens)
    models = {}
    if args.teacher:
        from steerscale import load_model

        other = load_model(args.teacher)
        models["teacher"] = LocalBackend(other.model, other.tokenizer, other.layout)
    held = {}
    for name, spec in rows.items():
        if spec is None:  # the best single prompt is the plain prompt: the greedy row
            held[name] = held["greedy"]
            continue
        held[name] = evaluate(spec, test, backend, per_problem, seed=args.seed,
                              models=models if name == "greedy + teacher" else None)
        log(f"[test] {name}: acc {sum(o.correct for o in held[name]) / len(test):.3f}")

    def tokens(name):
        return sum(o.generated_tokens for o in held[name]) / len(held[name])

    def compare(base, new, key):
        cmp = paired_compare([o.correct for o in held[base]], [o.correct for o in held[new]])
        summary.update({key: round(cmp.diff, 4), f"{key}_ci_low": round(cmp.lo, 4), f"{key}_ci_high": round(cmp.hi, 4)})
        diffs.append(f"| {new} - {base} | {cmp.diff:+.3f} | [{cmp.lo:+.3f}, {cmp.hi:+.3f}] | {cmp.wins} / "
                     f"{cmp.losses} |")

    diffs = ["| paired difference (held out) | mean | 95% CI (paired bootstrap) | wins / losses |", "|---|---|---|---|"]
    head = (f"Task {args.task}: {len(dev)} dev / {len(test)} held-out problems (data seed {args.data_seed}), "
            f"per-problem budget {args.budget}, answers up to {args.max_tokens} tokens; model {args.model}.")
    notes = []
    if not args.only_searched:
        after = ConceptMemory.load(out / "programs_concepts.json")
        summary["concepts_after_test"] = len(after.concepts)
        compare("greedy", "greedy + concept memory (updated)", "memory_gain")
        compare(f"best single prompt ({best_prompt})", "router", "router_gain")
        compare("greedy", "greedy + teacher", "teacher_gain")
        if book.behaviours:
            compare("greedy", "greedy + handbook", "handbook_gain")
            summary["handbook_token_ratio"] = round(tokens("greedy + handbook") / max(1e-9, tokens("greedy")), 3)
        else:  # no behaviour was written: there is nothing to measure (not a zero gain)
            summary.update(handbook_gain=None, handbook_gain_ci_low=None, handbook_gain_ci_high=None,
                           handbook_token_ratio=None)
        head += (f" Teacher {args.teacher or args.model}. Handbook: {len(book.behaviours)} behaviours; concept "
                 f"memory: {len(memory.concepts)} concepts from dev, {len(after.concepts)} after the test split; "
                 f"router: dev accuracy {', '.join(f'{k} {v:.3f}' for k, v in overall.items())}.")
        notes = ["Concepts after the test split: "
                 + ("; ".join(f"`{c.line()}` ({c.origin})" for c in after.concepts) or "none"),
                 "Behaviours: " + ("; ".join(f"`{b.name}: {b.instruction}`" for b in book.behaviours) or "none")]
    if args.searched:
        compare(f"best_of_4 ({args.bon_verifier})", "searched program", "search_vs_bon_gain")
        compare("greedy", "searched program", "search_vs_greedy_gain")
        summary["searched"] = load_program(args.searched).to_dict()
    else:
        summary.update(search_vs_bon_gain=None, search_vs_bon_gain_ci_low=None, search_vs_bon_gain_ci_high=None)
    lines = [head, "", "| method (held out) | accuracy | 95% CI (Wilson) | generated tokens / problem "
             "| prompt tokens / problem |", "|---|---|---|---|---|"]
    for name, res in held.items():
        ci = wilson_ci(int(sum(o.correct for o in res)), len(res))
        lines.append(f"| {name} | {ci.mean:.3f} | [{ci.lo:.3f}, {ci.hi:.3f}] | {tokens(name):.1f} | "
                     f"{sum(o.prompt_tokens for o in res) / len(res):.0f} |")
    lines += ["", *diffs, "", *notes,
              "", f"Wall time {time.time() - t0:.0f} s, CPU time {time.process_time() - cpu0:.0f} s (one thread)."]
    summary["tokens_per_problem"] = {k: round(tokens(k), 1) for k in held}
    table = "\n".join(lines)
    tag = "_searched" if args.only_searched else ""
    (out / f"programs_memory{tag}_table.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    summary.update(wall_seconds=round(time.time() - t0, 1), cpu_seconds=round(time.process_time() - cpu0, 1))
    (out / f"programs_memory{tag}.json").write_text(json.dumps(summary) + "\n", encoding="utf-8")
    print(json.dumps(summary))
    return 0


def merge_part(args) -> int:
    """One JSON line from the summaries of several runs (``--inputs A.json,B.json``): a later file's value fills a
    key an earlier one lacks or left null; the time spent is summed; nothing is recomputed."""
    merged: dict = {"runs": []}
    for path in [p for p in args.inputs.split(",") if p.strip()]:
        run = json.loads(Path(path.strip()).read_text(encoding="utf-8"))
        merged["runs"].append({"file": path.strip(), "dev": run.get("dev"), "test": run.get("test"),
                               "wall_seconds": run.get("wall_seconds"), "cpu_seconds": run.get("cpu_seconds")})
        for key, value in run.items():
            if key == "tokens_per_problem":  # a row of another run on another split keeps its own name
                rows = merged.setdefault(key, {})
                for row, tokens in value.items():
                    rows[row if row not in rows else f"{row} ({Path(path.strip()).stem})"] = tokens
            elif merged.get(key) is None:
                merged[key] = value
    for key in ("wall_seconds", "cpu_seconds"):
        merged[key] = round(sum(r[key] or 0 for r in merged["runs"]), 1)
    for key in ("dev", "test"):
        merged.pop(key, None)  # per run, in "runs"
    print(json.dumps(merged))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
