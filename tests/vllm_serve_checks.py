"""Checks of steerscale with a real ``vllm serve`` (run in the vLLM venv; ``tests/test_vllm.py`` starts it):

    .venv-vllm/bin/python tests/vllm_serve_checks.py

* ``vllm serve`` with steerscale's plugin (``STEERSCALE_VLLM_VECTORS``), in vLLM's compiled mode: the official
  ``openai`` client's requests steered per request through ``vllm_xargs`` (no ``cache_salt``: the server derives
  it) get the local engine's greedy text; unsteered requests in the same moment stay unsteered.
* Tenant safety: on a fresh server, a plain request after an unsalted steered one for the same long prompt, and a
  steered one after a plain one, equal the local engine's answers (no prefix-cache leak); malformed steer specs and
  steerscale fields vLLM cannot run are answered 400 naming the field, and the server keeps serving.
* A checkpoint baked by ``steerscale bake`` (the vector folded into biases) served by plain ``vllm serve`` gives
  the text the hooked vector gives inside vLLM.
* ``OpenAIBackend`` runs strategies (majority, best-of-N with a verifier, beam search, particle filtering) against
  the real server within their token budgets.
Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MODEL = "smollm2-135m-instruct"


def start_process(cmd: list[str], log: Path, env: dict, timeout: float = 900.0):
    """A server started by ``cmd`` (a free port appended) and waited for until ``/health`` answers."""
    import os
    import subprocess
    import urllib.request

    from steerscale.vllm.server import VllmServer, _free_port

    port = _free_port()
    proc = subprocess.Popen([*cmd, "--port", str(port)], env={**os.environ, **env}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    server = VllmServer(proc, f"http://127.0.0.1:{port}/v1", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:3]} exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(1)
    server.stop()
    raise RuntimeError(f"{cmd[:3]} did not start within {timeout:g} s")


def pause(server) -> list:
    """Suspend a server's processes (resumed with ``.resume()`` on each)."""
    import psutil

    procs = [psutil.Process(server.process.pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        p.suspend()
    return procs


def main() -> None:
    t0 = time.perf_counter()
    import torch
    from openai import OpenAI

    from steerscale import Site, SiteKind, load_model
    from steerscale.scale import Budget, SamplingParams, get_verifier, run_strategy
    from steerscale.scale.remote import OpenAIBackend
    from steerscale.serve.scheduler import Job, Scheduler
    from steerscale.steer.bake import bake
    from steerscale.steer.vector import SteeringVector
    from openai import BadRequestError

    from steerscale.vllm.server import start_vllm
    from vllm_checks import BAD_SPECS

    lm = load_model(MODEL, dtype="float32")
    site = Site(14, SiteKind.RESID_POST)
    d = torch.randn(lm.layout.site_dim(site), generator=torch.Generator().manual_seed(1))
    vec = SteeringVector({site: 32.0 * d / d.norm()}, model_name=MODEL)
    tmp = Path(tempfile.mkdtemp())
    path = vec.save(tmp / "a.safetensors")
    prompts = ["The capital of France is", "My favourite hobby is", "Once upon a time"]
    tokens = 12

    def local(text, scale, ids=None):
        sched = Scheduler(lm.model, lm.tokenizer, lm.layout, max_batch=1)
        job = Job(ids or lm.tokenizer(text)["input_ids"], SamplingParams(max_tokens=tokens, temperature=0.0, step=None),
                  steer=[(vec, scale)] if scale else [])
        fut = sched.submit(job)
        while not fut.done():
            sched.step()
        return lm.tokenizer.decode(fut.result()[0].token_ids, skip_special_tokens=True)

    out = {}
    # vLLM through `steerscale serve --engine vllm` (the CLI users run), beside steerscale's own server: same flags;
    # and plain `vllm serve` of a baked checkpoint. The three start at once (start-up is mostly one core's work);
    # the baked one is paused until its turn, as an idle vLLM engine polls its queue.
    steerscale = str(Path(sys.executable).parent / "steerscale")
    flags = ["-m", MODEL, "--dtype", "float32", "--vector", f"a={path}", "--vector", f"formal={path}",
             "--api-key", "k"]
    baked = tmp / "baked"
    bake(lm.model, lm.layout, vec, 1.0, baked, lm.tokenizer)
    with ThreadPoolExecutor(3) as pool:
        starting = [pool.submit(start_process, [steerscale, "serve", "--engine", "vllm", *flags], tmp / "serve.log",
                                {"VLLM_CPU_CI_ENV": "1"}),
                    pool.submit(start_process, [steerscale, "serve", *flags, "--max-batch", "4"], tmp / "own.log",
                                {"OMP_NUM_THREADS": "1"}),
                    pool.submit(start_vllm, str(baked), name=MODEL, log=tmp / "baked.log", dtype="float32",
                                plugin=False, env={"VLLM_CPU_CI_ENV": "1"})]
        servers = [f.result() for f in starting]
    server, own, baked_server = servers
    paused = pause(baked_server)
    url = server.url
    try:
        client = OpenAI(base_url=url, api_key="k", timeout=120, max_retries=0)
        own_client = OpenAI(base_url=own.url, api_key="k", timeout=120, max_retries=0)

        # the same request body to both servers: steerscale's "steer" field (objects), completions and chat
        same = 0
        bodies = [{"steer": [{"vector": "a", "scale": 1.0}]}, {"steer": [{"vector": "a", "scale": -1.0,
                                                                         "scope": "generated"}]}, {},
                  {"steer": [{"vector": "a", "op": "set", "value": 20.0}, {"vector": "a", "op": "ablate",
                                                                            "scope": "prompt"}]}]
        for body in bodies:
            texts = []
            for c in (client, own_client):
                a = c.completions.create(model=MODEL, prompt=prompts[0], max_tokens=tokens, temperature=0,
                                         extra_body={**body, "ignore_eos": True}).choices[0].text
                b = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompts[1]}],
                                              max_tokens=tokens, temperature=0,
                                              extra_body={**body, "ignore_eos": True}).choices[0].message.content
                texts.append((a, b))
            same += texts[0] == texts[1]
        out["both_servers_same"] = same
        out["both_servers_bodies"] = len(bodies)

        def ask(text, scale, **extra):
            xargs = {"vllm_xargs": {"steer": [f"a:{scale}"]}} if scale else {}
            r = client.completions.create(model=MODEL, prompt=text, max_tokens=tokens, temperature=0,
                                          extra_body={**xargs, **extra, "ignore_eos": True})
            return r.choices[0].text

        # the salt leak, on the fresh server before anything else: long prompts fill whole KV-cache blocks
        long_a, long_b = " ".join(["The history of the city is long and"] * 40), " ".join(["Rivers run to"] * 60)
        ids_a, ids_b = lm.tokenizer(long_a)["input_ids"], lm.tokenizer(long_b)["input_ids"]
        # (scale 4: steering that changes these answers, so a leak would show)
        leaks = [ask(long_a, 4.0) != local(None, 4.0, ids_a), ask(long_a, 0.0) != local(None, 0.0, ids_a),
                 ask(long_b, 0.0) != local(None, 0.0, ids_b), ask(long_b, 4.0) != local(None, 4.0, ids_b),
                 # a client salt cannot reach a steered request's blocks either
                 ask(long_b, 0.0, cache_salt="steerscale-s-guess") != local(None, 0.0, ids_b)]
        out["salt_leaks"] = sum(leaks)
        out["salt_steering_acted"] = (local(None, 4.0, ids_a) != local(None, 0.0, ids_a)
                                      and local(None, 4.0, ids_b) != local(None, 0.0, ids_b))

        cases = [(p, s) for p in prompts for s in (-1.0, 0.0, 1.0)]
        got = [None] * len(cases)
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, ask(*cases[i]))) for i in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        want = [local(p, s) for p, s in cases]
        out["serve_mismatches"] = sum(g != w for g, w in zip(got, want))
        out["serve_cases"] = len(cases)
        out["serve_steering_acted"] = sum(got[i] != got[i + 1] for i in range(0, len(cases), 3))
        # malformed specs (those vllm_xargs can carry: strings, numbers, flat lists) and fields vLLM cannot run:
        # each a 400 naming the field, over both endpoints; the server keeps serving
        bad_cases = [{"steer": b} for b in BAD_SPECS if not isinstance(b, dict)]
        bad_cases += [{"steer": ["a:1"], k: "x"} for k in ("condition", "controller", "logit_contrast", "gate")]
        non_400, unnamed = 0, 0
        for i, xargs in enumerate(bad_cases):
            try:
                if i % 2:
                    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=2, extra_body={"vllm_xargs": xargs})
                else:
                    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"vllm_xargs": xargs})
                non_400 += 1
            except BadRequestError as exc:
                unnamed += "vllm_xargs." not in str(exc)
            except Exception:  # noqa: BLE001 (a 5xx or a dropped connection counts against the server)
                non_400 += 1
        out["bad_specs_sent"] = len(bad_cases)
        out["bad_spec_non_400"] = non_400
        out["bad_spec_unnamed_field"] = unnamed
        out["alive_after_bad_spec"] = ask(prompts[0], 1.0) == got[cases.index((prompts[0], 1.0))]

        # strategies through OpenAIBackend against the real server, each within its budget
        backend = OpenAIBackend(url, MODEL, api_key="k", timeout=120, max_n=16)
        strategies = {}
        for name, verifier, knobs in [("majority", None, {"n": 4}), ("best_of_n", "self_eval", {"n": 4}),
                                      ("beam_search", "self_eval", {"width": 2, "step": "\n", "max_step_tokens": 8}),
                                      ("particle_filter", "self_eval", {"n": 3, "step": "\n", "max_step_tokens": 8})]:
            budget = Budget.of(tokens=200)
            verify = get_verifier(verifier, backend=backend) if verifier else None
            r = run_strategy(name, "Calculate 12 + 7.", backend, verify, budget, seed=0, max_tokens=24, **knobs)
            spent = r.budget["spent"]
            strategies[name] = {"answer": r.answer, "tokens": spent["generated_tokens"] + spent.get(
                "verifier_tokens", 0), "within_budget": spent["generated_tokens"] <= 200 + knobs.get("n", 4)}
        out["strategies"] = strategies
    finally:
        server.stop()
        own.stop()
        for p in paused:
            p.resume()
        if sys.exc_info()[0] is not None:  # the checks failed: the baked server is not reached below
            baked_server.stop()

    # a baked checkpoint under plain vllm serve vs the hooked vector
    server = baked_server
    try:
        client = OpenAI(base_url=server.url, api_key="none", timeout=120, max_retries=0)
        baked_text = [client.completions.create(model=MODEL, prompt=p, max_tokens=tokens, temperature=0,
                                                extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    finally:
        server.stop()
    hooked = [got[cases.index((p, 1.0))] for p in prompts]
    out["baked_mismatches"] = sum(a != b for a, b in zip(baked_text, hooked))
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
