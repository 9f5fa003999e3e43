"""Checks of steerscale with a real ``vllm serve`` (run in the vLLM venv; ``tests/test_vllm.py`` starts it):

    .venv-vllm/bin/python tests/vllm_serve_checks.py

* ``vllm serve`` with steerscale's plugin (``STEERSCALE_VLLM_VECTORS``): the official ``openai`` client's requests
  steered per request through ``vllm_xargs`` (with the ``cache_salt`` steerscale derives) get the local engine's
  greedy text; unsteered requests in the same moment stay unsteered.
* A checkpoint baked by ``steerscale bake`` (the vector folded into biases) served by plain ``vllm serve`` gives
  the text the hooked vector gives inside vLLM.
* ``OpenAIBackend`` runs strategies (majority, best-of-N with a verifier, beam search, particle filtering) against
  the real server within their token budgets.
Prints one JSON line.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"


def main() -> None:
    t0 = time.perf_counter()
    import torch
    from openai import OpenAI

    from steerscale import Site, SiteKind, load_model
    from steerscale.models.loading import checkpoint_dir
    from steerscale.scale import Budget, SamplingParams, get_verifier, run_strategy
    from steerscale.scale.remote import OpenAIBackend
    from steerscale.serve.scheduler import Job, Scheduler
    from steerscale.steer.bake import bake
    from steerscale.steer.vector import SteeringVector
    from steerscale.vllm import cache_salt, format_steer
    from steerscale.vllm.server import start_vllm

    lm = load_model(MODEL, dtype="float32")
    site = Site(14, SiteKind.RESID_POST)
    d = torch.randn(lm.layout.site_dim(site), generator=torch.Generator().manual_seed(1))
    vec = SteeringVector({site: 32.0 * d / d.norm()}, model_name=MODEL)
    tmp = Path(tempfile.mkdtemp())
    path = vec.save(tmp / "a.safetensors")
    prompts = ["The capital of France is", "My favourite hobby is", "Once upon a time"]
    tokens = 12

    def local(text, scale):
        sched = Scheduler(lm.model, lm.tokenizer, lm.layout, max_batch=1)
        job = Job(lm.tokenizer(text)["input_ids"], SamplingParams(max_tokens=tokens, temperature=0.0, step=None),
                  steer=[(vec, scale)] if scale else [])
        fut = sched.submit(job)
        while not fut.done():
            sched.step()
        return lm.tokenizer.decode(fut.result()[0].token_ids, skip_special_tokens=True)

    out = {}
    server = start_vllm(checkpoint_dir(MODEL), name=MODEL, log=tmp / "serve.log", vectors={"a": path})
    url = server.url
    try:
        client = OpenAI(base_url=url, api_key="none", timeout=120, max_retries=0)

        def ask(text, scale):
            steer = [f"a:{scale}"] if scale else []
            extra = {"vllm_xargs": {"steer": format_steer(steer)}, "cache_salt": cache_salt(steer)} if steer else {}
            r = client.completions.create(model=MODEL, prompt=text, max_tokens=tokens, temperature=0,
                                          extra_body={**extra, "ignore_eos": True})
            return r.choices[0].text

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
        # a spec the worker cannot run (unknown vector) must not take the engine down: unsteered, logged
        bad = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=tokens, temperature=0, extra_body={
            "vllm_xargs": {"steer": ["nope:1"]}, "cache_salt": "bad-spec", "ignore_eos": True}).choices[0].text
        out["bad_spec_unsteered"] = bad == got[cases.index((prompts[0], 0.0))]
        out["alive_after_bad_spec"] = ask(prompts[0], 1.0) == got[cases.index((prompts[0], 1.0))]

        # strategies through OpenAIBackend against the real server, each within its budget
        backend = OpenAIBackend(url, MODEL, timeout=120, max_n=16)
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

    # a baked checkpoint under plain vllm serve vs the hooked vector
    baked = tmp / "baked"
    bake(lm.model, lm.layout, vec, 1.0, baked, lm.tokenizer)
    server = start_vllm(str(baked), name=MODEL, log=tmp / "baked.log")
    url = server.url
    try:
        client = OpenAI(base_url=url, api_key="none", timeout=120, max_retries=0)
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
