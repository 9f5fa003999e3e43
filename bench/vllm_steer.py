"""steerscale's per-request steering inside vLLM at vLLM's own speed: steered requests in vLLM's compiled mode
against plain vLLM (no plugin) in the same run, compiled against eager, in bf16 and float32; the same greedy tokens
as steerscale's local engine; tenant safety over HTTP; tensor parallel 2. One run.

    .venv-vllm/bin/python bench/vllm_steer.py [--model smollm2-135m-instruct] [--tokens 32] [--repeats 3]
                                              [--dtypes bfloat16,float32] [--skip-http] [--skip-tp] [--quick]

Run it with the vLLM venv's python (``scripts/make_vllm_venv.sh``). Measured on CPU only (vLLM's CPU build, 2 cores,
no GPU here, compiled mode = vLLM's CPU default: dynamo traced once, inductor). ``--gpu`` is the GPU variant,
written but not run (no vLLM travels to the lent GPU machine): plain vLLM and the static-plan engine keep vLLM's
CUDA graphs (the fixed-buffer plan is what a graph replays), the dynamic-plan engines run torch.compile with
``cudagraph_mode=NONE``, so ``static_vs_plain_compiled_*`` says what steering costs against vLLM's fastest plain
setting there.

Setup: SmolLM2-135M-Instruct, prefix caching off (repeats of the same prompts would otherwise skip their prefill),
``max_num_seqs=32``, ``max_num_batched_tokens=2048``. The steering vector ``layers``: at ``resid_post`` of every one
of the 30 blocks, a random unit direction (one per block, seeded) scaled to norm 8. The 32 requests: 8 chat prompts
four times, steered with ``layers`` at scale 1, -1, 0.5, -0.5 (one scale per round of 8); greedy, ``ignore_eos``,
exactly ``--tokens`` new tokens. Batch B = the first B requests in one ``generate``.

Engines live side by side in this process: per dtype, plain vLLM compiled (started without steerscale's plugin),
``SteeredLLM`` compiled, and ``SteeredLLM`` eager; while one is timed the others' processes are paused (SIGSTOP), as
idle vLLM engines poll their queues. Each timing: a warm-up of the same batch, then ``--repeats`` repetitions with
the two conditions interleaved (order alternating); a ratio is the median over repetitions of that repetition's
throughput ratio, so slow drifts of a shared machine cancel. The 1-minute load average is reported.

JSON keys: ``steered_vs_plain_compiled_b1`` / ``_b16`` per dtype (steered requests through the plugin in compiled
mode vs the same requests unsteered through plain vLLM compiled; target >= 0.9), ``static_vs_dynamic_b1`` / ``_b16``
and ``static_vs_plain_compiled_b1`` / ``_b16`` (the fixed-buffer plan, ``STEERSCALE_VLLM_PLAN=static``, against the
per-batch plan and against plain vLLM), ``static_equivalence_mismatches`` (its tokens against the local engine),
``unsteered_plugin_vs_plain_b16``
(what the plugin costs requests that do not steer), ``compiled_vs_eager_b1`` / ``_b16`` (both steered),
``equivalence_mismatches`` (float32, the 32 requests and the projection/norm-preserving grammar against the local
engine; the margin rule: a difference counts where the local top-2 margin is >= 1e-4), ``bf16_mismatches_beyond_margin``
(bf16 vLLM against the local engine in bf16; a difference counts where the local bf16 top-2 margin >= 0.5 logits),
``isolation_mismatches`` (a batch of 16, every other request steered, vs each alone), ``salt_leaks`` and
``bad_spec_non_400`` (``vllm serve`` with the plugin, the official client; ``tests/vllm_serve_checks.py``),
``tp2_equivalence_mismatches`` (tensor parallel 2 on a tiny qwen2 checkpoint with 4 heads, head vectors on both
ranks; ``tests/vllm_checks.py --family qwen2 --tp 2``).

``--quick`` is a smoke check: 8 new tokens, 1 repetition, float32 only, no HTTP or TP parts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PROMPTS, ROOT, fmt_table, log, machine_info

VECTOR_NORM = 8.0
SCALES = (1.0, -1.0, 0.5, -0.5)  # one per round of the 8 prompts: 32 requests
N_REQUESTS = 32
BF16_MARGIN = 0.5  # logits: where bf16's rounding can flip the greedy token
FP32_MARGIN = 1e-4


COMPARISONS = ("steered_vs_plain_compiled_b1", "steered_vs_plain_compiled_b16", "unsteered_plugin_vs_plain_b16",
               "compiled_vs_eager_b1", "compiled_vs_eager_b16", "static_vs_dynamic_b1", "static_vs_dynamic_b16",
               "static_vs_plain_compiled_b1", "static_vs_plain_compiled_b16")


def r3(x):
    return None if x is None else round(x, 3)


@contextlib.contextmanager
def plan_mode(mode: str):
    """Start an engine whose workers use steering plan ``mode`` (``STEERSCALE_VLLM_PLAN``; its processes read it)."""
    saved = os.environ.get("STEERSCALE_VLLM_PLAN")
    os.environ["STEERSCALE_VLLM_PLAN"] = mode
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("STEERSCALE_VLLM_PLAN", None)
        else:
            os.environ["STEERSCALE_VLLM_PLAN"] = saved


@contextlib.contextmanager
def without_plugin():
    """Start an engine whose processes do not load steerscale's plugin (plain vLLM)."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("STEERSCALE_VLLM")}
    try:
        yield
    finally:
        os.environ.update(saved)


class Engine:
    """One vLLM engine of this process and its child processes (paused while another engine is timed)."""

    def __init__(self, label: str, make, others: tuple = ()):
        import psutil

        for other in others:  # idle engines poll their queues: paused while this one starts and compiles
            other.pause()
        self.label = label
        me = psutil.Process()
        before = {p.pid for p in me.children(recursive=True)}
        t = time.perf_counter()
        self.handle = make()
        self.start_s = time.perf_counter() - t
        self.procs = [p for p in me.children(recursive=True) if p.pid not in before]
        self.llm = getattr(self.handle, "llm", self.handle)  # SteeredLLM wraps vllm.LLM
        for other in others:
            other.resume()
        log(f"{label}: up in {self.start_s:.1f} s ({len(self.procs)} processes)")

    def pause(self):
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.suspend()

    def resume(self):
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.resume()

    def generate(self, reqs, params, steer=None):
        if steer is not None and any(steer):
            outs = self.handle.generate(reqs, params, steer=steer)
        else:
            outs = self.llm.generate(reqs, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def shutdown(self):
        self.resume()
        with contextlib.suppress(Exception):
            self.llm.llm_engine.engine_core.shutdown()


def timed_ratio(a: Engine, b: Engine, run_a, run_b, repeats: int, engines: list[Engine]) -> dict:
    """Throughput of ``run_a`` on ``a`` over ``run_b`` on ``b`` (each returns (tokens, outputs)), interleaved."""
    def one(engine, run):
        for e in engines:
            (e.resume if e is engine else e.pause)()
        t = time.perf_counter()
        n, outs = run()
        return n / (time.perf_counter() - t), outs

    one(a, run_a), one(b, run_b)  # warm-up: the same batch shapes
    ra, rb = [], []
    for rep in range(repeats):
        for which in ((0, 1) if rep % 2 == 0 else (1, 0)):
            tps, _ = one(a, run_a) if which == 0 else one(b, run_b)
            (ra if which == 0 else rb).append(tps)
    for e in engines:
        e.resume()
    ratios = [x / y for x, y in zip(ra, rb)]
    return {"a_tok_s": [round(x, 2) for x in ra], "b_tok_s": [round(x, 2) for x in rb],
            "ratios": [round(x, 3) for x in ratios], "ratio": statistics.median(ratios)}


def local_tokens(lm, vector, prompt_ids, scales, tokens: int) -> list[list[int]]:
    """The local engine's greedy tokens for every request (its batching scheduler, all submitted together)."""
    from steerscale.scale import SamplingParams as LocalParams
    from steerscale.serve.scheduler import Job, Scheduler

    sched = Scheduler(lm.model, lm.tokenizer, lm.layout, max_batch=N_REQUESTS)
    params = LocalParams(max_tokens=tokens, temperature=0.0, step=None, ignore_eos=True)
    futures = [sched.submit(Job(list(ids), params, steer=[(vector, s)] if s else [])) for ids, s in
               zip(prompt_ids, scales)]
    while not all(f.done() for f in futures):
        sched.step()
    return [list(f.result()[0].token_ids) for f in futures]


def differences(lm, vector, prompt_ids, scales, got, want, threshold: float) -> list[dict]:
    """Requests whose tokens differ, with the local top-2 margin at the first difference; ``beyond`` where the
    margin is at least ``threshold`` (a real difference, not a near tie)."""
    import torch

    from steerscale.engine.runtime import intervene

    out = []
    for i, (g, w) in enumerate(zip(got, want)):
        if g == w:
            continue
        k = next((j for j, (x, y) in enumerate(zip(g, w)) if x != y), min(len(g), len(w)))
        ids = list(prompt_ids[i]) + w[:k]
        edits = vector.interventions(scales[i]) if scales[i] else []
        with torch.no_grad(), intervene(lm.layout, edits, prompt_width=len(prompt_ids[i])):
            top = lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float().topk(2).values
        margin = float(top[0] - top[1])
        out.append({"request": i, "first_difference": k, "local_margin": margin, "beyond": margin >= threshold})
    return out


def run_json(cmd: list[str], env: dict | None = None, timeout: float = 1800) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"error": proc.stderr[-2000:]}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per request (default 32; --quick: 8)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 3; --quick: 1)")
    ap.add_argument("--dtypes", default=None, help="comma-separated (default bfloat16,float32; --quick: float32)")
    ap.add_argument("--skip-http", action="store_true", help="skip the vllm serve part (salt leaks, bad specs)")
    ap.add_argument("--skip-tp", action="store_true", help="skip the tensor-parallel-2 part")
    ap.add_argument("--quick", action="store_true", help="smoke check: fewer tokens and repetitions")
    ap.add_argument("--gpu", action="store_true", help="on a CUDA machine (untested here, see the docstring)")
    args = ap.parse_args()
    tokens = args.tokens or (8 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)
    dtypes = (args.dtypes or ("float32" if args.quick else "bfloat16,float32")).split(",")
    wall0 = time.perf_counter()
    load_at_start = round(os.getloadavg()[0], 2)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from vllm import LLM, SamplingParams

    from steerscale import Site, SiteKind, load_model
    from steerscale.models.loading import checkpoint_dir
    from steerscale.steer.vector import SteeringVector
    from steerscale.vllm import SteeredLLM

    machine = machine_info()
    torch.set_num_threads(1)  # the local engine (reference tokens only, untimed)
    lm32 = load_model(args.model, dtype="float32")
    g = torch.Generator().manual_seed(0)
    directions = {}
    for layer in range(lm32.layout.n_layers):
        site = Site(layer, SiteKind.RESID_POST)
        d = torch.randn(lm32.layout.site_dim(site), generator=g)
        directions[site] = VECTOR_NORM * d / d.norm()
    vector = SteeringVector(directions, model_name=args.model)

    def chat_ids(text: str) -> list[int]:
        s = lm32.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=False)
        return list(lm32.tokenizer(s, add_special_tokens=False)["input_ids"])

    prompt_ids = [chat_ids(PROMPTS[i % len(PROMPTS)]) for i in range(N_REQUESTS)]
    scales = [SCALES[i // len(PROMPTS)] for i in range(N_REQUESTS)]
    specs = [[f"layers:{s}"] for s in scales]
    reqs = [{"prompt_token_ids": ids} for ids in prompt_ids]
    greedy = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    common = dict(max_model_len=512, max_num_seqs=32, max_num_batched_tokens=2048, enable_prefix_caching=False,
                  seed=0)
    model_dir = checkpoint_dir(args.model)
    out: dict = {"bench": "vllm_steer", "model": args.model, "device": "cuda" if args.gpu else "cpu"}
    per_dtype: dict = {}
    for dtype in dtypes:
        tag = {"bfloat16": "bf16", "float32": "fp32"}[dtype]
        log(f"== {dtype}: starting plain vLLM (compiled), SteeredLLM compiled and eager ...")
        with without_plugin():
            plain = Engine(f"plain compiled {tag}", lambda: LLM(model=model_dir, dtype=dtype, **common))
        with plan_mode("dynamic"):  # on a GPU: without CUDA graphs, the per-batch plan
            graphs = {"compilation_config": {"cudagraph_mode": "NONE"}} if args.gpu else {}
            steered = Engine(f"steered compiled {tag}", lambda: SteeredLLM(
                args.model, vectors={"layers": vector}, dtype=dtype, **graphs, **common), (plain,))
            eager = Engine(f"steered eager {tag}", lambda: SteeredLLM(
                args.model, vectors={"layers": vector}, dtype=dtype, enforce_eager=True, **common), (plain, steered))
        with plan_mode("static"):  # the fixed-buffer plan (on a GPU: with vLLM's CUDA graphs)
            static = Engine(f"steered static {tag}", lambda: SteeredLLM(
                args.model, vectors={"layers": vector}, dtype=dtype, **common), (plain, steered, eager))
        engines = [plain, steered, eager, static]
        row: dict = {"startup_s": {e.label: round(e.start_s, 1) for e in engines}}

        def run(engine, idx, steer=True):
            outs = engine.generate([reqs[i] for i in idx], greedy, [specs[i] for i in idx] if steer else None)
            return sum(len(o) for o in outs), outs

        for b in (1, 16):
            idx = list(range(b))
            log(f"{tag} batch {b}: steered compiled vs plain compiled ...")
            row[f"steered_vs_plain_compiled_b{b}"] = timed_ratio(
                steered, plain, lambda: run(steered, idx), lambda: run(plain, idx, False), repeats, engines)
            log(f"{tag} batch {b}: compiled vs eager (both steered) ...")
            row[f"compiled_vs_eager_b{b}"] = timed_ratio(
                steered, eager, lambda: run(steered, idx), lambda: run(eager, idx), repeats, engines)
        for b in (1, 16):
            idx = list(range(b))
            log(f"{tag} batch {b}: static plan vs dynamic plan (both steered, compiled) ...")
            row[f"static_vs_dynamic_b{b}"] = timed_ratio(
                static, steered, lambda: run(static, idx), lambda: run(steered, idx), repeats, engines)
            log(f"{tag} batch {b}: static plan vs plain compiled ...")
            row[f"static_vs_plain_compiled_b{b}"] = timed_ratio(
                static, plain, lambda: run(static, idx), lambda: run(plain, idx, False), repeats, engines)
        log(f"{tag} batch 16: unsteered requests, plugin vs plain ...")
        row["unsteered_plugin_vs_plain_b16"] = timed_ratio(
            steered, plain, lambda: run(steered, list(range(16)), False), lambda: run(plain, list(range(16)), False),
            repeats, engines)
        for e in (plain, eager):
            e.pause()
        got = steered.generate(reqs, greedy, specs)
        got_static = static.generate(reqs, greedy, specs)
        if dtype == "float32":
            want = local_tokens(lm32, vector, prompt_ids, scales, tokens)
            row["differences"] = differences(lm32, vector, prompt_ids, scales, got, want, FP32_MARGIN)
            out["equivalence_mismatches"] = sum(d["beyond"] for d in row["differences"])
            row["static_differences"] = differences(lm32, vector, prompt_ids, scales, got_static, want, FP32_MARGIN)
            out["static_equivalence_mismatches"] = sum(d["beyond"] for d in row["static_differences"])
            half = [k % 2 == 1 for k in range(16)]
            mixed = steered.generate(reqs[:16], greedy, [specs[k] if half[k] else None for k in range(16)])
            alone = [steered.generate([reqs[k]], greedy, [specs[k] if half[k] else None])[0] for k in range(16)]
            out["isolation_mismatches"] = sum(a != m for a, m in zip(alone, mixed))
            plain.resume()
            plain_tokens = plain.generate(reqs[:16], greedy)
            out["isolation_steering_acted"] = sum(mixed[k] != plain_tokens[k] for k in range(16) if half[k])
        else:
            lm16 = load_model(args.model, dtype=dtype)
            want = local_tokens(lm16, vector, prompt_ids, scales, tokens)
            row["differences"] = differences(lm16, vector, prompt_ids, scales, got, want, BF16_MARGIN)
            out["bf16_mismatches_beyond_margin"] = sum(d["beyond"] for d in row["differences"])
            row["static_differences"] = differences(lm16, vector, prompt_ids, scales, got_static, want, BF16_MARGIN)
            out["static_bf16_mismatches_beyond_margin"] = sum(d["beyond"] for d in row["static_differences"])
            del lm16
        row["info"] = steered.handle.info()
        for e in engines:
            e.shutdown()
        per_dtype[tag] = row
        for key in COMPARISONS:
            out[f"{key}_{tag}"] = r3(row[key]["ratio"])

    if not (args.quick or args.skip_http):
        log("== vllm serve with the plugin: salt leaks, bad specs (tests/vllm_serve_checks.py) ...")
        serve = run_json([sys.executable, "tests/vllm_serve_checks.py"])
        out["salt_leaks"] = serve.get("salt_leaks")
        out["bad_spec_non_400"] = serve.get("bad_spec_non_400")
        out["bad_specs_sent"] = serve.get("bad_specs_sent")
        out["serve_mismatches"] = serve.get("serve_mismatches")
        out["serve_error"] = serve.get("error")
    if not (args.quick or args.skip_tp):
        log("== tensor parallel 2 (tests/vllm_checks.py --family qwen2 --tp 2) ...")
        tp = run_json([sys.executable, "tests/vllm_checks.py", "--family", "qwen2", "--tp", "2"])
        out["tp2_equivalence_mismatches"] = tp.get("mismatches")
        out["tp2_compiled"] = tp.get("compiled")
        out["tp2_error"] = tp.get("error")

    load_at_end = round(os.getloadavg()[0], 2)
    wall_s = time.perf_counter() - wall0
    print(f"steerscale in vLLM (CPU only, {machine['cpus']} cpus, load {load_at_start} at start, {load_at_end} at "
          f"end): {args.model}, greedy, {tokens} new tokens per request, median of {repeats}; vector 'layers' at "
          f"resid_post of all {lm32.layout.n_layers} blocks, norm {VECTOR_NORM}")
    rows = []
    for tag, row in per_dtype.items():
        for key in COMPARISONS:
            r = row[key]
            rows.append([tag, key, statistics.median(r["a_tok_s"]), statistics.median(r["b_tok_s"]), r["ratio"]])
    print(fmt_table(["dtype", "comparison", "first tok/s", "second tok/s", "ratio"], rows))
    for key in ("equivalence_mismatches", "static_equivalence_mismatches", "bf16_mismatches_beyond_margin",
                "static_bf16_mismatches_beyond_margin", "isolation_mismatches", "salt_leaks", "bad_spec_non_400",
                "tp2_equivalence_mismatches"):
        if key in out:
            print(f"{key}: {out[key]}")
    out.update({"per_dtype": per_dtype, "settings": {"tokens": tokens, "repeats": repeats, "dtypes": dtypes,
                                                     "requests": N_REQUESTS, "scales": list(SCALES), **common},
                "loadavg_1m_at_start": load_at_start, "loadavg_1m_at_end": load_at_end, "wall_s": round(wall_s, 1),
                "machine": machine})
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
