"""Thread choice on a shared machine (issue 24, item 8): automatic vs torch's default vs one thread.

Two workloads, each run in a fresh process per configuration, idle and with one competing job (a separate process
running a two-thread torch matmul loop, started before and stopped after each run):

* ``solve``: the whole ``steerscale solve -p "Calculate 59 + 8 + 13." --strategy particle_filter --verifier
  arith_prm -n 4 --budget tokens=300 --seed 0`` process (model load included), wall seconds and its answer;
* ``decode``: one batch-8 greedy ``generate`` of ``--tokens`` tokens per row (EOS suppressed, so every run makes the
  same tokens), seconds of the ``generate`` call after a warm-up.

Configurations: ``auto`` (nothing set: steerscale chooses), ``default`` (``STEERSCALE_THREADS`` = the count torch
picks in a fresh process, measured first) and ``one`` (``STEERSCALE_THREADS=1``). On a shared machine, other people's
jobs come and go: before every run the bench waits (up to ``--wait-idle`` s) until no other process's thread is
runnable, and while it runs it samples, every 0.25 s, the runnable threads of third parties (everything but this
bench, the measured process and the competing job). A run during which they averaged more than ``--max-third``
is stopped and started again when the machine is quiet (up to ``--retries`` times; the last attempt runs to the
end whatever the load); every run records its third-party load and the thread count steerscale ended on. Medians
over ``--reps``.

    python bench/threads.py --reps 2            # ~10 minutes per rep on a 2-core machine
    python bench/threads.py --demo              # also time `steerscale demo`, idle and with the competing job
    python bench/threads.py --only-pairs --idle-pairs 8   # the idle cost of auto alone, paired in one process
    python bench/threads.py --only-demo --demo-scaling-problems 8   # the demo idle and loaded, a shorter scaling part

``--idle-pairs N``: separate runs in fresh processes spread by up to 38% idle here, too much to resolve a 5% cost.
So the idle cost is also measured in one process (model loaded once): the solve (through the library) and a
batch-8 decode run alternately under the automatic choice and torch's default, N pairs whose order alternates;
``idle_ratio_vs_default_paired`` is the smaller workload's mean default/auto ratio over the pairs (with a 95%
bootstrap interval in ``paired_idle``).

Last line: one JSON object with ``loaded_speedup_vs_default`` (default / auto seconds with the competing job) and
``idle_ratio_vs_default`` (default / auto seconds idle), each the smaller over the two workloads, plus each
workload's ratios, the raw times, the competing job's description and the machine's load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOLVE = ["solve", "-p", "Calculate 59 + 8 + 13.", "--strategy", "particle_filter", "--verifier", "arith_prm", "-n", "4",
         "--budget", "tokens=300", "--seed", "0", "--json"]
CONFIGS = ("auto", "default", "one")
COMPETITOR = {"process": "python bench/threads.py --compete", "threads": 2, "op": "512x512 float32 matmul, in a loop"}
THREAD_VARS = ("STEERSCALE_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

# Runs the CLI, then reports steerscale's last thread decision on stderr (what auto chose, and the machine it saw).
CLI_WRAPPER = ("import json, sys\nfrom steerscale.cli import main\nrc = main(sys.argv[1:])\n"
               "from steerscale.models.threads import status\n"
               "print('THREADS ' + json.dumps(status()), file=sys.stderr)\nsys.exit(rc)\n")


# -- the child processes ------------------------------------------------------------------------------------------
def compete() -> None:
    """The competing job: a two-thread matmul loop until SIGTERM, then one JSON line with its matmuls per second."""
    import torch

    torch.set_num_threads(2)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    n, start = 0, time.perf_counter()
    while not stop:
        a @ b
        n += 1
    print(json.dumps({"matmuls_per_s": n / (time.perf_counter() - start)}), flush=True)


def decode(tokens: int) -> None:
    """The batch-8 decode: load, warm up, time one ``generate``; one JSON line."""
    sys.path.insert(0, str(ROOT / "bench"))
    import _common as c
    import steerscale
    from steerscale.models.threads import status

    lm = steerscale.load_model("smollm2-135m-instruct")
    model, tok, layout = lm
    steerscale.generate(model, tok, layout, c.PROMPTS, max_new_tokens=4)  # first-call costs (allocations)
    start = time.perf_counter()
    out = steerscale.generate(model, tok, layout, c.PROMPTS, max_new_tokens=tokens, min_new_tokens=tokens)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "tokens": sum(g.n_tokens for g in out), "threads": status()}), flush=True)


def idle_pairs(pairs: int, tokens: int) -> None:
    """The idle cost of the automatic choice, in one process: the same two workloads (the particle-filter solve of
    ``SOLVE`` through the library, and a batch-8 greedy decode of ``tokens`` tokens) run alternately under the
    automatic choice and under torch's default count, in pairs whose order alternates (auto first, then default
    first), so the host's drift falls on both alike. One JSON line per run, then one with the pairs."""
    sys.path.insert(0, str(ROOT / "bench"))
    import _common as c
    import steerscale
    from steerscale.cli import build_parser
    from steerscale.models.threads import set_threads, status
    from steerscale.scale import LocalBackend
    from steerscale.scale.spec import StrategySpec

    lm = steerscale.load_model("smollm2-135m-instruct")
    default = torch_default_threads()
    spec = StrategySpec.from_args(build_parser().parse_args(SOLVE))

    def solve():
        with LocalBackend(lm.model, lm.tokenizer, lm.layout) as backend:
            return spec.run(SOLVE[2], backend).answer

    def decode_batch():
        out = steerscale.generate(lm.model, lm.tokenizer, lm.layout, c.PROMPTS, max_new_tokens=tokens,
                                  min_new_tokens=tokens)
        return sum(g.n_tokens for g in out)

    workloads = {"solve": solve, "decode": decode_batch}
    for work in workloads.values():  # warm-up: first-call allocations, the dequantized-weights cache
        set_threads("auto")
        work()
    for i in range(pairs):
        for config in (("auto", "default") if i % 2 == 0 else ("default", "auto")):
            for name, work in workloads.items():
                set_threads("auto" if config == "auto" else default)
                counts = status()["counts"]
                start = time.perf_counter()
                result = work()
                seconds = time.perf_counter() - start
                now = status()
                print(json.dumps({"pair": i, "workload": name, "config": config, "seconds": seconds,
                                  "result": result, "threads": now.get("threads"),
                                  # the automatic readings of this run: how many saw load, how many applied it
                                  "readings": {k: v - counts[k] for k, v in now["counts"].items()}}), flush=True)


# -- the parent ---------------------------------------------------------------------------------------------------
def env_for(config: str, default_threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    if config == "default":
        env["STEERSCALE_THREADS"] = str(default_threads)
    elif config == "one":
        env["STEERSCALE_THREADS"] = "1"
    return env


def torch_default_threads() -> int:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def machine_load() -> dict:
    from steerscale.models.threads import read_machine

    m = read_machine(samples=9, gap=0.01)
    return {"others_runnable": m.others, "cpus": m.cpus, "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0])}


def wait_idle(limit: float) -> dict:
    """Wait until no other process's thread is runnable (two readings in a row), at most ``limit`` seconds."""
    start, quiet = time.perf_counter(), 0
    while True:
        load = machine_load()
        quiet = quiet + 1 if load["others_runnable"] == 0 else 0
        if quiet >= 2 or time.perf_counter() - start > limit:
            return {**load, "waited_s": round(time.perf_counter() - start, 1)}
        time.sleep(2)


class Competitor:
    def __enter__(self):
        env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--compete"], env=env,
                                     stdout=subprocess.PIPE, text=True)
        time.sleep(2.0)  # its threads are up and busy before the measured run starts
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        lines = [ln for ln in out.splitlines() if ln.strip()]
        self.rate = json.loads(lines[-1])["matmuls_per_s"] if lines else None


class Monitor:
    """Third parties' runnable threads, sampled every 0.25 s: ``procs_running`` minus the runnable threads of this
    bench and of ``pids`` (the measured process and the competing job, added as they start)."""

    def __init__(self):
        self.pids: list[int] = []
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from steerscale.models.threads import procs_running, running_threads

        proc = Path("/proc")
        while not self._stop.wait(0.25):
            try:
                running = procs_running((proc / "stat").read_text())
            except (OSError, ValueError):
                continue
            ours = running_threads(proc) + sum(running_threads(proc, pid) for pid in list(self.pids))
            self.samples.append(max(0, running - ours))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else 0.0


class Disturbed(Exception):
    """Third parties loaded the machine while a run went on: it was stopped, to be run again."""


def run_child(args: list[str], env: dict, timeout: float, monitor: Monitor, max_third: float | None) -> tuple[float, str, str]:
    """Run ``python args`` and return (seconds, stdout, stderr). With ``max_third``, stop it early (``Disturbed``)
    once third parties have averaged more runnable threads than that over at least 5 s: its time would measure
    them, and a run at torch's default under such load can take many minutes."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *args], env=env, stdout=out, stderr=err, text=True, cwd=str(ROOT))
        monitor.pids.append(proc.pid)
        first = len(monitor.samples)
        try:
            while proc.poll() is None:
                time.sleep(0.25)
                seconds = time.perf_counter() - start
                window = monitor.samples[first:]
                if max_third is not None and seconds > 5 and sum(window) / len(window) > max_third:
                    raise Disturbed(f"third parties averaged {sum(window) / len(window):.2f} runnable threads")
                if seconds > timeout:
                    raise RuntimeError(f"{args[:3]} ran past --timeout {timeout} s")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            monitor.pids.remove(proc.pid)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{args[:3]} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    return seconds, stdout, stderr


def threads_line(stderr: str) -> dict | None:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("THREADS ")]
    return json.loads(lines[-1][8:]) if lines else None


def attempt(workload: str, config: str, loaded: bool, args, default_threads: int, last: bool) -> dict | None:
    """One run; None when third parties disturbed it (stopped early), except on the ``last`` attempt, which runs
    to the end whatever the load and records it."""
    env = env_for(config, default_threads)
    quiet = wait_idle(args.wait_idle)  # loaded too: the competing job should be the only other work
    max_third = None if last else args.max_third
    with Competitor() if loaded else contextlib.nullcontext() as competitor, Monitor() as monitor:
        if competitor:
            monitor.pids.append(competitor.proc.pid)  # before the first sample, 0.25 s after the monitor starts
        load = {**machine_load(), "before_competitor": quiet} if loaded else quiet
        try:
            if workload == "solve":
                seconds, out, err = run_child(["-c", CLI_WRAPPER, *SOLVE], env, args.timeout, monitor, max_third)
                rec = {"seconds": seconds, "answer": json.loads(out)["answer"], "threads": threads_line(err)}
            elif workload == "decode":
                _, out, _ = run_child([str(Path(__file__).resolve()), "--decode", "--tokens", str(args.tokens)], env,
                                      args.timeout, monitor, max_third)
                rec = json.loads(out.strip().splitlines()[-1])
            else:  # demo
                with tempfile.TemporaryDirectory() as tmp:
                    demo = ["demo", "-o", tmp] + ([] if args.demo_scaling_problems is None else
                                                  ["--scaling-problems", str(args.demo_scaling_problems)])
                    seconds, _, err = run_child(["-c", CLI_WRAPPER, *demo], env, args.timeout, monitor,
                                                max_third)
                rec = {"seconds": seconds, "threads": threads_line(err)}
        except Disturbed as exc:
            print(f"  {workload:6} {'loaded' if loaded else 'idle':6} {config:7} stopped: {exc}; again when quiet",
                  flush=True)
            return None
    rec.update(workload=workload, config=config, loaded=loaded, load=load, third_party=round(monitor.mean(), 2),
               competitor_matmuls_per_s=competitor.rate if competitor else None)
    chose = (rec.get("threads") or {}).get("threads")
    print(f"  {workload:6} {'loaded' if loaded else 'idle':6} {config:7} {rec['seconds']:7.1f} s  threads {chose}  "
          f"third-party runnable {rec['third_party']:.2f}" + (f"  answer {rec['answer']}" if "answer" in rec else "")
          + (f"  competitor {rec['competitor_matmuls_per_s']:.0f} matmul/s" if loaded else ""), flush=True)
    return rec


def measure(workload: str, config: str, loaded: bool, args, default_threads: int) -> dict:
    """One run, started again (up to ``--retries`` times) when third parties disturb it."""
    for i in range(args.retries + 1):
        rec = attempt(workload, config, loaded, args, default_threads, last=i == args.retries)
        if rec is not None:
            rec["attempts"] = i + 1
            return rec
    raise AssertionError("the last attempt always returns")


def paired_idle(args) -> dict:
    """Run ``idle_pairs`` in a fresh process (no thread settings in its environment), recording the third parties'
    runnable threads during each run; per workload: default/auto seconds per pair, their mean and 95% bootstrap
    interval, and what the automatic choice chose."""
    from steerscale.measure.stats import bootstrap_ci

    quiet = wait_idle(args.wait_idle)
    runs = []
    with Monitor() as monitor:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--idle-pairs-child",
                                 str(args.idle_pairs), "--tokens", str(args.pair_tokens)],
                                env=env_for("auto", 0), stdout=subprocess.PIPE, text=True, cwd=ROOT)
        monitor.pids.append(proc.pid)
        seen = 0
        for line in proc.stdout:
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            window = monitor.samples[seen:]
            seen = len(monitor.samples)
            rec["third_party"] = round(sum(window) / len(window), 2) if window else 0.0
            runs.append(rec)
            print(f"  pair {rec['pair']:2} {rec['workload']:6} {rec['config']:7} {rec['seconds']:6.2f} s  threads "
                  f"{rec['threads']}  readings {rec['readings']}  third-party runnable {rec['third_party']:.2f}",
                  flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"the paired child failed ({proc.returncode})")
    out = {"pairs": args.idle_pairs, "decode_tokens_per_row": args.pair_tokens, "load_before": quiet}
    for workload in ("solve", "decode"):
        by = {(r["pair"], r["config"]): r for r in runs if r["workload"] == workload}
        ratios = [by[(i, "default")]["seconds"] / by[(i, "auto")]["seconds"] for i in range(args.idle_pairs)]
        est = bootstrap_ci(ratios)
        out[workload] = {"default_vs_auto_mean": round(est.mean, 3), "ci95": [round(est.lo, 3), round(est.hi, 3)],
                         "default_vs_auto_median": round(statistics.median(ratios), 3),
                         "ratios": [round(x, 3) for x in ratios],
                         "auto_threads": sorted({r["threads"] for (_, cfg), r in by.items() if cfg == "auto"}),
                         "results_equal": len({str(r["result"]) for r in by.values()}) == 1,
                         "auto_readings": {k: sum(r["readings"][k] for (_, cfg), r in by.items() if cfg == "auto")
                                           for k in ("readings", "saw_load", "applied_fewer")},
                         "third_party_max": max(r["third_party"] for r in by.values())}
        print(f"{workload}: default/auto {est} (median {statistics.median(ratios):.3f}); auto chose "
              f"{out[workload]['auto_threads']}", flush=True)
    out["idle_ratio_vs_default_paired"] = min(out[w]["default_vs_auto_mean"] for w in ("solve", "decode"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=1, help="repetitions of every run (median)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per row in the batch-8 decode")
    ap.add_argument("--wait-idle", type=float, default=300, help="seconds to wait for a quiet machine before a run")
    ap.add_argument("--max-third", type=float, default=0.25,
                    help="a run during which third parties averaged more runnable threads than this is run again")
    ap.add_argument("--retries", type=int, default=8, help="extra attempts for a run that third parties disturbed")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before a run counts as failed")
    ap.add_argument("--demo", action="store_true", help="also time `steerscale demo` (auto), idle and loaded")
    ap.add_argument("--idle-pairs", type=int, default=0,
                    help="also measure the idle cost of the automatic choice precisely: this many pairs of runs in "
                         "one process, auto and torch's default alternating (0: skip; 8 take ~6 minutes here)")
    ap.add_argument("--pair-tokens", type=int, default=32, help="tokens per row of the decode in each pair")
    ap.add_argument("--only-pairs", action="store_true", help="run only the paired idle measurement")
    ap.add_argument("--only-demo", action="store_true",
                    help="run only the demo, idle and with the competing job (auto threads), and their ratio")
    ap.add_argument("--demo-scaling-problems", type=int,
                    help="the demo's --scaling-problems (default: the demo's own; fewer for a shorter run)")
    ap.add_argument("--idle-pairs-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--compete", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--decode", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compete:
        return compete()
    if args.decode:
        return decode(args.tokens)
    if args.idle_pairs_child:
        return idle_pairs(args.idle_pairs_child, args.tokens)
    if args.only_demo:
        sys.path.insert(0, str(ROOT / "src"))
        started = time.perf_counter()
        runs = {("loaded" if loaded else "idle"): measure("demo", "auto", loaded, args, torch_default_threads())
                for loaded in (False, True)}
        print(json.dumps({"demo_seconds": {k: round(r["seconds"], 1) for k, r in runs.items()},
                          "demo_loaded_vs_idle": round(runs["loaded"]["seconds"] / runs["idle"]["seconds"], 3),
                          "demo_scaling_problems": args.demo_scaling_problems,
                          "auto_threads": {k: (r.get("threads") or {}).get("threads") for k, r in runs.items()},
                          "third_party": {k: r["third_party"] for k, r in runs.items()},
                          "competitor_matmuls_per_s": runs["loaded"]["competitor_matmuls_per_s"],
                          "bench_seconds": round(time.perf_counter() - started, 1)}))
        return
    if args.only_pairs:
        args.idle_pairs = args.idle_pairs or 8
        sys.path.insert(0, str(ROOT / "src"))
        print(json.dumps({"paired_idle": paired_idle(args)}))
        return

    sys.path.insert(0, str(ROOT / "src"))
    default_threads = torch_default_threads()
    print(f"torch's default here: {default_threads} threads; cpus {os.cpu_count()}; "
          f"competing job: {COMPETITOR}", flush=True)
    started, load_start = time.perf_counter(), machine_load()
    runs = []
    for rep in range(args.reps):
        for loaded in (False, True):
            for workload in ("solve", "decode"):
                order = CONFIGS[rep % 3:] + CONFIGS[:rep % 3]  # rotate the order between reps
                for config in order:
                    runs.append(measure(workload, config, loaded, args, default_threads))
    if args.demo:
        for loaded in (False, True):
            runs.append(measure("demo", "auto", loaded, args, default_threads))

    def med(workload, config, loaded):
        return statistics.median(r["seconds"] for r in runs
                                 if (r["workload"], r["config"], r["loaded"]) == (workload, config, loaded))

    table, ratios = {}, {}
    print(f"\n{'workload':8} {'condition':9} {'auto s':>8} {'default s':>9} {'one s':>7} {'default/auto':>12} "
          f"{'one/auto':>9}")
    for workload in ("solve", "decode"):
        for loaded in (False, True):
            cond = "loaded" if loaded else "idle"
            t = {cfg: med(workload, cfg, loaded) for cfg in CONFIGS}
            table[f"{workload}_{cond}"] = {k: round(v, 2) for k, v in t.items()}
            ratios[f"{workload}_{cond}_default_vs_auto"] = round(t["default"] / t["auto"], 3)
            ratios[f"{workload}_{cond}_one_vs_auto"] = round(t["one"] / t["auto"], 3)
            print(f"{workload:8} {cond:9} {t['auto']:8.1f} {t['default']:9.1f} {t['one']:7.1f} "
                  f"{t['default'] / t['auto']:12.2f} {t['one'] / t['auto']:9.2f}")
    answers = sorted({str(r["answer"]) for r in runs if "answer" in r})
    result = {
        "loaded_speedup_vs_default": min(ratios["solve_loaded_default_vs_auto"], ratios["decode_loaded_default_vs_auto"]),
        "idle_ratio_vs_default": min(ratios["solve_idle_default_vs_auto"], ratios["decode_idle_default_vs_auto"]),
        **ratios,
        "seconds": table,
        "solve_answers": answers,
        "demo_seconds": {("loaded" if r["loaded"] else "idle"): round(r["seconds"], 1) for r in runs
                         if r["workload"] == "demo"} or None,
        "auto_threads": {f"{r['workload']}_{'loaded' if r['loaded'] else 'idle'}": (r.get("threads") or {}).get("threads")
                         for r in runs if r["config"] == "auto"},
        "torch_default_threads": default_threads,
        "competing_job": COMPETITOR,
        "machine": {"cpus": os.cpu_count(), "load_at_start": load_start, "load_at_end": machine_load(),
                    "third_party_runnable_max": max(r["third_party"] for r in runs),
                    "disturbed_runs": sum(r["third_party"] > args.max_third for r in runs)},
        "paired_idle": paired_idle(args) if args.idle_pairs else None,
        "decode_tokens_per_row": args.tokens,
        "reps": args.reps,
        "bench_seconds": round(time.perf_counter() - started, 1),
        "runs": [{k: v for k, v in r.items() if k != "threads"} | {"threads": (r.get("threads") or {}).get("threads")}
                 for r in runs],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
