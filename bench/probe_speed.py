"""Probe sweeps: steerscale's batched Newton solver vs one scikit-learn ``LogisticRegression`` per site.

A layer or ITI head sweep fits one held-out logistic probe per site (270 heads on SmolLM2-135M). Both sides fit
the same objective on the same standardised features and the same split, in the same process; the script checks
that the held-out accuracies agree and reports the time (process CPU) ratio. ``--source truthfulqa`` (default
when ``../shared/data/truthfulqa`` is found) probes real SmolLM2 activations of TruthfulQA answer pairs, as the
TruthfulQA bench does (the last answer token at every head and residual layer); ``--source synthetic`` uses
Gaussian classes of the same shapes. Real activations are where per-site solvers struggle: badly scaled
features make L-BFGS run to its iteration cap. Last line: one JSON object.

    python bench/probe_speed.py [--source truthfulqa|synthetic] [--pairs 400] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def truthfulqa_activations(args) -> dict:
    """{"heads": (pos, neg), "layers": (pos, neg)}: lists of (pairs, dim) activations, one per site."""
    import random

    import steerscale
    from steerscale.measure.tasks.truthfulqa import load_mc_rows
    from steerscale.models.sites import Site, SiteKind
    from steerscale.steer.extract import collect, pair_texts
    from steerscale.steer.pairs import ContrastPair

    rows = load_mc_rows()
    rng = random.Random(0)
    pairs = []
    for r in rng.sample(rows, len(rows)):
        true = [a for a, y in r["mc2_targets"].items() if int(y) == 1]
        false = [a for a, y in r["mc2_targets"].items() if int(y) == 0]
        if true and false:
            pairs.append(ContrastPair(positive=rng.choice(true), negative=rng.choice(false), prompt=r["question"]))
        if len(pairs) == args.pairs:
            break
    lm = steerscale.load_model("smollm2-135m-instruct")
    lay = lm.layout
    heads = [Site(l, SiteKind.HEAD_OUT, h) for l in range(lay.n_layers) for h in range(lay.n_heads)][: args.heads]
    layers = [Site(l) for l in range(lay.n_layers)][: args.layers]
    pos, neg = collect(lm, pair_texts(lm.tokenizer, pairs), heads + layers, "last")
    return {"heads": ([pos[s] for s in heads], [neg[s] for s in heads]),
            "layers": ([pos[s] for s in layers], [neg[s] for s in layers])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=270, help="head probes (64-dim)")
    ap.add_argument("--layers", type=int, default=30, help="residual-layer probes (576-dim)")
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--source", default="truthfulqa", choices=["truthfulqa", "synthetic"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from steerscale.steer.methods.probe import probe_accuracies, split_pairs

    torch.set_num_threads(args.threads)
    data = truthfulqa_activations(args) if args.source == "truthfulqa" else None
    g = torch.Generator().manual_seed(0)
    result = {"bench": "probe_speed", "source": args.source, "pairs": args.pairs, "threads": args.threads}
    for name, sites, dim in (("heads", args.heads, 64), ("layers", args.layers, 576)):
        if not sites:
            continue
        if data is not None:
            pos, neg = data[name]
            sites, dim = len(pos), pos[0].shape[1]
        else:  # weakly separable classes, like truthful/untruthful activations (probe accuracies 0.5-0.75)
            pos = [torch.randn(args.pairs, dim, generator=g) + 0.08 * torch.randn(dim, generator=g) for _ in range(sites)]
            neg = [torch.randn(args.pairs, dim, generator=g) for _ in range(sites)]
        t0 = time.process_time()
        ours = [a[0] for a in probe_accuracies(pos, neg)]
        t_ours = time.process_time() - t0
        tr, te = split_pairs(args.pairs, 0.3, 0)
        y_tr, y_te = np.r_[np.ones(len(tr)), np.zeros(len(tr))], np.r_[np.ones(len(te)), np.zeros(len(te))]
        t0 = time.process_time()
        theirs = []
        for p, q in zip(pos, neg):
            x = torch.cat([p[tr], q[tr]]).double().numpy()
            mu, sd = x.mean(0), x.std(0) + 1e-6
            clf = LogisticRegression(C=1.0, max_iter=2000).fit((x - mu) / sd, y_tr)
            theirs.append(clf.score((torch.cat([p[te], q[te]]).double().numpy() - mu) / sd, y_te))
        t_sk = time.process_time() - t0
        result[name] = {"sites": sites, "dim": dim, "ours_cpu_s": round(t_ours, 2), "sklearn_cpu_s": round(t_sk, 2),
                        "speedup": round(t_sk / t_ours, 2),
                        "max_acc_diff": float(max(abs(a - b) for a, b in zip(ours, theirs)))}
        print(f"{name}: {sites} probes of {dim} dims: ours {t_ours:.2f}s CPU, scikit-learn {t_sk:.2f}s CPU, "
              f"x{t_sk / t_ours:.1f}; max accuracy difference {result[name]['max_acc_diff']:.4f}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
