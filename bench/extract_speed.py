"""Time to extract a steering vector from 256 contrastive pairs on SmolLM2, all 30 layers: ours vs the peers.

    python bench/extract_speed.py [--n-pairs 256] [--reps 2] [--threads 1]
        [--peer-runs repeng:32,steering-vectors:1,steering-vectors:16] [--methods caa,pca]

Data: the bundled formal/casual prompt pairs (40) recombined into ``--n-pairs`` distinct (prompt, formal,
casual) triples; the chat template is applied to the prompt. Every library reads the same full texts (we hand the
peers the exact strings our extraction formats) at the last token, at all 30 blocks' outputs.

* ours: ``steer.extract.extract(lm, pairs, method, layers=0..29)`` for ``caa`` and ``pca`` (pca_diff), default
  batch size (16 texts per forward); the time includes formatting, tokenizing, the forward passes and the fit.
* repeng 0.4.0: ``ControlVector.train(method="pca_diff")``, batch 32 texts (its default).
* steering-vectors 0.12: ``train_steering_vector`` with the mean aggregator; batch 1 pair (its default) and 16
  pairs (16 texts per forward, as ours).

Each repetition runs ours (both methods) in this process and then every peer configuration in one peer-venv
process (model loading untimed, warm-up first), so all are measured in the same run. Times are recorded as wall
seconds and as process CPU seconds; with one torch thread (the default here) CPU seconds measure the work done
and are robust to other jobs on a shared machine, so ratios use the median CPU seconds (wall ratios are given too).
A ratio is peer seconds / our seconds: > 1 means we are faster.

The last printed line is one JSON object with the times, the ratios, ``target_met`` (each of our methods at least as
fast as the fastest peer configuration) and, as a by-product, the parity cosines on these 256 pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import _common as c  # noqa: E402


def make_pairs(n: int):
    """``n`` distinct pairs: prompt of base pair ``k % m`` with the completions of base pair ``(k + k // m) % m``."""
    from steerscale.steer.pairs import ContrastPair, bundled_pairs, load_pairs

    base = load_pairs(bundled_pairs("formal_casual"))
    m = len(base)
    if n > m * m:
        raise SystemExit(f"at most {m * m} distinct pairs can be made from {m} base pairs")
    out = []
    for k in range(n):
        p, q = base[k % m], base[(k + k // m) % m]
        out.append(ContrastPair(q.positive, q.negative, p.prompt))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n-pairs", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--methods", default="caa,pca")
    ap.add_argument("--peer-runs", default="repeng:32,steering-vectors:1,steering-vectors:16",
                    help="LIBRARY:BATCH,... (repeng's batch counts texts, steering-vectors' counts pairs)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for ours and the peers (default 1: CPU time is then a clean measure of work)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--json-out", help="also write every measurement (per rep) to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import steerscale
    from steerscale import Site
    from steerscale.steer.extract import extract, pair_texts

    lm = steerscale.load_model(args.model)
    n_layers = lm.layout.n_layers
    layers = list(range(n_layers))
    pairs = make_pairs(args.n_pairs)
    methods = [m for m in args.methods.split(",") if m]
    info = c.machine_info()
    c.log(f"[setup] {args.n_pairs} pairs, {n_layers} layers, {args.reps} reps, threads {torch.get_num_threads()}, "
          f"load avg {info.get('loadavg_1m')}")
    for m in methods:  # warm-up
        extract(lm, pairs[:4], method=m, layers=layers, progress=False)

    peers_ok = not args.no_peers and c.peer_python() is not None
    if not peers_ok:
        c.log("[peers] skipped: " + ("--no-peers" if args.no_peers else
              f"peer venv not found at {c.peer_venv()} (build it with: bash scripts/make_peer_venv.sh)"))
    wall: dict[str, list[float]] = {f"ours_{m}": [] for m in methods}
    cpu: dict[str, list[float]] = {f"ours_{m}": [] for m in methods}
    ours_vectors, peer_vectors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = pair_texts(lm.tokenizer, pairs)
        pairs_path = c.write_pairs(tmp / "pairs.jsonl", zip(texts.positive, texts.negative))
        for rep in range(args.reps):
            for m in (methods if rep % 2 == 0 else methods[::-1]):
                c0 = time.process_time()
                with c.Timer() as t:
                    ours_vectors[m] = extract(lm, pairs, method=m, layers=layers, progress=False)
                cpu[f"ours_{m}"].append(time.process_time() - c0)
                wall[f"ours_{m}"].append(t.seconds)
                c.log(f"[ours] rep {rep + 1}/{args.reps} {m}: {t.seconds:.2f} s wall, {cpu[f'ours_{m}'][-1]:.2f} s CPU")
            if peers_ok:
                res = c.run_peer("peer_extract.py", [
                    "--model-dir", str(c.model_dir(args.model)), "--pairs", str(pairs_path),
                    "--layers", f"0-{n_layers - 1}", "--out-dir", str(tmp / "peer"), "--runs", args.peer_runs,
                    "--reps", "1", "--threads", str(args.threads or 0),
                ], threads=args.threads)
                for name in res["runs"]:
                    wall.setdefault(name, []).extend(res["wall_seconds"][name])
                    cpu.setdefault(name, []).extend(res["cpu_seconds"][name])
                    c.log(f"[peer] rep {rep + 1}/{args.reps} {name}: {res['wall_seconds'][name][-1]:.2f} s wall, "
                          f"{res['cpu_seconds'][name][-1]:.2f} s CPU")
                peer_vectors = {name: c.load_layer_vectors(Path(p)) for name, p in res["vectors"].items()}

    med_cpu = {k: c.median(v) for k, v in cpu.items()}
    med_wall = {k: c.median(v) for k, v in wall.items()}
    peers = [k for k in med_cpu if not k.startswith("ours_")]
    ratios, wall_ratios = {}, {}
    for m in methods:
        for p in peers:
            ratios[f"{m}_vs_{p}"] = med_cpu[p] / med_cpu[f"ours_{m}"]
            wall_ratios[f"{m}_vs_{p}"] = med_wall[p] / med_wall[f"ours_{m}"]

    # parity on these pairs, as a by-product (repeng's last layer is post-final-norm: excluded)
    parity = {}
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))  # noqa: E731
    for name, vecs in peer_vectors.items():
        if name.startswith("steering_vectors") and "caa" in ours_vectors:
            parity[f"caa_vs_{name}_min_cos"] = min(cos(ours_vectors["caa"].directions[Site(i)], vecs[i]) for i in layers)
        if name.startswith("repeng") and "pca" in ours_vectors:
            parity[f"pca_vs_{name}_min_abs_cos"] = min(abs(cos(ours_vectors["pca"].directions[Site(i)], vecs[i]))
                                                       for i in layers[:-1])

    rows = [[k, len(v), med_wall[k], med_cpu[k]] for k, v in cpu.items()]
    print()
    print(f"Extraction from {args.n_pairs} pairs, all {n_layers} layers, {args.model}, median of {args.reps} reps, "
          f"{args.threads or 'default'} torch thread(s); load avg at start {info.get('loadavg_1m')}")
    print(c.fmt_table(["run", "reps", "wall s", "CPU s"], rows))
    if ratios:
        print(c.fmt_table(["ours vs peer", "speed ratio (CPU)", "speed ratio (wall)"],
                          [[k, v, wall_ratios[k]] for k, v in ratios.items()]))
    summary = {"seconds_cpu": {k: round(v, 3) for k, v in med_cpu.items()},
               "seconds_wall": {k: round(v, 3) for k, v in med_wall.items()},
               **{k: round(v, 4) for k, v in ratios.items()},
               "wall_ratios": {k: round(v, 4) for k, v in wall_ratios.items()}}
    if peers:
        fastest = min(med_cpu[p] for p in peers)
        summary["target_met"] = all(med_cpu[f"ours_{m}"] <= fastest for m in methods)
        summary["fastest_peer"] = min(peers, key=lambda p: med_cpu[p])
    summary.update({k: round(v, 6) for k, v in parity.items()})
    summary.update(n_pairs=args.n_pairs, reps=args.reps, threads=args.threads, loadavg_1m_at_start=info.get("loadavg_1m"))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"summary": summary, "wall_seconds": wall, "cpu_seconds": cpu,
                                                   "machine": info, "args": vars(args)}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
