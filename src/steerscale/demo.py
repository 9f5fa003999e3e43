"""``steerscale demo``: the main job, end to end on the bundled model, offline, in a few minutes on a CPU.

1. Build a formal-vs-casual steering vector (CAA over the replies' mean activations, layer chosen by a held-out
   probe sweep) from the pairs shipped in ``steerscale/data/pairs/formal_casual.jsonl`` (training split only).
   Positive scales steer toward formal, negative toward casual.
2. Measure the effect at several strengths on held-out pairs the vector never saw: the mean per-token
   log-probability margin of the formal over the casual reply, with a 95% bootstrap interval, and the share of
   pairs where the formal reply is preferred.
3. Measure the cost: KL divergence of next-token distributions and perplexity change on neutral texts.
4. Show unsteered and steered generations side by side.
5. Scaling: greedy decoding against self-consistency and PRM-guided particle filtering on seeded three-number
   sums (3-shot plain-text prompt, the task of docs/scaling.md's three-number run): accuracy against generated
   tokens, and each strategy's gain over greedy on the same problems with a paired bootstrap interval.
Everything lands in the output folder: ``report.md``, ``effect_vs_scale.png``, ``sweep.png``,
``scaling.png``, ``results.json`` and the vector itself.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from .engine.generation import generate
from .measure.cost import steering_cost
from .measure.mc import score_choices
from .measure.stats import bootstrap_ci
from .models.loading import load_model
from .steer.extract import extract, sweep_plot
from .steer.pairs import bundled_pairs, load_pairs

DEMO_PROMPTS = ["How was your weekend?", "Can you explain what a black hole is?", "Any advice for a first job?"]
PROMPT_BASELINE = "Be formal."  # the plain instruction steering is read against (AxBench: often hard to beat)


def split_pairs(pairs, n_test: int, seed: int):
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    return [pairs[i] for i in order[n_test:]], [pairs[i] for i in order[:n_test]]


def effect_on_heldout(lm, vector, scale: float, held, system: str | None = None) -> dict:
    """Mean per-token log-prob margin formal - casual on held-out pairs, and the share preferring formal
    (``system``: a system prompt before every question, the prompting baseline)."""
    scores = score_choices(lm.model, lm.tokenizer, [p.prompt for p in held], [[p.positive, p.negative] for p in held],
                           vector.interventions(scale) if scale else (), layout=lm.layout, system=system)
    margins = [s["mean_logprobs"][0] - s["mean_logprobs"][1] for s in scores]
    return {"margin": bootstrap_ci(margins).to_dict(), "prefer_formal": sum(m > 0 for m in margins) / len(margins)}


def plot_effect(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [r["scale"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    mean = [r["effect"]["margin"]["mean"] for r in rows]
    lo = [r["effect"]["margin"]["lo"] for r in rows]
    hi = [r["effect"]["margin"]["hi"] for r in rows]
    ax.plot(scales, mean, marker="o", color="tab:blue", label="effect: formal - casual log-prob margin")
    ax.fill_between(scales, lo, hi, color="tab:blue", alpha=0.2)
    ax.set_xlabel("steering scale (1 = the data's own mean difference)")
    ax.set_ylabel("held-out log-prob margin (nats/token)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(scales, [r["cost"]["kl"]["mean"] for r in rows], marker="s", color="tab:red", label="cost: KL on neutral text")
    ax2.set_ylabel("KL(base || steered), nats/token", color="tab:red")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88), fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# (label, strategy, n, verifier): greedy, and two ways to spend about four samples' tokens: a vote over whole
# samples, and step-level search guided by the arithmetic PRM (bench/scaling.py has the full sweep).
SCALING_METHODS = [("greedy", "greedy", {}), ("majority vote, 4 samples", "majority", {"n": 4}),
                   ("particle filter, 4 particles (arithmetic PRM)", "particle_filter",
                    {"n": 4, "verifier": "arith_prm"})]
SCALING_PROBLEMS = 32  # what fits the whole demo in about 3 minutes on 2 idle CPU cores (about 4 s a problem)


def scaling_section(lm, n_problems: int, seed: int = 0) -> list[dict]:
    """Accuracy, generated tokens per problem and the paired gain over greedy for each of ``SCALING_METHODS`` on
    ``measure.tasks.arith.three_number_sums``, run as bench/scaling.py runs it: raw completion, temperature 0.7, a
    step is one line, every problem sampled from its own seed. Each method is one ``StrategySpec``."""
    from .measure.stats import paired_compare
    from .measure.tasks.arith import three_number_sums
    from .scale import LocalBackend, StrategySpec, derive_seed

    backend = LocalBackend(lm.model, lm.tokenizer, lm.layout, chat=False)
    problems = three_number_sums(n_problems, seed)
    knobs = dict(max_tokens=40, temperature=0.7, step="\n", stop=["\n\n", "Question:"], max_step_tokens=40)
    rows = []
    for label, name, options in SCALING_METHODS:
        spec = StrategySpec.of(name, **knobs, **options)
        n = spec.knobs.get("n", 1)
        correct, tokens = [], []
        for i, prob in enumerate(problems):
            r = spec.with_knobs(seed=derive_seed(seed, i)).run(prob.question, backend)
            correct.append(float(r.answer == prob.answer))
            tokens.append(r.generated_tokens)
        gain = paired_compare(rows[0]["correct"], correct) if rows else None
        rows.append({"method": label, "strategy": name, "n": n, "accuracy": bootstrap_ci(correct).to_dict(),
                     "gain_vs_greedy": gain.to_dict() if gain else None,
                     "tokens_per_problem": sum(tokens) / len(tokens), "correct": correct})
    return rows


def plot_scaling(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        a, g = r["accuracy"], r.get("gain_vs_greedy")
        gain = f" (gain vs greedy {g['diff']:+.2f} [{g['lo']:+.2f}, {g['hi']:+.2f}])" if g else ""
        ax.errorbar(r["tokens_per_problem"], a["mean"], yerr=[[a["mean"] - a["lo"]], [a["hi"] - a["mean"]]],
                    fmt="o", capsize=4, label=r["method"] + gain)
    ax.set_xscale("log")
    for set_formatter in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        set_formatter(ScalarFormatter())  # 30, 40, 60 rather than 3x10^1 on a range shorter than a decade
    ax.set_xlabel("generated tokens per problem (log scale)")
    ax.set_ylabel("accuracy (95% bootstrap CI)")
    ax.set_ylim(-0.02, min(1.02, max(r["accuracy"]["hi"] for r in rows) + 0.15))  # room for the legend
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(model: str, out_dir: str | Path, scales=(-1.0, -0.5, 0.0, 0.5, 1.0), gen_scales=(-1.0, 0.0, 1.0),
             n_test: int = 12, max_new_tokens: int = 40, seed: int = 0, device: str = "auto",
             scaling_problems: int = SCALING_PROBLEMS, log=print) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log(f"[1/5] loading {model}")
    lm = load_model(model, device=device)
    train, held = split_pairs(load_pairs(bundled_pairs("formal_casual")), n_test, seed)

    log(f"[2/5] extracting a formal-vs-casual CAA vector from {len(train)} pairs (layer chosen by a probe sweep)")
    # Mean over the reply's tokens: a style lives in every token of the reply, not only in its last one.
    vector, sweep = extract(lm, train, "caa", "auto", read="mean", return_sweep=True, seed=seed)
    vector_path = vector.save(out / "formal.safetensors")
    sweep_plot(sweep, out / "sweep.png", f"{lm.name}: held-out probe accuracy, formal vs casual")
    layer = vector.layers[0]

    log(f"[3/5] measuring effect on {len(held)} held-out pairs and cost on neutral text at scales {list(scales)}")
    rows = []
    for scale in scales:
        effect = effect_on_heldout(lm, vector, scale, held)
        cost = steering_cost(lm.model, lm.tokenizer, lm.layout, vector.interventions(scale) if scale else [])
        rows.append({"scale": scale, "effect": effect, "cost": cost})
        m = effect["margin"]
        log(f"  scale {scale:>4}: margin {m['mean']:+.3f} [{m['lo']:+.3f}, {m['hi']:+.3f}]  "
            f"prefer formal {effect['prefer_formal']:.0%}  KL {cost['kl']['mean']:.3f}  ppl x{cost['ppl_ratio']:.2f}")
    plot_effect(rows, out / "effect_vs_scale.png", f"{lm.name}: formal steering at layer {layer}")
    prompted = []  # the instruction alone, and with the strongest formal steering, on the same held-out pairs
    for scale in sorted({0.0, max(scales)}):
        effect = effect_on_heldout(lm, vector, scale, held, system=PROMPT_BASELINE)
        prompted.append({"scale": scale, "system": PROMPT_BASELINE, "effect": effect})
        m = effect["margin"]
        log(f"  system prompt {PROMPT_BASELINE!r} + scale {scale}: margin {m['mean']:+.3f} "
            f"[{m['lo']:+.3f}, {m['hi']:+.3f}]  prefer formal {effect['prefer_formal']:.0%}")

    log(f"[4/5] generating side by side at scales {list(gen_scales)} (greedy, {max_new_tokens} tokens)")
    samples = []
    for scale in gen_scales:
        gens = generate(lm.model, lm.tokenizer, lm.layout, DEMO_PROMPTS, vector.interventions(scale) if scale else [],
                        max_new_tokens=max_new_tokens)
        samples.append({"scale": scale, "texts": [g.text for g in gens]})
    for i, prompt in enumerate(DEMO_PROMPTS):
        log(f"\n>>> {prompt}")
        for s in samples:
            log(f"  [scale {s['scale']}] {s['texts'][i]!r}")

    scaling = []
    if scaling_problems:
        log(f"\n[5/5] scaling: greedy vs sampling and search strategies on {scaling_problems} three-number sums "
            "(3-shot prompt)")
        scaling = scaling_section(lm, scaling_problems, seed)
        for r in scaling:
            a, g = r["accuracy"], r["gain_vs_greedy"]
            log(f"  {r['method']:46} accuracy {a['mean']:.2f} [{a['lo']:.2f}, {a['hi']:.2f}]  "
                f"{r['tokens_per_problem']:3.0f} tokens/problem"
                + (f"  gain vs greedy {g['diff']:+.2f} [{g['lo']:+.2f}, {g['hi']:+.2f}] ({g['wins']} won, "
                   f"{g['losses']} lost)" if g else ""))
        plot_scaling(scaling, out / "scaling.png", f"{lm.name}: {scaling_problems} three-number sums, 3-shot")

    results = {"model": lm.name, "scaling": scaling, "layer": layer, "vector": str(vector_path), "n_train_pairs": len(train),
               "n_heldout_pairs": len(held), "sweep": sweep.table(), "rows": rows, "prompted": prompted,
               "samples": samples,
               "prompts": DEMO_PROMPTS, "seconds": round(time.perf_counter() - started, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(render_report(results))
    log(f"\nwrote {out / 'report.md'} (and effect_vs_scale.png, sweep.png, scaling.png, results.json, formal.safetensors) "
        f"in {results['seconds']} s")
    return results


def render_report(r: dict) -> str:
    lines = [
        f"# steerscale demo: formal-vs-casual steering on {r['model']}",
        "",
        f"CAA vector from {r['n_train_pairs']} contrastive pairs, applied at the output of block {r['layer']} "
        f"(chosen by a held-out probe sweep, `sweep.png`). Effect measured on {r['n_heldout_pairs']} held-out pairs; "
        "cost on neutral texts. Run time: " + f"{r['seconds']} s.",
        "",
        "| scale | effect: formal - casual margin (nats/token) [95% CI] | prefers formal | KL on neutral text [95% CI] | perplexity ratio |",
        "|---:|---|---:|---|---:|",
    ]
    for row in r["rows"]:
        m, kl = row["effect"]["margin"], row["cost"]["kl"]
        lines.append(f"| {row['scale']} | {m['mean']:+.3f} [{m['lo']:+.3f}, {m['hi']:+.3f}] | "
                     f"{row['effect']['prefer_formal']:.0%} | {kl['mean']:.4f} [{kl['lo']:.4f}, {kl['hi']:.4f}] | "
                     f"{row['cost']['ppl_ratio']:.3f} |")
    for row in r.get("prompted", []):  # the prompting baseline: a system prompt changes the context, not the model
        m = row["effect"]["margin"]
        steer = "prompt only" if not row["scale"] else f"prompt + scale {row['scale']}"
        kl = "- (context, not model)" if not row["scale"] else "as scale " + str(row["scale"]) + " above"
        lines.append(f"| {steer}: system \"{row['system']}\" | {m['mean']:+.3f} [{m['lo']:+.3f}, {m['hi']:+.3f}] | "
                     f"{row['effect']['prefer_formal']:.0%} | {kl} | - |")
    lines += ["", "![effect and cost against scale](effect_vs_scale.png)", "", "## Generations (greedy)", ""]
    for i, prompt in enumerate(r["prompts"]):
        lines.append(f"**{prompt}**\n")
        for s in r["samples"]:
            lines.append(f"- scale {s['scale']}: {s['texts'][i]}")
        lines.append("")
    if r.get("scaling"):
        task = (f"{r['scaling'][0]['accuracy']['n']} seeded sums of three one-digit numbers (`a +/- b +/- c`), "
                "each asked in a 3-shot plain-text prompt (worked examples, one `a op b = c` per line, then "
                "`Answer: N`) completed without the chat template; temperature 0.7, a step is one line. Gain: "
                "the method's accuracy minus greedy's on the same problems, with a paired bootstrap interval, "
                "the problems it solved that greedy did not (won) and the reverse (lost), and the two-sided sign "
                "test on those.")
        header = ("| method | accuracy [95% CI] | gain vs greedy [95% CI] | won / lost | sign test p | "
                  "generated tokens / problem |")
        lines += ["## Scaling: accuracy against compute", "", task, "", header, "|---|---|---|---|---:|---:|"]
        for row in r["scaling"]:
            a, g = row["accuracy"], row["gain_vs_greedy"]
            gain = (f"{g['diff']:+.2f} [{g['lo']:+.2f}, {g['hi']:+.2f}] | {g['wins']} / {g['losses']} | "
                    f"{g['p_sign']:.3g}") if g else "- | - | -"
            lines.append(f"| {row['method']} | {a['mean']:.2f} [{a['lo']:.2f}, {a['hi']:.2f}] | {gain} | "
                         f"{row['tokens_per_problem']:.0f} |")
        lines += ["", "![accuracy against tokens](scaling.png)", ""]
    return "\n".join(lines)
