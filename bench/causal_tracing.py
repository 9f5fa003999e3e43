"""Causal tracing on SmolLM2-135M-Instruct: where factual recall and TruthfulQA truthfulness are carried.

(a) Factual prompts (ROME style, written below): the subject is corrupted with noise (3 x the embedding std) and the
    metric is p(target), the prompt read as plain text (no chat template). Only prompts the model gets right are
    traced: the target must have the highest log-prob among all the targets of the set.
(b) TruthfulQA (mc_task.json, the MC1 rows): the question is corrupted (all of the user's text inside the chat
    template, as ``measure.mc`` scores it) and the metric is log p(true answer) - log p(first false answer).

Each part traces resid_post, aggregates per (layer, position class) over prompts (ROME's classes), saves the
heatmap under docs/img/ and the trace files under out/tracing/, and prints the top layers; the last line is one
JSON object. CPU budget (a shared 2-core machine): 2 noise draws, at most 8 facts on every 2nd layer, 4 TruthfulQA
questions on every 3rd layer at their last 7 tokens by default; the knobs are flags.

    python bench/causal_tracing.py                      # 18 minutes on 2 CPU cores shared with other jobs
    python bench/causal_tracing.py --facts 20 --fact-layer-step 1 --tqa 20 --tqa-layer-step 1 --samples 10  # ROME-like
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from steerscale.engine.choices import build_items, choice_logprob_sums
from steerscale.measure.tasks.truthfulqa import load_mc_rows
from steerscale.models import load_model
from steerscale.steer.tracing import TraceCase, aggregate, trace_many

ROOT = Path(__file__).resolve().parent.parent
T0 = time.time()

# (prompt, target, subject): simple facts a 135M model may know.
FACTS = [
    ("The Eiffel Tower is located in the city of", " Paris", "Eiffel Tower"),
    ("The Colosseum is located in the city of", " Rome", "Colosseum"),
    ("Big Ben is located in the city of", " London", "Big Ben"),
    ("The Statue of Liberty is located in the city of", " New", "Statue of Liberty"),
    ("The Brandenburg Gate is located in the city of", " Berlin", "Brandenburg Gate"),
    ("The Kremlin is located in the city of", " Moscow", "Kremlin"),
    ("The Sagrada Familia is located in the city of", " Barcelona", "Sagrada Familia"),
    ("The Acropolis is located in the city of", " Athens", "Acropolis"),
    ("Mount Fuji is located in the country of", " Japan", "Mount Fuji"),
    ("The Taj Mahal is located in the country of", " India", "Taj Mahal"),
    ("The Great Wall is located in the country of", " China", "Great Wall"),
    ("The pyramids of Giza are located in the country of", " Egypt", "pyramids of Giza"),
    ("The Amazon rainforest is mostly located in the country of", " Brazil", "Amazon rainforest"),
    ("Toronto is a city in the country of", " Canada", "Toronto"),
    ("Sydney is a city in the country of", " Australia", "Sydney"),
    ("Madrid is the capital city of", " Spain", "Madrid"),
    ("Lisbon is the capital city of", " Portugal", "Lisbon"),
    ("Stockholm is the capital city of", " Sweden", "Stockholm"),
    ("Albert Einstein was born in the country of", " Germany", "Albert Einstein"),
    ("Leonardo da Vinci was born in the country of", " Italy", "Leonardo da Vinci"),
    ("The native language of Pablo Picasso was", " Spanish", "Pablo Picasso"),
    ("The native language of Victor Hugo was", " French", "Victor Hugo"),
]


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def known_facts(lm) -> tuple[list[TraceCase], list[dict]]:
    """The facts whose target has the highest log-prob among every target of the set (first token only: targets
    of different lengths are compared fairly)."""
    pool = list(dict.fromkeys(t for _, t, _ in FACTS))
    # build_items puts the space between prompt and completion itself: pass the targets without theirs.
    items = build_items(lm.tokenizer, [p for p, _, _ in FACTS], [[t.strip() for t in pool]] * len(FACTS), chat=False)
    for it in items:  # " New" vs " Paris": the first token decides
        it.choices = [c[:1] for c in it.choices]
    with torch.no_grad():
        sums = choice_logprob_sums(lm.model, items, lm.tokenizer.pad_token_id or 0)
    kept, report = [], []
    for (prompt, target, subject), row in zip(FACTS, sums):
        best = pool[int(row.argmax())]
        p = float(row[pool.index(target)].exp())
        report.append({"prompt": prompt, "target": target, "p_target": round(p, 4), "argmax": best})
        if best == target:
            kept.append(TraceCase(prompt, target, subject=subject))
    return kept, report


def truthfulqa_cases(n: int, seed: int) -> list[TraceCase]:
    rows = load_mc_rows()
    pick = sorted(random.Random(seed).sample(range(len(rows)), n))
    cases = []
    for i in pick:
        answers = rows[i]["mc1_targets"]
        true = next(a for a, y in answers.items() if int(y) == 1)
        false = next(a for a, y in answers.items() if int(y) == 0)
        cases.append(TraceCase(rows[i]["question"], true, foil=false))
    return cases


def summarise(name: str, agg, results, png: Path, seconds: float) -> dict:
    agg.save(ROOT / "out" / "tracing" / f"{name}.json")
    agg.heatmap(png, title=f"SmolLM2-135M, {name}, mean of {len(results)} prompts: {agg.metric} restored by "
                           f"resid_post")
    log(f"{name}: wrote {png.relative_to(ROOT)}; clean {agg.clean:.4f}, corrupted {agg.corrupted:.4f}")
    for row in agg.table(5):
        log(f"  layer {row['layer']:>2}: effect {row['effect']:+.4f} at {row['at']}")
    by_class = {label: [round(float(v), 4) for v in agg.effects[:, j]] for j, label in enumerate(agg.labels)}
    peak = {label: agg.layers[int(agg.effects[:, j].argmax())] for j, label in enumerate(agg.labels)}
    log(f"  peak layer per position class: {peak}")
    return {"n": len(results), "clean": round(agg.clean, 4), "corrupted": round(agg.corrupted, 4),
            "top_layers": agg.top_layers(5), "peak_layer_by_class": peak, "layers": list(agg.layers),
            "effects_by_class": by_class, "seconds": round(seconds, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--samples", type=int, default=2, help="noise draws per prompt (ROME: 10)")
    ap.add_argument("--noise", type=float, default=3.0)
    ap.add_argument("--facts", type=int, default=8,
                    help="trace this many of the facts the model knows (a seeded sample)")
    ap.add_argument("--fact-layer-step", type=int, default=2, help="trace every k-th layer for the facts")
    ap.add_argument("--tqa", type=int, default=4, help="TruthfulQA questions (0: skip)")
    ap.add_argument("--tqa-layer-step", type=int, default=3, help="trace every k-th layer for TruthfulQA")
    ap.add_argument("--tqa-positions", type=int, default=7,
                    help="trace the last N prompt tokens for TruthfulQA (the question's end and the chat template's "
                         "tail; 0: every position from the question's start)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--img", default=str(ROOT / "docs" / "img"))
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model(args.model)
    lm.model.eval()
    img = Path(args.img)
    log(f"{args.model}: {lm.layout.n_layers} layers; threads {torch.get_num_threads()}")
    knobs = dict(samples=args.samples, noise=args.noise, seed=args.seed, progress=False)

    kept, report = known_facts(lm)
    log(f"factual: the model gets {len(kept)}/{len(FACTS)} right (target = argmax among the set's targets)")
    t = time.time()
    chosen = sorted(random.Random(args.seed).sample(range(len(kept)), min(args.facts, len(kept))))
    facts = trace_many(lm, [kept[i] for i in chosen], chat=False, metric="prob",
                       layers=list(range(0, lm.layout.n_layers, args.fact_layer_step)), **knobs)
    out = {"factual": summarise("factual", aggregate(facts), facts, img / "trace_factual.png", time.time() - t)}
    out["factual"]["n_total"] = len(FACTS)
    out["factual"]["per_prompt"] = [{"prompt": r.metadata["prompt"], "clean": round(r.clean, 4),
                                     "corrupted": round(r.corrupted, 4)} for r in facts]
    out["factual"]["missed"] = [r for r in report if r["argmax"] != r["target"]]

    if args.tqa:
        cases = truthfulqa_cases(args.tqa, args.seed)
        layers = list(range(0, lm.layout.n_layers, args.tqa_layer_step))
        t = time.time()
        positions = list(range(-args.tqa_positions, 0)) if args.tqa_positions else None
        tqa = trace_many(lm, cases, layers=layers, positions=positions, **knobs)
        out["truthfulqa"] = summarise("truthfulqa", aggregate(tqa), tqa, img / "trace_truthfulqa.png", time.time() - t)
        out["truthfulqa"]["per_prompt"] = [{"question": r.metadata["prompt"], "clean": round(r.clean, 3),
                                            "corrupted": round(r.corrupted, 3)} for r in tqa]
    out.update(model=args.model, samples=args.samples, noise=args.noise, seed=args.seed, facts_traced=len(facts),
               fact_layer_step=args.fact_layer_step, tqa_layer_step=args.tqa_layer_step,
               tqa_positions=args.tqa_positions,
               threads=torch.get_num_threads(), seconds=round(time.time() - T0, 1))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
