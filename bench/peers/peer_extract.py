"""Extract steering vectors with the peer libraries and time it (runs in the peer venv).

    python bench/peers/peer_extract.py --model-dir DIR --pairs texts.jsonl --layers 0-29 --out-dir OUT \
        [--runs repeng:32,steering-vectors:1] [--reps 1]

``--runs``: comma-separated ``LIBRARY:BATCH`` (the defaults are each library's own default batch size: repeng 32
texts per forward, steering-vectors 1 pair, whose positive and negative texts run as separate forwards).

``--pairs``: JSONL of ``{"positive": TEXT, "negative": TEXT}`` full texts, already formatted by steerscale
(chat template applied), so every library reads exactly the same token sequences.

* repeng 0.4.0: ``ControlVector.train(model, tok, dataset, method="pca_diff", hidden_layers=layers,
  batch_size=B)``. Its key ``i`` reads ``output_hidden_states[i + 1]`` at the last non-padding token, i.e. the
  output of block ``i`` (steerscale's ``Site(i)`` resid_post) -- except for the last block, whose
  ``hidden_states`` entry has the final norm applied. Unit-norm direction, sign by pair agreement.
* steering-vectors 0.12: ``train_steering_vector(model, tok, pairs, layers=layers, batch_size=B)`` with the
  default mean aggregator and ``read_token_index=-1`` (last real token); layer ``i`` = output of
  ``model.layers[i]`` = block ``i``. ``batch_size`` counts pairs; positives and negatives run as separate forwards.

Writes ``OUT/<run>.safetensors`` (run = ``repeng_bs32``, ``steering_vectors_bs1``, ...; tensors ``layer.<i>``,
float32) from the last rep, and prints one JSON line: wall and CPU seconds per rep and run, medians, settings.
Model loading is not timed; a small warm-up extraction runs first.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import _peer_common as pc


def parse_layers(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    return sorted(set(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--layers", required=True, help="e.g. 0-29 or 3,10,15")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--runs", default="repeng:32,steering-vectors:1",
                    help="LIBRARY:BATCH,...; repeng's batch counts texts, steering-vectors' counts pairs")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    pc.set_threads(args.threads)

    from repeng import ControlVector, DatasetEntry
    from steering_vectors import train_steering_vector

    model, tok = pc.load_model(args.model_dir)
    pairs = pc.read_pairs(args.pairs)
    layers = parse_layers(args.layers)
    runs = []
    for item in args.runs.split(","):
        lib, _, bs = item.partition(":")
        if lib not in ("repeng", "steering-vectors"):
            raise SystemExit(f"unknown library {lib!r}")
        runs.append((f"{lib.replace('-', '_')}_bs{int(bs)}", lib, int(bs)))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def run_repeng(data, batch_size):
        cv = ControlVector.train(model, tok, [DatasetEntry(p, n) for p, n in data], method="pca_diff",
                                 hidden_layers=layers, batch_size=batch_size)
        return {i: torch.from_numpy(np.asarray(cv.directions[i], dtype=np.float32)) for i in layers}

    def run_sv(data, batch_size):
        sv = train_steering_vector(model, tok, list(data), layers=layers, batch_size=batch_size, show_progress=False)
        return {i: sv.layer_activations[i].float() for i in layers}

    runners = {"repeng": run_repeng, "steering-vectors": run_sv}
    if not args.no_warmup:
        for _, lib, bs in runs:
            runners[lib](pairs[:4], bs)
    wall = {name: [] for name, _, _ in runs}
    cpu = {name: [] for name, _, _ in runs}
    vectors = {}
    for rep in range(args.reps):
        for name, lib, bs in (runs if rep % 2 == 0 else runs[::-1]):
            c0 = time.process_time()
            with pc.Timer() as t:
                vectors[name] = runners[lib](pairs, bs)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(t.seconds)
            pc.log(f"[peer extract] {name}: {t.seconds:.2f} s wall, {cpu[name][-1]:.2f} s CPU "
                   f"({len(pairs)} pairs, {len(layers)} layers)")
    paths = {}
    for name, vecs in vectors.items():
        path = out_dir / f"{name}.safetensors"
        save_file({f"layer.{i}": v.contiguous() for i, v in vecs.items()}, str(path))
        paths[name] = str(path)
    import transformers

    pc.emit({"wall_seconds": wall, "cpu_seconds": cpu, "median_wall_seconds": {k: pc.median(v) for k, v in wall.items()},
             "median_cpu_seconds": {k: pc.median(v) for k, v in cpu.items()}, "vectors": paths, "n_pairs": len(pairs),
             "layers": layers, "runs": {name: {"library": lib, "batch_size": bs} for name, lib, bs in runs},
             "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__})


if __name__ == "__main__":
    main()
