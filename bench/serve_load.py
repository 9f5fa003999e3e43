"""Load benchmark of ``steerscale serve``: batched throughput, the cost of mixed steering in one batch, time to
first token under load, and whether batching changes greedy answers. One server, one run.

The server runs as a subprocess of the command line (``steerscale serve -m MODEL --vector v1=... --vector v2=...
--max-batch N``), so this measures whatever server the CLI starts (see ``start_server``). The two vectors are
random unit directions at block 14 scaled to 4, saved to a temporary directory (this measures serving speed, not
what the steering does). Clients are the official ``openai`` client on threads; steering goes in
``extra_body={"steer": [{"vector": NAME, "scale": X}]}``. Every request is a greedy chat request for ``--tokens``
new tokens. The 16 requests: each of the 8 ``PROMPTS`` once unsteered and once steered, the steered ones with v1,
-v1, v2 or v1+v2 at their own scales.

* serial: the 16 requests one after another: completion tokens per second (the baseline).
* concurrent 8 / 16: the first 8, then all 16, sent at once: ``concurrent8_vs_serial``, ``concurrent16_vs_serial``
  (throughput ratios).
* mixed vs plain: the concurrent-16 batch (steered, unsteered and differently steered rows together) against the
  same 16 prompts all unsteered, also at once: ``mixed_vs_plain`` (throughput ratio).
* time to first token: 8 closed-loop clients keep 8 requests of 4x ``--tokens`` decoding while ``--probes``
  requests (of the 16, steered and not) arrive one at a time, streamed (``stream=True``): seconds until the first
  chunk with content (``ttft_p50_s``, ``ttft_p99_s``; with 20 probes p99 is close to the maximum) and until the
  stream ends (``e2e_*``). A server that cannot stream yet gives ``ttft`` null (with a note); the
  probes then run unstreamed for their end-to-end latency.
* ``mismatches``: answers of every concurrent run (and of the probes) that differ from the same request's
  serial answer; greedy decoding must not depend on the batch, steered or not. Should be 0.

* ``plan_step_ratio``: before the server starts, the engine loop in this process decodes 8 rows with 8 different
  steerings (scales, two vectors, an ablation, a set projection, a CAST decision, a scope) and the same 8 rows
  unsteered: steered / plain decoding steps per second (``plan_step_ratio``; alternating repeats, the median).
* the ceiling: before the server starts, one bare decoding forward pass of the model at batch 1, 8 and 16
  (``decode_step_ms``): ``forward_ceiling8 = 8 x t1 / t8`` is the most any batching server can gain at 8 rows here.

Decoding steps per run come from ``GET /metrics`` (Prometheus text, ``steerscale_*`` series) when the server has
it. A readable table first; last line: one JSON object.

    python bench/serve_load.py [--model smollm2-135m-instruct] [--tokens 48] [--max-batch 16] [--port 0]
                               [--probes 20] [--threads N] [--quick]
    python bench/serve_load.py --url http://127.0.0.1:8000/v1   # a running server with vectors v1, v2 registered

``--quick`` is a smoke check: 16 new tokens per request (unless ``--tokens`` is given) and 4 probes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import PROMPTS, ROOT, fmt_table, log, machine_info

SITE_LAYER = 14
VECTOR_NORM = 4.0
N_REQUESTS = 16  # the largest concurrency measured; the first 8 are the concurrent-8 run


# -- the server ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    """``python -m steerscale`` when the package has a ``__main__``, else the console script's entry point."""
    if importlib.util.find_spec("steerscale.__main__") is not None:
        return [sys.executable, "-m", "steerscale"]
    return [sys.executable, "-c", "import sys; from steerscale.cli import main; sys.exit(main(sys.argv[1:]))"]


def start_server(model: str, vectors: dict, max_batch: int, *, port: int = 0, threads: int | None = None,
                 ready_timeout: float = 600.0):
    """Start ``steerscale serve`` as a subprocess with ``vectors`` (name -> ``SteeringVector``) registered; wait
    until ``GET /health`` answers. Returns ``(base_url, close)``: the ``/v1`` URL, and a function that stops the
    server and removes its files. The one place that knows how the server is started."""
    tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
    specs = [f"--vector={name}={vec.save(tmp / f'{name}.safetensors')}" for name, vec in vectors.items()]
    port = port or free_port()
    cmd = [*serve_command(), "serve", "-m", model, *specs, "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(max_batch)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log_path = tmp / "server.log"
    log_file = open(log_path, "w")  # noqa: SIM115 (open while the server runs; close() closes it)
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                            start_new_session=True)

    def close() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the stdlib server and uvicorn both shut down cleanly on SIGINT
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log_file.close()
        shutil.rmtree(tmp, ignore_errors=True)

    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    while True:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-4000:]
            close()
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready:\n{tail}")
        try:
            with urllib.request.urlopen(f"{root}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            close()
            raise RuntimeError(f"the server did not answer GET /health within {ready_timeout:.0f} s")
        time.sleep(0.25)
    return f"{root}/v1", close


def read_metrics(base_url: str) -> dict[str, float] | None:
    """``steerscale_*`` series of ``GET /metrics`` (Prometheus text) as {"name{labels}": value}, or None."""
    try:
        with urllib.request.urlopen(base_url.rsplit("/v1", 1)[0] + "/metrics", timeout=5) as r:
            text = r.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        return None
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(steerscale_[A-Za-z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)", line)
        if m:
            try:
                out[m.group(1)] = float(m.group(2))
            except ValueError:
                pass
    return out or None


def steps_between(before: dict | None, after: dict | None) -> int | None:
    """Decoding steps run between two metric snapshots: the delta of the first unlabelled ``steerscale_*step*``
    counter (None when the server exposes none)."""
    if not before or not after:
        return None
    for name in sorted(after):
        if "{" not in name and re.search(r"steps?(_total)?$", name) and name in before:
            return int(after[name] - before[name])
    return None


# -- the requests ----------------------------------------------------------------------------------------------------
def steer_for(i: int) -> list[dict]:
    """Request i's steering: each prompt once unsteered and once steered; steered rows differ from each other."""
    if (i + i // len(PROMPTS)) % 2 == 0:
        return []
    j = i // 2  # 0..7 over the steered requests
    scale = round(0.5 + 0.25 * j, 2)
    return [[{"vector": "v1", "scale": scale}],
            [{"vector": "v1", "scale": -scale}],
            [{"vector": "v2", "scale": scale}],
            [{"vector": "v1", "scale": scale}, {"vector": "v2", "scale": round(scale / 2, 2)}]][j % 4]


def random_vectors(model: str) -> dict:
    """v1, v2: random unit directions at block ``SITE_LAYER``'s output, scaled to ``VECTOR_NORM`` (seeded). The model
    is loaded here only for the size of its residual stream."""
    import torch

    from steerscale import Site, SiteKind, load_model
    from steerscale.steer.vector import SteeringVector

    log(f"loading {model} to size the vectors ...")
    site = Site(SITE_LAYER, SiteKind.RESID_POST)
    lm = load_model(model)
    dim = lm.layout.site_dim(site)
    CEILING.update(decode_step_ms(lm.model))
    g = torch.Generator().manual_seed(0)
    vectors = {}
    for name in ("v1", "v2"):
        d = torch.randn(dim, generator=g)
        vectors[name] = SteeringVector({site: VECTOR_NORM * d / d.norm()}, model_name=model)
    log("engine loop: 8 differently steered rows vs 8 plain rows ...")
    PLAN.update(plan_step_ratio(lm, vectors))
    return vectors


PLAN: dict = {}  # the engine loop's steps per second, steered vs plain, measured in-process before the server starts


def plan_step_ratio(lm, vectors, steps: int = 24, repeats: int = 3) -> dict:
    """Decoding steps per second of the server's engine loop (``serve.scheduler.Scheduler``, in this process) for a
    batch of 8 rows with 8 different steerings (v1 and v2 at several scales, both together, an ablation, a set
    projection, a CAST decision, a generated-only scope) against the same 8 rows unsteered, on one loop (its hooks
    attached once); repeats alternate, the ratio is the median of the paired ratios. EOS is ignored so every row
    decodes every step."""
    import torch

    from steerscale import Site
    from steerscale.engine.decoding import SamplingParams
    from steerscale.serve.scheduler import Job, Scheduler
    from steerscale.steer.conditional import Condition, ConditionalSteering

    v1, v2 = vectors["v1"], vectors["v2"]
    site = next(iter(v1.directions))
    dim = lm.layout.site_dim(Site(SITE_LAYER))
    holds = Condition(Site(SITE_LAYER), torch.ones(dim), torch.zeros(dim), -2.0)  # cosine > -2: every prompt
    steerings = [[(v1, 1.0)], [(v1, -1.0)], [(v2, 2.0)], [(v1, 1.0), (v2, 0.5)], [(v1, ("set", 0.0))],
                 [(v2, ("set", 2.0))], [ConditionalSteering(v1, [holds], scale=2.0)], [(v2, -0.5, "generated")]]
    ids = [list(lm.tokenizer([p], add_special_tokens=False)["input_ids"][0]) for p in PROMPTS]
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, step=None, ignore_eos=True)
    loop = Scheduler(lm.model, lm.tokenizer, lm.layout, max_batch=8, sites=[site])

    def steps_per_s(steered: bool) -> float:
        futures = [loop.submit(Job(i, params, steer=s if steered else ())) for i, s in zip(ids, steerings)]
        loop.step()  # admission (one prefill for the 8) and the first token
        t0 = time.perf_counter()
        for _ in range(steps):
            loop.step()
        rate = steps / (time.perf_counter() - t0)
        while not all(f.done() for f in futures):
            loop.step()
        return rate

    steps_per_s(True)  # warm-up: the first pass pays for allocations
    pairs = []
    for r in range(repeats):
        order = (True, False) if r % 2 == 0 else (False, True)
        rates = dict(zip(order, (steps_per_s(order[0]), steps_per_s(order[1]))))
        pairs.append((rates[True], rates[False]))
    loop.stop()
    ratios = sorted(s / p for s, p in pairs)
    return {"plan_step_ratio": round(ratios[len(ratios) // 2], 3),
            "plan_steps_per_s": {"steered": [round(s, 2) for s, _ in pairs], "plain": [round(p, 2) for _, p in pairs]}}


CEILING: dict = {}  # the model's own decode-step time per batch size, measured before the server starts


def decode_step_ms(model, batches=(1, 8, 16), context: int = 60, repeats: int = 10) -> dict:
    """Milliseconds of one bare decoding forward pass (no server, no sampling) at each batch size, with a KV cache
    of ``context`` tokens: what batching can at best gain on this machine (``8 x t1 / t8``)."""
    import torch

    out = {}
    with torch.no_grad():
        for b in batches:
            ids = torch.randint(0, 1000, (b, context))
            cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
            mask = torch.ones(b, context + 1, dtype=torch.long)
            t = time.perf_counter()
            for _ in range(repeats):
                model(input_ids=ids[:, :1], attention_mask=mask, position_ids=torch.full((b, 1), context),
                      past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache.crop(-1)
            out[b] = round((time.perf_counter() - t) / repeats * 1000, 1)
    return out


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (q in [0, 1]), as numpy's default."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def r3(x):
    return None if x is None else round(x, 3)


class Bench:
    def __init__(self, client, model: str, tokens: int):
        self.client, self.model, self.tokens = client, model, tokens

    def kwargs(self, prompt: str, steer: list[dict], max_tokens: int) -> dict:
        kw = {"model": self.model, "temperature": 0, "max_tokens": max_tokens,
              "messages": [{"role": "user", "content": prompt}]}
        if steer:
            kw["extra_body"] = {"steer": steer}
        return kw

    def ask(self, prompt: str, steer: list[dict], max_tokens: int | None = None) -> tuple[str, int]:
        r = self.client.chat.completions.create(**self.kwargs(prompt, steer, max_tokens or self.tokens))
        return r.choices[0].message.content or "", r.usage.completion_tokens

    def ask_stream(self, prompt: str, steer: list[dict]) -> tuple[str, float | None, float]:
        """Streamed: (text, seconds to the first chunk with content, seconds to the end of the stream)."""
        t0 = time.perf_counter()
        stream = self.client.chat.completions.create(stream=True, **self.kwargs(prompt, steer, self.tokens))
        ttft, parts = None, []
        for chunk in stream:
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                parts.append(delta)
        return "".join(parts), ttft, time.perf_counter() - t0

    def run(self, reqs: list[tuple[str, list[dict]]], concurrent: bool) -> tuple[list[tuple[str, int]], float]:
        t0 = time.perf_counter()
        if concurrent:
            with ThreadPoolExecutor(max_workers=len(reqs)) as pool:
                out = list(pool.map(lambda r: self.ask(*r), reqs))
        else:
            out = [self.ask(*r) for r in reqs]
        return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per request (default 48; --quick: 16)")
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (default 16)")
    ap.add_argument("--port", type=int, default=0, help="server port (default 0: pick a free one)")
    ap.add_argument("--probes", type=int, default=None, help="time-to-first-token probes (default 20; --quick: 4)")
    ap.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's own)")
    ap.add_argument("--quick", action="store_true", help="smoke check: fewer tokens and probes")
    ap.add_argument("--url", default=None, metavar="BASE_URL",
                    help="bench a server already running at BASE_URL (e.g. http://127.0.0.1:8000/v1) serving "
                         "--model with vectors v1 and v2 registered, instead of starting one")
    args = ap.parse_args()
    tokens = args.tokens or (16 if args.quick else 48)
    n_probes = args.probes or (4 if args.quick else 20)
    wall0 = time.perf_counter()
    load_at_start = round(os.getloadavg()[0], 2)  # other work on the cores skews every number here

    from openai import OpenAI

    if args.url:
        base_url, close, startup_s = args.url.rstrip("/"), lambda: None, None
    else:
        vectors = random_vectors(args.model)
        log("starting the server ...")
        t0 = time.perf_counter()
        base_url, close = start_server(args.model, vectors, args.max_batch, port=args.port, threads=args.threads)
        startup_s = round(time.perf_counter() - t0, 1)
        log(f"server ready at {base_url} after {startup_s} s")
    client = OpenAI(base_url=base_url, api_key="none", timeout=600, max_retries=0)
    b = Bench(client, args.model, tokens)
    reqs = [(PROMPTS[i % len(PROMPTS)], steer_for(i)) for i in range(N_REQUESTS)]
    plain = [(p, []) for p, _ in reqs]
    runs: dict[str, dict] = {}
    notes: list[str] = []
    probe = {}

    def measure(name: str, rs, concurrent: bool):
        log(f"{name}: {len(rs)} requests {'at once' if concurrent else 'one after another'} ...")
        m0 = read_metrics(base_url)
        out, secs = b.run(rs, concurrent)
        runs[name] = {"requests": len(rs), "tokens": sum(n for _, n in out), "seconds": secs,
                      "steps": steps_between(m0, read_metrics(base_url)), "answers": [a for a, _ in out]}
        runs[name]["tok_per_s"] = runs[name]["tokens"] / secs

    try:
        log("warm-up ...")
        b.run([(PROMPTS[0], []), (PROMPTS[1], steer_for(1))], concurrent=True)
        b.run([(PROMPTS[0], []), (PROMPTS[1], steer_for(1))], concurrent=False)

        measure("serial", reqs, concurrent=False)
        measure("concurrent8", reqs[:8], concurrent=True)
        measure("concurrent16", reqs, concurrent=True)  # the mixed batch
        measure("plain16", plain, concurrent=True)
        probe = time_to_first_token(b, reqs, n_probes, tokens, notes)
        final_metrics = read_metrics(base_url)
    finally:
        close()

    # -- mismatches: each concurrent answer against the same request's serial answer --------------------------------
    serial = runs["serial"]["answers"]
    serial_plain = {p: a for (p, s), a in zip(reqs, serial) if not s}
    expected = {"concurrent8": serial[:8], "concurrent16": serial, "plain16": [serial_plain[p] for p, _ in plain]}
    by_run = {name: sum(a != e for a, e in zip(runs[name]["answers"], exp)) for name, exp in expected.items()}
    by_run["ttft_probes"] = sum(a != serial[i] for i, a in probe["answers"])
    mismatches = sum(by_run.values())

    rate = {k: v["tok_per_s"] for k, v in runs.items()}
    c8, c16, mixed = rate["concurrent8"] / rate["serial"], rate["concurrent16"] / rate["serial"], \
        rate["concurrent16"] / rate["plain16"]
    checked = {"concurrent8": 8, "concurrent16": 16, "plain16": 16, "ttft_probes": len(probe["answers"])}
    labels = {"serial": "serial (16 mixed, one after another)", "concurrent8": "concurrent 8 (mixed)",
              "concurrent16": "concurrent 16 (mixed)", "plain16": "concurrent 16 (all unsteered)"}
    ratio = {"serial": 1.0, "concurrent8": c8, "concurrent16": c16, "plain16": rate["plain16"] / rate["serial"]}
    rows = [[labels[k], v["requests"], v["tokens"], v["seconds"], v["tok_per_s"], ratio[k], v["steps"],
             "" if k == "serial" else f"{checked[k] - by_run[k]}/{checked[k]}"] for k, v in runs.items()]
    print(f"steerscale serve load: {args.model}, greedy, {tokens} new tokens per request, --max-batch "
          f"{args.max_batch}, " + (f"server up in {startup_s} s" if startup_s is not None else f"server at {base_url}"))
    print(fmt_table(["run", "requests", "tokens", "seconds", "tok/s", "vs serial", "decoding steps",
                     "same as serial"], rows))
    print(f"mixed vs plain (concurrent 16): x{mixed:.3f} the throughput")
    ttft = probe["ttft"]
    print(fmt_table(["probes, 8 others decoding", "n", "p50 s", "p99 s", "mean s"], [
        ["time to first token", len(ttft), percentile(ttft, 0.5), percentile(ttft, 0.99),
         sum(ttft) / len(ttft) if ttft else None],
        ["end to end" + ("" if probe["streamed"] else " (unstreamed)"), len(probe["e2e"]),
         percentile(probe["e2e"], 0.5), percentile(probe["e2e"], 0.99), sum(probe["e2e"]) / len(probe["e2e"])]]))
    print(f"mismatches: {mismatches} ({', '.join(f'{k} {v}' for k, v in by_run.items())})")
    if CEILING:
        print(f"bare decoding step (no server) at batch 1 / 8 / 16: {CEILING[1]} / {CEILING[8]} / {CEILING[16]} ms: "
              f"batching can at best give x{8 * CEILING[1] / CEILING[8]:.2f} at 8 rows, "
              f"x{16 * CEILING[1] / CEILING[16]:.2f} at 16")
    if PLAN:
        print(f"engine loop, 8 rows with 8 different steerings vs 8 plain rows: x{PLAN['plan_step_ratio']:.3f} the "
              f"decoding steps per second (steered {PLAN['plan_steps_per_s']['steered']}, plain "
              f"{PLAN['plan_steps_per_s']['plain']})")
    for note in notes:
        print(f"note: {note}")

    print(json.dumps({
        "bench": "serve_load", "model": args.model, "tokens": tokens, "max_batch": args.max_batch,
        "quick": args.quick, "server_threads": args.threads, "requests": N_REQUESTS, "probes": n_probes,
        "vectors": f"2 random directions at block {SITE_LAYER}, norm {VECTOR_NORM}",
        "concurrent8_vs_serial": r3(c8), "concurrent16_vs_serial": r3(c16), "mixed_vs_plain": r3(mixed),
        "plan_step_ratio": PLAN.get("plan_step_ratio"), "plan_steps_per_s": PLAN.get("plan_steps_per_s"),
        "decode_step_ms": CEILING or None,
        "forward_ceiling8": r3(8 * CEILING[1] / CEILING[8]) if CEILING else None,
        "forward_ceiling16": r3(16 * CEILING[1] / CEILING[16]) if CEILING else None,
        "ttft_p50_s": r3(percentile(ttft, 0.5)), "ttft_p99_s": r3(percentile(ttft, 0.99)),
        "e2e_p50_s": r3(percentile(probe["e2e"], 0.5)), "e2e_p99_s": r3(percentile(probe["e2e"], 0.99)),
        "streaming": probe["streamed"], "mismatches": mismatches, "mismatches_by_run": by_run,
        "serial_tok_per_s": round(rate["serial"], 2), "concurrent8_tok_per_s": round(rate["concurrent8"], 2),
        "concurrent16_tok_per_s": round(rate["concurrent16"], 2), "plain16_tok_per_s": round(rate["plain16"], 2),
        "completion_tokens": {k: v["tokens"] for k, v in runs.items()},
        "steps": {k: v["steps"] for k, v in runs.items()} if any(v["steps"] is not None for v in runs.values())
        else None,
        "server_metrics": {k: v for k, v in (final_metrics or {}).items() if not re.search(r"_(bucket|created)\b", k)}
        or None, "probe_background_requests": probe["background"],
        "server_startup_s": startup_s, "wall_s": round(time.perf_counter() - wall0, 1),
        "loadavg_1m_at_start": load_at_start,
        "notes": notes, "machine": machine_info()}))


def time_to_first_token(b: Bench, reqs, n_probes: int, tokens: int, notes: list[str]) -> dict:
    """8 closed-loop clients keep long requests decoding; probes arrive one at a time, streamed when the server
    can. Returns ttft and e2e seconds, the probes' (request index, answer) and whether they streamed."""
    stop = threading.Event()
    done = [0]

    def background(k: int) -> None:
        i = k
        while not stop.is_set():
            b.ask(*reqs[i % len(reqs)], max_tokens=4 * tokens)
            done[0] += 1
            i += 8

    log(f"ttft: {n_probes} probes while 8 clients keep decoding ...")
    pool = ThreadPoolExecutor(max_workers=8)
    futures = [pool.submit(background, k) for k in range(8)]
    rng = random.Random(0)
    ttft, e2e, answers, streamed = [], [], [], True
    try:
        time.sleep(1.5)  # let the 8 prefill and start decoding
        for p in range(n_probes):
            i = (3 * p + 1) % len(reqs)  # steered and unsteered probes, different prompts
            if streamed:
                try:
                    text, first, total = b.ask_stream(*reqs[i])
                    if first is None and text == "":
                        raise RuntimeError("the stream carried no content")
                    ttft.append(first)
                    e2e.append(total)
                    answers.append((i, text))
                except Exception as exc:  # noqa: BLE001 (any failure: the server cannot stream)
                    streamed = False
                    ttft.clear()
                    notes.append(f"streaming failed ({type(exc).__name__}: {str(exc)[:160]}); ttft is null, the "
                                 "probes ran unstreamed for their end-to-end latency (the streaming server is being "
                                 "written)")
                    log(notes[-1])
            if not streamed:
                t0 = time.perf_counter()
                text, _ = b.ask(*reqs[i])
                e2e.append(time.perf_counter() - t0)
                answers.append((i, text))
            time.sleep(rng.uniform(0.05, 0.3))  # arrive at different points of a decoding step
    finally:
        stop.set()
        for f in futures:
            f.result()  # raises a background failure
        pool.shutdown()
    return {"ttft": ttft if streamed else [], "e2e": e2e, "answers": answers, "streamed": streamed,
            "background": done[0]}


if __name__ == "__main__":
    main()
