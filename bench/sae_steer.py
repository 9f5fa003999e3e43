"""SAE features on SmolLM2: train (or reuse) an SAE at one layer, report its quality, and compare steering with its
best formality feature (decoder row added; activation clamped) against a CAA vector and a prompt instruction on
the same held-out formal/casual pairs at matched KL on neutral text; then the decode cost of clamping.

    STEERSCALE_THREADS=1 python bench/sae_steer.py --out out/bench_sae          # ~20 min on one CPU core

Measured side by side in one run:
* SAE quality on held-out tokens (explained variance, L0, dead fraction) and the model's next-token loss on
  held-out texts clean / SAE spliced in / site mean-ablated;
* clamping a feature to its own activation changes nothing (max |logit difference|);
* effect (per-pair log-prob margin formal - casual, minus the unsteered margin; 95% bootstrap CI) of feature
  addition, feature clamping and CAA, each at the strength whose KL on the shipped neutral texts is --target-kl,
  and of the instruction 'Be formal.' (``steerscale.measure.sae_compare``); ratios with paired-bootstrap CIs;
* decode tokens/s at batch 8 with a clamp vs plain (alternating runs, median).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PROMPTS  # noqa: E402


def decode_speed(lm, interventions, n_tokens: int, reps: int) -> list[float]:
    from steerscale.engine.generation import generate

    out = []
    for _ in range(reps):
        t = time.perf_counter()
        generate(lm.model, lm.tokenizer, lm.layout, PROMPTS, interventions, max_new_tokens=n_tokens,
                 min_new_tokens=n_tokens)
        out.append(len(PROMPTS) * n_tokens / (time.perf_counter() - t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=40_000, help="activations collected for training")
    ap.add_argument("--train", default="architecture=topk,expansion=4,k=32,batch_size=512,steps=1500,"
                                        "checkpoint_every=250,resample_every=250")
    ap.add_argument("--corpus", default="olmo:lambada")
    ap.add_argument("--target-kl", type=float, default=0.1)
    ap.add_argument("--n-test", type=int, default=12)
    ap.add_argument("--speed-tokens", type=int, default=32)
    ap.add_argument("--speed-reps", type=int, default=3)
    ap.add_argument("--pairs", default="formal_casual", help="the concept: a bundled pairs name or a JSONL")
    ap.add_argument("--system", default="Be formal.", help="the prompting baseline's instruction")
    ap.add_argument("--select", default="separation", choices=["separation", "steering"],
                    help="choose the feature by separation of the pairs, or by its steering effect on the training "
                         "pairs among the 3 best-separating ones")
    ap.add_argument("--out", default="out/bench_sae")
    args = ap.parse_args()

    from steerscale.commands.sae_cmd import corpus_texts
    from steerscale.measure.sae_compare import compare, table
    from steerscale.models.loading import load_model
    from steerscale.steer.pairs import bundled_pairs
    from steerscale.steer.sae import ClampFeature, clamp_interventions, load_sae
    from steerscale.steer.sae.read import feature_acts, spliced_loss
    from steerscale.steer.sae.train import TrainConfig, train_sae
    from steerscale.engine.runtime import Intervention, intervene
    from steerscale.engine.capture import tokenize

    out = Path(args.out)
    lm = load_model(args.model)
    texts = corpus_texts(args.corpus)
    held_texts, train_texts = texts[:64], texts[len(texts) // 10:]
    t0 = time.perf_counter()
    sae, report = train_sae(lm, train_texts, f"resid_post.{args.layer}", out / "sae",
                            TrainConfig.build(**TrainConfig.parse(args.train)), args.tokens, corpus=args.corpus)
    train_s = time.perf_counter() - t0
    sae = load_sae(out / "sae", lm.layout)  # what a user gets back from disk
    q = report["held_out"]
    spliced = spliced_loss(lm, sae, held_texts)
    print(f"SAE {sae}: {report['train_tokens']} training tokens, {report['steps']} steps, {train_s:.0f} s")
    print(f"held-out tokens: explained variance {q['explained_variance']:.3f}, L0 {q['l0']:.1f}, "
          f"dead {q['dead_fraction']:.1%}")
    print(f"next-token loss on {len(held_texts)} held-out texts: clean {spliced['clean']:.3f}, spliced "
          f"{spliced['spliced']:.3f}, mean-ablated {spliced['mean_ablated']:.3f} (recovered {spliced['loss_recovered']:.1%})")

    # clamping a feature to the activation it already has is the identity (up to float error)
    probe = ["How was your weekend?", "The committee shall convene at noon."]
    batch = tokenize(lm.tokenizer, probe, "cpu")
    with torch.no_grad():
        plain = lm.model(**batch.model_inputs(), use_cache=False).logits
        f0 = feature_acts(lm, sae, probe)
        busiest = int(torch.cat(f0).sum(0).argmax())
        own = lambda h: sae.encode(h)[..., busiest]  # noqa: E731

        class Own(ClampFeature):  # the feature set to its own current value, token by token
            def _targets(self, h):
                return own(h)[..., None]

        with intervene(lm.layout, [Intervention(sae.site, Own(sae, busiest))]):
            same = lm.model(**batch.model_inputs(), use_cache=False).logits
    identity_err = float((same - plain).abs().max())
    print(f"clamp to own value (feature {busiest}): max |logit diff| {identity_err:.2e}")

    pairs = args.pairs if args.pairs.endswith(".jsonl") else bundled_pairs(args.pairs)
    result = compare(lm, sae, pairs, args.target_kl, args.n_test, system=args.system,
                     samples=["How was your weekend?", "Any advice for a first job?"], select=args.select)
    print(table(result))
    for name, r in result["ratios"].items():
        print(f"{name}: {r['mean']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]")
    for name, outs in result["samples"].items():
        for prompt, text in outs.items():
            print(f"[{name}] {prompt} -> {text!r}")

    clamp = clamp_interventions(sae, result["feature"]["feature"],
                                next(r["strength"] for r in result["rows"] if r["method"] == "clamp"))
    decode_speed(lm, [], 4, 1)  # warm-up
    plain_tps, clamp_tps = [], []
    for _ in range(args.speed_reps):
        plain_tps += decode_speed(lm, [], args.speed_tokens, 1)
        clamp_tps += decode_speed(lm, clamp, args.speed_tokens, 1)
    speed = statistics.median(clamp_tps) / statistics.median(plain_tps)
    print(f"decode batch 8: plain {statistics.median(plain_tps):.1f} tok/s, clamped {statistics.median(clamp_tps):.1f} "
          f"tok/s, ratio {speed:.3f}")

    rows = {r["method"]: r for r in result["rows"]}
    summary = {"model": lm.name, "site": sae.site.key(), "d_sae": sae.d_sae, "architecture": sae.architecture,
               "train_tokens": report["train_tokens"], "train_seconds": round(train_s, 1),
               "explained_variance": round(q["explained_variance"], 4), "l0": round(q["l0"], 2),
               "dead_fraction": round(q["dead_fraction"], 4), "loss_clean": round(spliced["clean"], 4),
               "loss_spliced": round(spliced["spliced"], 4), "loss_mean_ablated": round(spliced["mean_ablated"], 4),
               "loss_recovered": round(spliced["loss_recovered"], 4), "clamp_identity_max_logit_diff": identity_err,
               "pairs": Path(str(args.pairs)).stem, "select": args.select, "feature": result["feature"]["feature"], "feature_separation": round(result["feature"]["separation"], 3),
               "target_kl": args.target_kl,
               **{f"{m}_effect": round(rows[m]["effect"]["mean"], 4) for m in ("feature", "clamp", "caa", "prompt")},
               **{f"{m}_effect_ci": [round(rows[m]["effect"]["lo"], 4), round(rows[m]["effect"]["hi"], 4)]
                  for m in ("feature", "clamp", "caa", "prompt")},
               **{f"{m}_kl": round(rows[m]["kl"], 4) for m in ("feature", "clamp", "caa")},
               "sae_vs_caa_effect_ratio": round(result["ratios"]["feature_vs_caa"]["mean"], 3),
               "sae_vs_prompt_effect_ratio": round(result["ratios"]["feature_vs_prompt"]["mean"], 3),
               "clamp_vs_feature_effect_ratio": round(result["ratios"]["clamp_vs_feature"]["mean"], 3),
               "clamp_speed_ratio": round(speed, 3)}
    name = "result" + ("" if args.pairs == "formal_casual" else f"_{Path(args.pairs).stem}") + \
        ("" if args.select == "separation" else f"_{args.select}")
    (out / f"{name}.json").write_text(json.dumps({"summary": summary, "compare": result}, indent=1, default=str))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
