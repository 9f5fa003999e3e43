"""Decode throughput with a steering vector added at every layer, relative to no intervention.

    python bench/steer_overhead.py [--reps 5] [--new-tokens 128] [--batch-sizes 1,8] [--threads 1]

Model: SmolLM2-135M-Instruct (bundled). Ours: ``intervene(layout, [Intervention(Site(l), Add(v_l, scale))])``
for all 30 layers (resid_post, every token) around ``model.generate``; the hooks are attached inside the timed
region. Baseline: the same ``model.generate`` with nothing attached. Greedy, KV cache, and
``min_new_tokens = max_new_tokens`` so every run makes exactly ``--new-tokens`` tokens. The two conditions are
interleaved within each repetition (order alternating); the reported ratio is the median over repetitions of
(steered tokens/s) / (unsteered tokens/s) of the same repetition, so slow drifts of a shared machine cancel.

Peers: the same prompts, vector, scale, batch sizes and settings are run in the peer venv
(``bench/peers/peer_decode.py``: repeng ``ControlModel``, steering-vectors ``SteeringVector.apply``) against
the plain model, each in its own process. Skipped with a message when the peer venv is absent
(``bash scripts/make_peer_venv.sh``).

Each generate call is timed by wall clock and by this process's CPU time. With one torch thread (the default
here), CPU time is the work done and is robust to other jobs on a shared machine, so the headline ratios use it;
wall-clock ratios are printed and reported too. ``--step-pairs N`` adds a third, finer estimate: N alternating
single decode steps (fixed cache length) without and with the steering attached.

The last printed line is one JSON object: ``ours_b1``, ``ours_b8``, ``repeng_b1``, ``repeng_b8``,
``steering_vectors_b1``, ``steering_vectors_b8`` (CPU-time ratios; >= 0.95 means steering costs under 5%), the
same under ``wall`` and ``per_step``, and the settings.
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


def random_vectors(n_layers: int, dim: int, norm: float, seed: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n_layers):
        v = torch.randn(dim, generator=g)
        out[i] = v * (norm / v.norm())
    return out


def decode_step_pairs(model, batch, attach, detach, n_pairs: int) -> dict:
    """The peers' per-step procedure (``bench/peers/_peer_common.decode_step_pairs``), run on our side, so both
    sides are timed by the same code."""
    import transformers

    from peers._peer_common import decode_step_pairs as shared

    cache_kw = "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    return shared(model, inputs, attach, detach, n_pairs, cache_kw)


def measure_ours(lm, prompts: list[str], vectors: dict[int, torch.Tensor], batch_sizes: list[int], new_tokens: int,
                 reps: int, scale: float, step_pairs: int = 0) -> dict:
    from steerscale import Add, Intervention, Site, intervene
    from steerscale.engine.capture import tokenize

    model, tok, layout = lm
    ivs = [Intervention(Site(i), Add(v, scale)) for i, v in sorted(vectors.items())]
    device = next(model.parameters()).device
    kwargs = dict(do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)

    def gen(batch, n):
        out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=n,
                             min_new_tokens=n, **kwargs)
        return out.shape[1] - batch.input_ids.shape[1]

    def run(cond, batch, n):
        if cond == "plain":
            return gen(batch, n)
        with intervene(layout, ivs):
            return gen(batch, n)

    results = {}
    conds = ["plain", "ours"]
    with torch.no_grad():
        for bs in batch_sizes:
            texts = (prompts * ((bs + len(prompts) - 1) // len(prompts)))[:bs]
            batch = tokenize(tok, texts, device, add_special_tokens=False)  # chat template already has its specials
            for cond in conds:
                run(cond, batch, 8)  # warm-up
            tps = {cond: [] for cond in conds}  # tokens per wall second
            cps = {cond: [] for cond in conds}  # tokens per CPU second of this process
            for rep in range(reps):
                for cond in (conds if rep % 2 == 0 else conds[::-1]):
                    c0 = time.process_time()
                    with c.Timer() as t:
                        n = run(cond, batch, new_tokens)
                    cpu = time.process_time() - c0
                    assert n == new_tokens, (cond, n)
                    tps[cond].append(bs * n / t.seconds)
                    cps[cond].append(bs * n / cpu)
                c.log(f"[ours] b{bs} rep {rep + 1}/{reps}: plain {tps['plain'][-1]:.1f} tok/s ({cps['plain'][-1]:.1f} per CPU s), "
                      f"steered {tps['ours'][-1]:.1f} tok/s ({cps['ours'][-1]:.1f} per CPU s)")
            paired = [s / p for s, p in zip(tps["ours"], tps["plain"])]
            paired_cpu = [s / p for s, p in zip(cps["ours"], cps["plain"])]
            results[f"b{bs}"] = {
                "plain": {"tokens_per_s": tps["plain"], "median_tokens_per_s": c.median(tps["plain"]),
                          "tokens_per_cpu_s": cps["plain"]},
                "ours": {"tokens_per_s": tps["ours"], "median_tokens_per_s": c.median(tps["ours"]),
                         "tokens_per_cpu_s": cps["ours"], "paired_ratios": paired, "paired_cpu_ratios": paired_cpu},
                "ratio": c.median(paired),
                "ratio_cpu": c.median(paired_cpu),
            }
            if step_pairs:
                state = {}

                def attach():
                    state["cm"] = intervene(layout, ivs)
                    state["cm"].__enter__()

                def detach():
                    state.pop("cm").__exit__(None, None, None)

                step = decode_step_pairs(model, batch, attach, detach, step_pairs)
                results[f"b{bs}"]["step"] = step
                c.log(f"[ours] b{bs}: per-step CPU {step['plain_ms']:.2f} -> {step['steered_ms']:.2f} ms, ratio {step['ratio']:.4f}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--vector-norm", type=float, default=2.0, help="norm of the random per-layer vector")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for ours and the peers (default 1: robust on a shared 2-core machine)")
    ap.add_argument("--step-pairs", type=int, default=60,
                    help="also time N alternating single decode steps by CPU time (noise-robust cross-check; 0: off)")
    ap.add_argument("--no-peers", action="store_true", help="measure steerscale only")
    ap.add_argument("--json-out", help="also write every measurement (per rep, per condition) to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    import steerscale

    lm = steerscale.load_model(args.model)
    model, tok, layout = lm
    prompts = [steerscale.format_prompt(tok, p) for p in c.PROMPTS]
    vectors = random_vectors(layout.n_layers, layout.hidden_size, args.vector_norm, args.seed)
    info = c.machine_info()
    c.log(f"[setup] {args.model}: {layout.n_layers} layers, hidden {layout.hidden_size}; "
          f"{args.new_tokens} new tokens, {args.reps} reps, threads {torch.get_num_threads()}, load avg {info.get('loadavg_1m')}")

    ours = measure_ours(lm, prompts, vectors, batch_sizes, args.new_tokens, args.reps, args.scale,
                        args.step_pairs)
    wall = {f"ours_b{bs}": ours[f"b{bs}"]["ratio"] for bs in batch_sizes}
    cpu = {f"ours_b{bs}": ours[f"b{bs}"]["ratio_cpu"] for bs in batch_sizes}
    step = {f"ours_b{bs}": ours[f"b{bs}"]["step"]["ratio"] for bs in batch_sizes if "step" in ours[f"b{bs}"]}
    tput = {f"ours_b{bs}": (ours[f"b{bs}"]["plain"]["median_tokens_per_s"], ours[f"b{bs}"]["ours"]["median_tokens_per_s"])
            for bs in batch_sizes}

    peers = None
    if args.no_peers:
        c.log("[peers] skipped (--no-peers)")
    elif c.peer_python() is None:
        c.log(f"[peers] skipped: peer venv not found at {c.peer_venv()} (build it with: bash scripts/make_peer_venv.sh)")
    else:
        del lm, model  # free memory before the peer process loads its copy
        with tempfile.TemporaryDirectory() as tmp:
            prompts_path = Path(tmp) / "prompts.json"
            prompts_path.write_text(json.dumps(prompts))
            vec_path = c.save_layer_vectors(Path(tmp) / "vectors.safetensors", vectors)
            c.log("[peers] running bench/peers/peer_decode.py in the peer venv ...")
            peers = c.run_peer("peer_decode.py", [
                "--model-dir", str(c.model_dir(args.model)), "--prompts", str(prompts_path), "--vectors", str(vec_path),
                "--batch-sizes", args.batch_sizes, "--new-tokens", str(args.new_tokens), "--reps", str(args.reps),
                "--scale", str(args.scale), "--threads", str(args.threads or 0), "--step-pairs", str(args.step_pairs),
            ], threads=args.threads)
        for lib in ("repeng", "steering-vectors"):
            key = lib.replace("-", "_")
            for bs in batch_sizes:
                r = peers["results"][f"b{bs}"]
                wall[f"{key}_b{bs}"] = peers["ratios"][f"{key}_b{bs}"]
                cpu[f"{key}_b{bs}"] = peers["ratios"][f"{key}_cpu_b{bs}"]
                if f"{key}_step_b{bs}" in peers["ratios"]:
                    step[f"{key}_b{bs}"] = peers["ratios"][f"{key}_step_b{bs}"]
                tput[f"{key}_b{bs}"] = (r["plain"]["median_tokens_per_s"], r[lib]["median_tokens_per_s"])

    rows = [[k.rsplit("_b", 1)[0], "b" + k.rsplit("_b", 1)[1], tput[k][0], tput[k][1], wall[k], cpu[k], step.get(k)]
            for k in wall]
    print()
    print(f"Decode throughput, {args.model}, {args.new_tokens} new tokens greedy, steering at all {layout.n_layers} "
          f"layers, median of {args.reps} interleaved reps, {args.threads or 'default'} torch thread(s), "
          f"load avg at start {info.get('loadavg_1m')}")
    print(c.fmt_table(["library", "batch", "plain tok/s", "steered tok/s", "ratio wall", "ratio CPU",
                       "ratio per step (CPU)"], rows))
    print("ratio = steered / unsteered throughput of the same rep (median over reps); each library against its own "
          "plain baseline (ours on transformers 5, peers on 4.57). 'CPU' uses process CPU time (1 thread: robust "
          "on a shared machine); 'per step' alternates single decode steps.")
    summary = {k: round(v, 4) for k, v in cpu.items()}
    summary["wall"] = {k: round(v, 4) for k, v in wall.items()}
    if step:
        summary["per_step"] = {k: round(v, 4) for k, v in step.items()}
    summary["target_ours_ge_0_95"] = all(cpu[f"ours_b{bs}"] >= 0.95 for bs in batch_sizes)
    summary.update(basis="median paired ratio of tokens per CPU second (1 torch thread); 'wall' for wall clock",
                   new_tokens=args.new_tokens, reps=args.reps, threads=args.threads,
                   loadavg_1m_at_start=info.get("loadavg_1m"))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"summary": summary, "ours": ours, "peers": peers, "machine": info,
                                                   "args": vars(args)}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
