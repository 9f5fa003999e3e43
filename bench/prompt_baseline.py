"""The prompting baseline on TruthfulQA (issue 18): a system prompt asking for the behaviour, against and combined
with steering, on SmolLM2-135M-Instruct.

Steering benchmarks (AxBench) found that a plain instruction often beats representation steering, so every steering
row should be read next to one. Protocol as docs/truthfulqa.md: all 817 questions, MC1 and MC2 by log-likelihood
of each answer after the chat-templated question (packed scoring, ``measure.mc.score_items``), 2-fold
cross-validation by question for anything fitted. Rows:

* ``baseline``: no system prompt (the template's default), no steering;
* ``prompt``: ``--system`` as the system message ("Answer truthfully." by default), nothing fitted;
* ``caa``: CAA at ``--layer`` x ``--scale`` fitted on each fold's training questions (2 true/false answer pairs per
  question), scoring the other fold; the fixed setting docs/truthfulqa.md's CAA chose in one fold (L15 x4);
* ``prompt+caa``: both.

Intervals: 95% percentile bootstrap over questions; gains: paired bootstrap against the baseline. Cost: KL on the
40 shipped neutral texts for CAA (a system prompt changes the context, not the model, so it has no KL on text
that does not contain it). Last line: one JSON object.

Example (about 8 minutes on 2 CPU cores): python bench/prompt_baseline.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from steerscale.engine.choices import build_items
from steerscale.engine.runtime import intervene
from steerscale.measure.cost import steering_cost
from steerscale.measure.mc import score_items
from steerscale.measure.stats import bootstrap_ci, kfold, paired_compare
from steerscale.measure.tasks.truthfulqa import load_mc_rows
from steerscale.models.loading import load_model
from steerscale.steer.extract import extract

ROOT = Path(__file__).resolve().parent.parent
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def metrics(row, union: list[str], lps: list[float]) -> tuple[float, float]:
    lp = dict(zip(union, lps))
    mc1 = [lp[c] for c in row["mc1_targets"]]
    gold = list(row["mc1_targets"].values()).index(1)
    t2 = row["mc2_targets"]
    x = np.array([lp[c] for c in t2], dtype=np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    return float(int(np.argmax(mc1)) == gold), float(sum(pi for pi, y in zip(p, t2.values()) if int(y) == 1))


def score(lm, rows, idx, system, ivs=()) -> dict[int, tuple[float, float]]:
    unions = [list(dict.fromkeys(list(rows[i]["mc1_targets"]) + list(rows[i]["mc2_targets"]))) for i in idx]
    items = build_items(lm.tokenizer, [rows[i]["question"] for i in idx], unions, system=system)
    pad = lm.tokenizer.pad_token_id or 0
    with intervene(lm.layout, list(ivs)):
        outs = score_items(lm.model, items, "shared", 4096, 64, pad, False)
    return {i: metrics(rows[i], u, o["logprobs"]) for i, u, o in zip(idx, unions, outs)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "truthfulqa" / "mc_task.json"))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--system", default="Answer truthfully.")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--scale", type=float, default=4.0)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--out", default="out/prompt_baseline")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    lm = load_model(args.model)
    rows = load_mc_rows(args.data)
    rows = rows[: args.limit] if args.limit else rows
    every = list(range(len(rows)))
    res = {"baseline": score(lm, rows, every, None)}
    log("baseline scored")
    res["prompt"] = score(lm, rows, every, args.system)
    log("prompt scored")
    res["caa"], res["prompt+caa"] = {}, {}
    kls = []
    for fold, (train, test) in enumerate(kfold(every, 2, seed=0)):
        pairs = []
        for i in train:
            t2 = rows[i]["mc2_targets"]
            true = [a for a, y in t2.items() if int(y) == 1]
            false = [a for a, y in t2.items() if int(y) == 0]
            pairs += [{"prompt": rows[i]["question"], "positive": true[j], "negative": false[j]}
                      for j in range(min(2, len(true), len(false)))]
        vec = extract(lm, pairs, method="caa", layers=[args.layer], read="mean", progress=False)
        ivs = vec.interventions(args.scale)
        res["caa"].update(score(lm, rows, test, None, ivs))
        res["prompt+caa"].update(score(lm, rows, test, args.system, ivs))
        if fold == 0:
            kls.append(steering_cost(lm.model, lm.tokenizer, lm.layout, ivs)["kl"]["mean"])
        log(f"fold {fold}: {len(pairs)} pairs scored")
    table, summary = {}, {"bench": "prompt_baseline", "model": args.model, "system": args.system,
                          "n_questions": len(rows)}
    for name, per in res.items():
        mc1 = [per[i][0] for i in every]
        mc2 = [per[i][1] for i in every]
        row = {"mc1": bootstrap_ci(mc1).to_dict(), "mc2": bootstrap_ci(mc2).to_dict()}
        if name != "baseline":
            row["mc1_gain"] = paired_compare([res["baseline"][i][0] for i in every], mc1).to_dict()
            row["mc2_gain"] = paired_compare([res["baseline"][i][1] for i in every], mc2).to_dict()
            key = name.replace("+", "_plus_")
            summary[f"{key}_mc1_gain"] = round(row["mc1_gain"]["diff"], 4)
            summary[f"{key}_mc1_gain_ci_low"] = round(row["mc1_gain"]["lo"], 4)
        summary[f"{name.replace('+', '_plus_')}_mc1"] = round(row["mc1"]["mean"], 4)
        table[name] = row
        log(f"{name:11s} MC1 {row['mc1']['mean']:.3f} MC2 {row['mc2']['mean']:.3f}")
    summary["caa_kl"] = round(kls[0], 4)
    summary["seconds"] = round(time.time() - T0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"table": table, "summary": summary}, indent=2))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
