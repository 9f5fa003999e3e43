"""CASAL on SmolLM2-135M-Instruct: the demo's formality vector amortised into one layer's MLP, side by side with
the hooked vector (issue 18, method 2).

Protocol. The demo's vector (``steerscale.demo``: CAA over the replies' mean activations on the 28 training
pairs of ``formal_casual``, layer picked by the probe sweep, seed 0) at ``--scale`` (default 1, the demo's
strongest formal setting). CASAL trains on the full texts of the same 28 training pairs (both replies) and keeps
the even-numbered half of the 40 shipped neutral texts at their unsteered activations. Rows:

* ``unsteered``: the base model;
* ``hooked``: the vector through hooks;
* ``casal r=8 (baked)``: the rank-8 update, written with ``bake_casal`` and reloaded with ``load_model(DIR)``;
* further CASAL rows (rank 4 and 16 with keep texts, rank 8 without), measured in memory with the update
  merged (``steerscale.steer.casal.merged``; the baked row checks that the checkpoint equals the merged model).

Metrics: the demo's formality margin (``demo.effect_on_heldout``: mean per-token log-prob of the formal minus
the casual reply on the 12 held-out pairs, 95% bootstrap interval, share preferring formal), and the KL of each
model's next-token distributions from the base model's on the odd-numbered half of the neutral texts (never
trained on), computed as ``measure.cost.steering_cost`` does (mean per-token KL(base || model) per text; the
hooked row is also checked against ``steering_cost`` itself). CASAL rows add training seconds, the FLOPs estimate,
the parameters changed and the relative MSE at the trained layer (1 = unsteered, 0 = exact). Last line: JSON.

Example (about 5 minutes on 2 CPU cores): python bench/casal.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from steerscale.demo import effect_on_heldout, split_pairs
from steerscale.engine.capture import tokenize
from steerscale.engine.runtime import intervene
from steerscale.measure.cost import neutral_prompts, steering_cost
from steerscale.measure.stats import bootstrap_ci
from steerscale.models.loading import load_model
from steerscale.steer.casal import bake_casal, fit_casal, merged
from steerscale.steer.extract import extract, pair_texts
from steerscale.steer.pairs import bundled_pairs, load_pairs

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def kl_from_base(lm, texts: list[str], run, batch_size: int = 8) -> dict:
    """Mean per-token KL(base || model) per text, as ``measure.cost.steering_cost`` computes it; ``run(batch)``
    returns the other model's logits (hooked, merged in memory or a reloaded checkpoint)."""
    device = next(lm.model.parameters()).device
    per_text = []
    for s in range(0, len(texts), batch_size):
        batch = tokenize(lm.tokenizer, texts[s : s + batch_size], device)
        base = lm.model(**batch.model_inputs(), use_cache=False).logits.float().log_softmax(-1)
        other = run(batch).float().log_softmax(-1).to(base.device)
        mask = batch.attention_mask.bool()
        valid = mask[:, :-1] & mask[:, 1:]
        kl = (base.exp() * (base - other)).sum(-1)[:, :-1]
        per_text += [float(kl[r][valid[r]].mean()) for r in range(kl.shape[0]) if valid[r].any()]
    return bootstrap_ci(per_text).to_dict()


def forward(model):
    return lambda batch: model(**batch.model_inputs(), use_cache=False).logits


def hooked(lm, ivs):
    def run(batch):
        with intervene(lm.layout, ivs):
            return lm.model(**batch.model_inputs(), use_cache=False).logits
    return run


def in_memory(lm, result):
    def run(batch):
        with merged(lm.model, result):
            return lm.model(**batch.model_inputs(), use_cache=False).logits
    return run


def margin_merged(lm, result, vector, held) -> dict:
    with merged(lm.model, result):
        return effect_on_heldout(lm, vector, 0, held)


def casal_row(name: str, result, effect: dict, kl: dict) -> dict:
    return {"row": name, "margin": effect["margin"], "prefer_formal": effect["prefer_formal"], "kl": kl,
            "train_seconds": round(result.seconds, 1), "flops": result.flops["total"],
            "params_trainable": result.params["trainable"], "params_merged": result.params["merged_matrix"],
            "rel_mse_steer": result.fit["steer"]["after"],
            "rel_mse_keep": result.fit["keep"]["after"] if result.fit["keep"] else None,
            "layer": result.layer, "rank": result.config.rank, "mode": result.mode}


def table(rows: list[dict]) -> str:
    head = ("| row | formality margin [95% CI] | prefers formal | KL on held-out neutral [95% CI] | train s | "
            "FLOPs | params trained / merged | rel. MSE steer / keep |")
    lines = [head, "|---|---|---:|---|---:|---:|---|---|"]
    for r in rows:
        m, k = r["margin"], r["kl"]
        casal = "train_seconds" in r
        lines.append(
            f"| {r['row']} | {m['mean']:+.3f} [{m['lo']:+.3f}, {m['hi']:+.3f}] | {r['prefer_formal']:.0%} | "
            f"{k['mean']:.4f} [{k['lo']:.4f}, {k['hi']:.4f}] | "
            + (f"{r['train_seconds']} | {r['flops']:.2e} | {r['params_trainable']:,} / {r['params_merged']:,} | "
               f"{r['rel_mse_steer']:.3f} / " + (f"{r['rel_mse_keep']:.4f}" if r["rel_mse_keep"] is not None else "-")
               + " |" if casal else "- | - | - | - |"))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ranks", default="4,16", help="extra ranks measured in memory (with keep texts); '' for none")
    ap.add_argument("--out", default=None, help="where to write the baked checkpoint (default: a temp dir)")
    args = ap.parse_args()
    torch.manual_seed(0)

    log(f"loading {args.model}")
    lm = load_model(args.model, device="cpu")
    train, held = split_pairs(load_pairs(bundled_pairs("formal_casual")), 12, 0)  # the demo's split
    vector = extract(lm, train, "caa", "auto", read="mean", seed=0, progress=False)  # the demo's vector
    ivs = vector.interventions(args.scale)
    log(f"vector at {[s.key() for s in vector.sites]}, scale {args.scale}")
    both = pair_texts(lm.tokenizer, train)
    texts = both.positive + both.negative
    neutral = neutral_prompts()
    keep, neutral_eval = neutral[0::2], neutral[1::2]

    rows = [{"row": "unsteered", **effect_on_heldout(lm, vector, 0, held),
             "kl": kl_from_base(lm, neutral_eval, forward(lm.model))}]
    hook_kl = kl_from_base(lm, neutral_eval, hooked(lm, ivs))
    check = steering_cost(lm.model, lm.tokenizer, lm.layout, ivs, texts=neutral_eval)["kl"]["mean"]
    assert abs(check - hook_kl["mean"]) < 1e-4 * (1 + check), (check, hook_kl)  # one KL computation
    rows.append({"row": f"hooked vector (scale {args.scale:g})", **effect_on_heldout(lm, vector, args.scale, held),
                 "kl": hook_kl})
    log("baseline rows done")

    log("CASAL rank 8 with keep texts")
    main_fit = fit_casal(lm, ivs, texts, keep, rank=8, steps=args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "casal_model"
        report = bake_casal(lm, main_fit, out, overwrite=True)
        baked = load_model(str(out), device="cpu")
        effect = effect_on_heldout(baked, vector, 0, held)
        kl = kl_from_base(lm, neutral_eval, forward(baked.model))
        mem = margin_merged(lm, main_fit, vector, held)
        assert abs(mem["margin"]["mean"] - effect["margin"]["mean"]) < 1e-3, (mem, effect)  # checkpoint == merged
        rows.append(casal_row("CASAL r=8 + keep (baked checkpoint)", main_fit, effect, kl))
        reload_diff = report["check"]["reload_max_abs_diff"]
        del baked
    log(f"baked and reloaded (max logit diff vs merged model {reload_diff:.2g})")

    extra = [(int(r), True) for r in args.ranks.split(",") if r.strip()] + [(8, False)]
    for rank, with_keep in extra:
        log(f"CASAL rank {rank} {'with' if with_keep else 'without'} keep texts")
        res = fit_casal(lm, ivs, texts, keep if with_keep else None, rank=rank, steps=args.steps)
        rows.append(casal_row(f"CASAL r={rank}{' + keep' if with_keep else ', no keep'} (in memory)", res,
                              margin_merged(lm, res, vector, held), kl_from_base(lm, neutral_eval, in_memory(lm, res))))

    print(table(rows))
    print(f"\nmodel {lm.name}; vector {vector.sites[0].key()} scale {args.scale:g}; CASAL trains block "
          f"{main_fit.layer}'s {main_fit.module} ({main_fit.mode} mode), {args.steps} Adam steps, lr "
          f"{main_fit.config.lr}; {main_fit.data['steer_texts']} steer texts, {len(keep)} keep texts, "
          f"{main_fit.data['tokens']} tokens; held-out: {len(held)} pairs, {len(neutral_eval)} neutral texts")
    print(json.dumps({"bench": "casal", "model": lm.name, "scale": args.scale, "steps": args.steps,
                      "site": vector.sites[0].key(), "reload_max_abs_diff": reload_diff, "rows": rows,
                      "seconds": round(time.time() - T0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
