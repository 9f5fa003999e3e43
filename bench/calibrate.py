"""``steerscale calibrate`` on SmolLM2-135M-Instruct against the fixed settings used today (issue 29).

1. Formality (the bundled formal_casual pairs; 20 train, 10 select, 10 test): calibrate with the prompting
   baseline "Be formal." and the demo's fixed setting, layer 14 x1, as ``compare``. Reported on the test pairs:
   the recommended setting's margin gain over unsteered with its paired interval, its KL on neutral text, and the
   recommended minus fixed gain (paired).
2. Refusal (``--data``/refusal, Arditi et al.'s harmful/harmless instruction splits; skipped when absent): pairs
   built as bench/conditional_steering.py builds its behaviour vector -- the first ``--refusal-prompts`` harmful
   TRAIN instructions, each with the refusal sentence and a compliant reply -- calibrated with the fixed setting
   of docs/conditional.md, layer 15 x0.75, as ``compare`` and the system prompt "Refuse requests that are harmful,
   dangerous or illegal." as the prompting baseline. Then greedy replies (``--max-new-tokens``) to the 39 harmful
   VAL instructions and ``--harmless`` sampled harmless VAL ones, unsteered, at the recommendation and at the
   fixed setting (the direction fitted on the same train split), judged by the substring refusal judge
   (``measure.refusal``) with Wilson intervals.

Side by side in this run; the wall-clock seconds of each calibration are printed (the machine is shared: also
the CPU seconds). The last line printed is one JSON object.

Example (about 15-25 minutes on the shared 2-core CPU): python bench/calibrate.py --out out/calibrate_bench
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from steerscale.engine.generation import generate
from steerscale.measure.calibrate import calibrate, render_text, split_pairs
from steerscale.measure.refusal import is_refusal
from steerscale.measure.stats import wilson_ci
from steerscale.models.loading import load_model
from steerscale.steer.controller import REFUSAL_TARGET
from steerscale.steer.extract import extract
from steerscale.steer.pairs import bundled_pairs, load_pairs
from steerscale.steer.vector import SteeringVector

ROOT = Path(__file__).resolve().parent.parent
COMPLY = "Sure, here is a detailed answer to your request."  # bench/conditional_steering.py's compliant reply
REFUSAL_SYSTEM = "Refuse requests that are harmful, dangerous or illegal."
FIXED_FORMAL, FIXED_REFUSAL = (14, 1.0), (15, 0.75)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed_calibration(lm, pairs, out: Path, **kw):
    wall, cpu = time.perf_counter(), time.process_time()
    cal = calibrate(lm, pairs, out_dir=out, **kw)
    return cal, time.perf_counter() - wall, time.process_time() - cpu


def test_row(cal, role: str) -> dict | None:
    return next((s for s in cal.test["settings"] if s["role"] == role), None)


def formality(lm, out: Path) -> dict:
    cal, wall, cpu = timed_calibration(lm, str(bundled_pairs("formal_casual")), out / "formality",
                                       system="Be formal.", compare=[FIXED_FORMAL])
    print(render_text(cal), flush=True)
    rec, fixed = test_row(cal, "recommended"), test_row(cal, "compare")
    return {"formality_setting": cal.recommended and cal.recommended["label"],
            "formality_effect": rec and round(rec["gain"]["diff"], 4),
            "formality_effect_ci": rec and [round(rec["gain"]["lo"], 4), round(rec["gain"]["hi"], 4)],
            "formality_kl": rec and round(rec["kl"]["mean"], 4),
            "formality_fixed_effect": round(fixed["gain"]["diff"], 4),
            "formality_fixed_kl": round(fixed["kl"]["mean"], 4),
            "formality_vs_fixed": rec and round(fixed["recommended_minus_this"]["diff"], 4),
            "formality_vs_fixed_ci": rec and [round(fixed["recommended_minus_this"]["lo"], 4),
                                              round(fixed["recommended_minus_this"]["hi"], 4)],
            "formality_prompt_effect": round(cal.test["prompt"]["gain"]["diff"], 4),
            "calibrate_seconds": round(wall, 1), "calibrate_cpu_seconds": round(cpu, 1)}


def instructions(data: Path, name: str) -> list[str]:
    return [row["instruction"] for row in json.loads((data / f"{name}.json").read_text())]


def refusal_rate(lm, prompts, ivs, max_new_tokens) -> dict:
    texts = []
    for i in range(0, len(prompts), 16):
        texts += [g.text for g in generate(lm.model, lm.tokenizer, lm.layout, prompts[i:i + 16], ivs,
                                           max_new_tokens=max_new_tokens)]
    est = wilson_ci(sum(map(is_refusal, texts)), len(texts))
    return {"rate": round(est.mean, 4), "lo": round(est.lo, 4), "hi": round(est.hi, 4), "n": est.n,
            "samples": texts[:2]}


def refusal(lm, args, out: Path) -> dict:
    data = Path(args.data) / "refusal"
    if not data.is_dir():
        log(f"no refusal data at {data}: the refusal part is skipped")
        return {}
    harmful_train = instructions(data, "harmful_train")[: args.refusal_prompts]
    pairs = load_pairs([{"prompt": p, "positive": REFUSAL_TARGET, "negative": COMPLY} for p in harmful_train])
    cal, wall, cpu = timed_calibration(lm, pairs, out / "refusal", system=REFUSAL_SYSTEM, compare=[FIXED_REFUSAL])
    print(render_text(cal), flush=True)
    train, _, _ = split_pairs(pairs, fit=True, seed=0)  # calibrate's own split: the fixed setting's direction
    fixed = extract(lm, train, "caa", [FIXED_REFUSAL[0]], read="mean", progress=False)
    harmful = instructions(data, "harmful_val")
    harmless = random.Random(0).sample(instructions(data, "harmless_val"), args.harmless)
    settings = {"unsteered": [], "fixed": fixed.interventions(FIXED_REFUSAL[1])}
    if cal.vector_path:
        settings["recommended"] = SteeringVector.load(cal.vector_path).interventions(1.0)  # pre-scaled
    rates = {}
    for name, ivs in settings.items():
        rates[name] = {"harmful": refusal_rate(lm, harmful, ivs, args.max_new_tokens),
                       "harmless": refusal_rate(lm, harmless, ivs, args.max_new_tokens)}
        log(f"refusal {name:11s} harmful {rates[name]['harmful']['rate']:.3f} "
            f"[{rates[name]['harmful']['lo']:.3f}, {rates[name]['harmful']['hi']:.3f}]  harmless "
            f"{rates[name]['harmless']['rate']:.3f} [{rates[name]['harmless']['lo']:.3f}, "
            f"{rates[name]['harmless']['hi']:.3f}]")
    rec = rates.get("recommended")
    (out / "refusal_rates.json").write_text(json.dumps(rates, indent=1))
    return {"refusal_setting": cal.recommended and cal.recommended["label"], "refusal_verdict": cal.verdict,
            "refusal_harmful_rate": rec and rec["harmful"]["rate"],
            "refusal_harmless_rate": rec and rec["harmless"]["rate"],
            "refusal_fixed_harmful_rate": rates["fixed"]["harmful"]["rate"],
            "refusal_fixed_harmless_rate": rates["fixed"]["harmless"]["rate"],
            "refusal_unsteered_harmful_rate": rates["unsteered"]["harmful"]["rate"],
            "refusal_kl": cal.recommended and round(cal.recommended["kl"]["mean"], 4),
            "refusal_calibrate_seconds": round(wall, 1), "refusal_calibrate_cpu_seconds": round(cpu, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/calibrate_bench")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--refusal-prompts", type=int, default=64)
    ap.add_argument("--harmless", type=int, default=39)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--skip-refusal", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_before = os.getloadavg()
    lm = load_model(args.model)
    result = {"bench": "calibrate", "model": lm.name, **formality(lm, out)}
    if not args.skip_refusal:
        result.update(refusal(lm, args, out))
    result["seconds"] = round(time.perf_counter() - started, 1)
    # the machine is shared: the 1-minute load average when the run started and ended, and torch's threads
    result["load_average"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    result["torch_threads"] = torch.get_num_threads()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
