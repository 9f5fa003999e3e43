"""steerscale's per-request steering inside vLLM: what it costs there, how vLLM compares with steerscale's own
batching engine on the same steered requests, and whether both give the same greedy tokens. One run.

    .venv-vllm/bin/python bench/vllm_steer.py [--model smollm2-135m-instruct] [--tokens 32] [--repeats 3]
                                              [--local-threads 1] [--quick]

Run it with the vLLM venv's python (``scripts/make_vllm_venv.sh``; steerscale installed editable there). Measured
on CPU only (vLLM's CPU build, 2 cores, no GPU here): the numbers say how the pieces compare on this machine, not
what vLLM does on an accelerator.

Setup: SmolLM2-135M-Instruct in float32, ``SteeredLLM(..., enforce_eager=True)`` (``src/steerscale/vllm``), prefix
caching off (the local engine has none, and repeats of the same prompts would otherwise skip their prefill),
``max_num_seqs=32``, ``max_num_batched_tokens=2048`` (a batch's whole prefill in one step). The steering vector
``layers``: at ``resid_post`` of every one of the 30 blocks, a random unit direction (one per block, seeded) scaled to
norm 8. The 32 requests: the 8 ``PROMPTS`` (chat template applied, the same token ids for both engines) four times,
steered with ``layers`` at scale 1, -1, 0.5, -0.5 (one scale per round of 8). Every request is greedy, ``ignore_eos``,
exactly ``--tokens`` new tokens. Batch B means the first B requests submitted together. Each timing takes a warm-up
first (the same batch for a few tokens), then ``--repeats`` repetitions; the two conditions compared are interleaved
within a repetition (order alternating) and a ratio is the median over repetitions of that repetition's throughput
ratio, so slow drifts of a shared machine cancel.

* ``steered_vs_plain_b1`` / ``_b16``: inside vLLM, ``llm.generate`` on the same 1 / 16 requests steered (per
  request, through ``steer=``) vs unsteered: throughput ratio (target >= 0.9).
* ``vllm_vs_local_b1`` / ``_b8`` / ``_b32``: the same steered requests through vLLM and through steerscale's local
  batching engine (``steerscale.serve.scheduler.Scheduler``, ``max_batch=32``, jobs submitted together, ``step()``
  until every future is done): tokens/s of each and their ratio (> 1: vLLM faster).
* ``equivalence_mismatches``: requests (of the 32) whose vLLM greedy token ids differ from the local engine's in any
  of the batch-1/8/32 runs (should be 0); for each difference the local top-2 logit margin at the first differing
  token is reported (float32 kernels may round differently only where the two best tokens nearly tie).
* ``isolation_mismatches``: a batch of 16 in vLLM with every other request steered (the rest unsteered) against
  each request alone in vLLM (should be 0).

Threads: on this 2-cpu machine vLLM's CPU worker binds its OpenMP compute to one core and reserves the other for its
engine and frontend processes (``VLLM_CPU_OMP_THREADS_BIND=auto``; the processes' cpu affinity is reported), so the
local engine computes on one torch thread too (``--local-threads``; it runs in this process, after vLLM's startup).
vLLM's engine and worker processes poll their queues even when idle (``vllm_idle`` reports their CPU seconds over an
idle window), so they are paused (SIGSTOP, then SIGCONT) while the local engine runs. Other work on the machine skews
every timing (and a second thread contending with another process slows torch's barriers badly): the 1-minute load
average at the start and the end is reported. A readable table first; last line: one JSON object.

``--quick`` is a smoke check: 8 new tokens per request (unless ``--tokens`` is given) and 1 repetition.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PROMPTS, fmt_table, log, machine_info

VECTOR_NORM = 8.0
SCALES = (1.0, -1.0, 0.5, -0.5)  # one per round of the 8 prompts: 32 requests
N_REQUESTS = 32
LOCAL_MAX_BATCH = 32
WARMUP_TOKENS = 4


def r3(x):
    return None if x is None else round(x, 3)


def shutdown(llm) -> None:
    """Stop vLLM's engine processes now and silence its loggers (its exit hooks would print after the report)."""
    import gc
    import logging

    try:
        llm.llm.llm_engine.engine_core.shutdown()
    except Exception as exc:  # noqa: BLE001 (best effort: the processes end with this one anyway)
        log(f"vLLM shutdown: {type(exc).__name__}: {exc}")
    logging.getLogger("vllm").setLevel(logging.CRITICAL)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("vllm"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    del llm
    gc.collect()
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per request (default 32; --quick: 8)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 3; --quick: 1)")
    ap.add_argument("--local-threads", type=int, default=1,
                    help="torch threads of the local engine (default 1: what vLLM's CPU worker computes on here)")
    ap.add_argument("--quick", action="store_true", help="smoke check: fewer tokens and repetitions")
    args = ap.parse_args()
    tokens = args.tokens or (8 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)
    wall0 = time.perf_counter()
    load_at_start = round(os.getloadavg()[0], 2)

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "2"
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import psutil
    import torch
    from vllm import SamplingParams

    from steerscale import Site, SiteKind, load_model
    from steerscale.engine.runtime import intervene
    from steerscale.scale import SamplingParams as LocalParams
    from steerscale.serve.scheduler import Job, Scheduler
    from steerscale.steer.vector import SteeringVector
    from steerscale.vllm import SteeredLLM

    machine = machine_info()  # torch threads of this process (the local engine's), cpus, loadavg
    machine["loadavg_1m_at_start"] = load_at_start

    # -- the model, the vector, the requests ------------------------------------------------------------------------
    log(f"loading {args.model} (float32) for the local engine ...")
    t0 = time.perf_counter()
    lm = load_model(args.model, dtype="float32")
    local_load_s = time.perf_counter() - t0
    n_layers = lm.layout.n_layers
    g = torch.Generator().manual_seed(0)
    directions = {}
    for layer in range(n_layers):
        site = Site(layer, SiteKind.RESID_POST)
        d = torch.randn(lm.layout.site_dim(site), generator=g)
        directions[site] = VECTOR_NORM * d / d.norm()
    vector = SteeringVector(directions, model_name=args.model)

    def chat_ids(text: str) -> list[int]:
        s = lm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
        return list(lm.tokenizer(s, add_special_tokens=False)["input_ids"])

    prompt_ids = [chat_ids(PROMPTS[i % len(PROMPTS)]) for i in range(N_REQUESTS)]
    scales = [SCALES[i // len(PROMPTS)] for i in range(N_REQUESTS)]
    specs = [[f"layers:{s}"] for s in scales]
    reqs = [{"prompt_token_ids": ids} for ids in prompt_ids]
    greedy = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    local_params = LocalParams(max_tokens=tokens, temperature=0.0, step=None, ignore_eos=True)
    warm = min(WARMUP_TOKENS, tokens)  # warm-ups run the same batch shapes for a few tokens
    warm_greedy = SamplingParams(temperature=0.0, max_tokens=warm, ignore_eos=True)
    warm_local = LocalParams(max_tokens=warm, temperature=0.0, step=None, ignore_eos=True)

    # -- the local engine ----------------------------------------------------------------------------------------------
    torch.set_num_threads(args.local_threads)
    machine["local_engine_torch_threads"] = torch.get_num_threads()
    sched = Scheduler(lm.model, lm.tokenizer, lm.layout, max_batch=LOCAL_MAX_BATCH)

    def local(idx: list[int], params=local_params) -> tuple[list[list[int]], float]:
        """The steered requests ``idx`` through the local engine, with vLLM's processes paused meanwhile."""
        paused = pause_vllm()
        try:
            t = time.perf_counter()
            futures = [sched.submit(Job(list(prompt_ids[i]), params, steer=[(vector, scales[i])])) for i in idx]
            while not all(f.done() for f in futures):
                sched.step()
            secs = time.perf_counter() - t
        finally:
            resume(paused)
        return [list(f.result()[0].token_ids) for f in futures], secs

    # -- vLLM ------------------------------------------------------------------------------------------------------------
    log("starting vLLM ...")
    t0 = time.perf_counter()
    llm = SteeredLLM(args.model, vectors={"layers": vector}, max_model_len=512, max_num_seqs=32,
                     max_num_batched_tokens=2048, enable_prefix_caching=False, seed=0)
    vllm_start_s = time.perf_counter() - t0
    log(f"vLLM up in {vllm_start_s:.1f} s")
    me = psutil.Process()

    def vllm_procs():
        return [p for p in me.children(recursive=True) if p.is_running()]

    vinfo = {"processes": len(vllm_procs())}
    try:
        procs = vllm_procs()
        vinfo["names"] = [p.name() for p in procs]
        vinfo["threads"] = [p.num_threads() for p in procs]
        vinfo["cpu_affinity"] = [p.cpu_affinity() for p in procs]
    except (psutil.Error, AttributeError):
        pass

    def pause_vllm() -> list:
        """SIGSTOP vLLM's engine and worker processes (idle, they still poll their queues and take CPU from the
        local engine); ``resume`` continues them."""
        paused = []
        for p in vllm_procs():
            try:
                p.suspend()
                paused.append(p)
            except psutil.Error:
                pass
        return paused

    def resume(paused: list) -> None:
        for p in paused:
            try:
                p.resume()
            except psutil.Error:
                pass

    def vllm_cpu() -> float:
        total = 0.0
        for p in vllm_procs():
            try:
                c = p.cpu_times()
                total += c.user + c.system
            except psutil.Error:
                pass
        return total

    def vllm(idx: list[int], steer=True, params=greedy) -> tuple[list[list[int]], float]:
        """Requests ``idx`` through vLLM in one ``generate``: all steered (``steer=True``), or steered where the
        per-request flags ``steer`` say so."""
        rs = [reqs[i] for i in idx]
        st = [specs[i] if (steer is True or steer[k]) else None for k, i in enumerate(idx)]
        t = time.perf_counter()
        outs = llm.generate(rs, params, steer=st)
        secs = time.perf_counter() - t
        return [list(o.outputs[0].token_ids) for o in outs], secs

    def plain(idx: list[int], params=greedy) -> tuple[list[list[int]], float]:
        rs = [reqs[i] for i in idx]
        t = time.perf_counter()
        outs = llm.generate(rs, params)
        secs = time.perf_counter() - t
        return [list(o.outputs[0].token_ids) for o in outs], secs

    # the vLLM engine's CPU use while it has no requests (what it takes from the local engine when that runs)
    c0, t0 = vllm_cpu(), time.perf_counter()
    time.sleep(2.0)
    idle = {"vllm_idle_cpu_s": round(vllm_cpu() - c0, 3), "window_s": round(time.perf_counter() - t0, 2)}

    def ntok(outs) -> int:
        return sum(len(o) for o in outs)

    # -- 1. steered vs plain inside vLLM ---------------------------------------------------------------------------------
    svp: dict[int, dict] = {}
    for b in (1, 16):
        idx = list(range(b))
        log(f"vLLM steered vs plain, batch {b}: warm-up + {repeats} repetitions ...")
        vllm(idx, params=warm_greedy), plain(idx, params=warm_greedy)
        rows, last = {"steered": [], "plain": []}, {}
        for rep in range(repeats):
            order = ("steered", "plain") if rep % 2 == 0 else ("plain", "steered")
            for cond in order:
                outs, secs = vllm(idx) if cond == "steered" else plain(idx)
                rows[cond].append(ntok(outs) / secs)
                last[cond] = outs
        ratios = [s / p for s, p in zip(rows["steered"], rows["plain"])]
        svp[b] = {"steered_tok_s": rows["steered"], "plain_tok_s": rows["plain"], "ratios": ratios,
                  "ratio": statistics.median(ratios),
                  "steered_changed": sum(a != c for a, c in zip(last["steered"], last["plain"]))}
        if b == 16:
            plain16 = last["plain"]

    # -- 2. vLLM vs the local engine, both steered ------------------------------------------------------------------------
    vvl: dict[int, dict] = {}
    outputs: dict[int, dict] = {}
    for b in (1, 8, 32):
        idx = list(range(b))
        log(f"vLLM vs local, batch {b}: warm-up + {repeats} repetitions ...")
        vllm(idx, params=warm_greedy), local(idx, params=warm_local)
        rows = {"vllm": [], "local": []}
        for rep in range(repeats):
            order = ("vllm", "local") if rep % 2 == 0 else ("local", "vllm")
            for eng in order:
                outs, secs = vllm(idx) if eng == "vllm" else local(idx)
                rows[eng].append(ntok(outs) / secs)
                outputs.setdefault(b, {})[eng] = outs
        ratios = [v / lo for v, lo in zip(rows["vllm"], rows["local"])]
        vvl[b] = {"vllm_tok_s": rows["vllm"], "local_tok_s": rows["local"], "ratios": ratios,
                  "ratio": statistics.median(ratios)}

    # -- 3. equivalence: vLLM vs local greedy tokens ---------------------------------------------------------------------
    def margin(i: int, prefix: list[int]) -> float:
        ids = list(prompt_ids[i])
        with torch.no_grad(), intervene(lm.layout, vector.interventions(scales[i]), prompt_width=len(ids)):
            logits = lm.model(input_ids=torch.tensor([ids + list(prefix)])).logits[0, -1].float()
        top = logits.topk(2).values
        return float(top[0] - top[1])

    differing: dict[int, dict] = {}
    by_batch = {}
    for b, o in outputs.items():
        by_batch[b] = 0
        for i, (v, lo) in enumerate(zip(o["vllm"], o["local"])):
            if v != lo:
                by_batch[b] += 1
                if i not in differing:
                    k = next((j for j, (x, y) in enumerate(zip(v, lo)) if x != y), min(len(v), len(lo)))
                    differing[i] = {"request": i, "batch": b, "first_difference": k, "local_margin": margin(i, lo[:k])}
    equivalence = len(differing)

    # -- 4. isolation: a mixed batch of 16 vs each request alone -----------------------------------------------------------
    log("isolation: mixed batch of 16 vs each alone ...")
    half = [k % 2 == 1 for k in range(16)]
    mixed, _ = vllm(list(range(16)), steer=half)
    alone = [vllm([i], steer=[half[i]])[0][0] for i in range(16)]
    isolation = sum(a != m for a, m in zip(alone, mixed))
    steered_acted = sum(mixed[i] != plain16[i] for i in range(16) if half[i])

    load_at_end = round(os.getloadavg()[0], 2)
    vllm_info = llm.info()
    shutdown(llm)  # vLLM logs its shutdown to stdout: done before the report, so the JSON line stays the last
    wall_s = time.perf_counter() - wall0

    # -- report ------------------------------------------------------------------------------------------------------------
    med = statistics.median
    print(f"steerscale in vLLM (CPU only, {machine['cpus']} cpus, load {load_at_start} at start, {load_at_end} at end): "
          f"{args.model}, float32, enforce_eager, greedy, {tokens} new tokens per request, median of {repeats}; "
          f"vLLM up in {vllm_start_s:.1f} s; local engine on {args.local_threads} torch thread(s), vLLM worker on "
          f"cpus {(vinfo.get('cpu_affinity') or ['?'])[-1]}")
    print(f"steering: vector 'layers' at resid_post of all {n_layers} blocks, norm {VECTOR_NORM} each, scales "
          f"{'/'.join(str(s) for s in SCALES)}")
    print(fmt_table(["vLLM", "batch", "steered tok/s", "plain tok/s", "steered / plain", "outputs changed"],
                    [["steered vs plain", b, med(v["steered_tok_s"]), med(v["plain_tok_s"]), v["ratio"],
                      f"{v['steered_changed']}/{b}"] for b, v in svp.items()]))
    print(fmt_table(["both steered", "batch", "vLLM tok/s", "local tok/s", "vLLM / local", "token mismatches"],
                    [["vLLM vs local", b, med(v["vllm_tok_s"]), med(v["local_tok_s"]), v["ratio"],
                      f"{by_batch[b]}/{b}"] for b, v in vvl.items()]))
    print(f"equivalence mismatches (vLLM vs local, of {N_REQUESTS} requests): {equivalence}"
          + "".join(f"\n  request {d['request']} (batch {d['batch']}): first difference at token "
                    f"{d['first_difference']}, local top-2 margin {d['local_margin']:.2e}" for d in differing.values()))
    print(f"isolation mismatches (mixed batch of 16 vs each alone in vLLM): {isolation}/16 "
          f"(steering changed {steered_acted}/8 steered outputs)")
    print(f"vLLM engine idle CPU: {idle['vllm_idle_cpu_s']} s over {idle['window_s']} s; wall {wall_s:.1f} s")

    print(json.dumps({
        "bench": "vllm_steer", "model": args.model, "device": "cpu",
        "steered_vs_plain_b1": r3(svp[1]["ratio"]), "steered_vs_plain_b16": r3(svp[16]["ratio"]),
        "vllm_vs_local_b1": r3(vvl[1]["ratio"]), "vllm_vs_local_b8": r3(vvl[8]["ratio"]),
        "vllm_vs_local_b32": r3(vvl[32]["ratio"]),
        "equivalence_mismatches": equivalence, "isolation_mismatches": isolation,
        "equivalence_mismatches_by_batch": by_batch, "token_differences": list(differing.values()),
        "steered_outputs_changed": {f"b{b}": v["steered_changed"] for b, v in svp.items()},
        "isolation_steering_acted": steered_acted,
        "raw": {
            "steered_vs_plain": {f"b{b}": {k: [round(x, 3) for x in v[k]] for k in
                                           ("steered_tok_s", "plain_tok_s", "ratios")} for b, v in svp.items()},
            "vllm_vs_local": {f"b{b}": {k: [round(x, 3) for x in v[k]] for k in ("vllm_tok_s", "local_tok_s", "ratios")}
                              for b, v in vvl.items()},
        },
        "tok_per_s": {**{f"vllm_steered_b{b}": round(med(v["steered_tok_s"]), 2) for b, v in svp.items()},
                      **{f"vllm_plain_b{b}": round(med(v["plain_tok_s"]), 2) for b, v in svp.items()},
                      **{f"vllm_b{b}": round(med(v["vllm_tok_s"]), 2) for b, v in vvl.items()},
                      **{f"local_b{b}": round(med(v["local_tok_s"]), 2) for b, v in vvl.items()}},
        "settings": {"tokens": tokens, "repeats": repeats, "quick": args.quick, "dtype": "float32",
                     "enforce_eager": True, "greedy": True, "ignore_eos": True, "prefix_caching": False,
                     "max_num_seqs": 32, "max_num_batched_tokens": 2048, "max_model_len": 512,
                     "local_max_batch": LOCAL_MAX_BATCH, "requests": N_REQUESTS, "scales": list(SCALES),
                     "vector": f"random unit direction per block at resid_post of all {n_layers} blocks, "
                               f"norm {VECTOR_NORM}", "prompt_tokens": [len(p) for p in prompt_ids],
                     "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
                     "VLLM_USE_V2_MODEL_RUNNER": os.environ.get("VLLM_USE_V2_MODEL_RUNNER")},
        "vllm_startup_s": round(vllm_start_s, 1), "local_load_s": round(local_load_s, 1),
        "vllm_processes": vinfo, "vllm_idle": idle,
        "loadavg_1m_at_start": load_at_start, "loadavg_1m_at_end": load_at_end,
        "wall_s": round(wall_s, 1), "machine": machine, "vllm_info": vllm_info}), flush=True)


if __name__ == "__main__":
    main()
