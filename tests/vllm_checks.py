"""Checks of steerscale's steering inside real vLLM, run in the vLLM venv (``tests/test_vllm.py`` starts it):

    .venv-vllm/bin/python tests/vllm_checks.py [--quick]

* equivalence: prompts x scales {-1, 0, +1} x two sites (a block's output, an attention output), all in one vLLM
  batch, greedy, float32, against steerscale's local engine on the same token ids. Where a token differs, the
  local top-2 logit margin at the first difference is reported (vLLM's kernels may round differently only where
  the two best tokens are within 1e-4).
* isolation: the same requests one at a time through vLLM equal the batched ones; a prompt first served unsteered
  (so its prefix is cached) and then steered gets the steered answer, not the cached one.
* bad setup: an unknown vector is refused before anything runs.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()

    import torch
    from vllm import SamplingParams

    from steerscale import Site, SiteKind, SteerscaleError, load_model
    from steerscale.scale import SamplingParams as LocalParams
    from steerscale.serve.scheduler import Job, Scheduler
    from steerscale.steer.vector import SteeringVector
    from steerscale.vllm import SteeredLLM

    torch.manual_seed(0)
    lm = load_model(args.model, dtype="float32")
    sites = {"a": Site(14, SiteKind.RESID_POST), "b": Site(8, SiteKind.ATTN_OUT)}
    g = torch.Generator().manual_seed(1)
    vectors = {}
    for name, site in sites.items():
        d = torch.randn(lm.layout.site_dim(site), generator=g)
        vectors[name] = SteeringVector({site: 32.0 * d / d.norm()}, model_name=args.model)
    texts = ["The capital of France is", "My favourite hobby is", "Once upon a time"][: 2 if args.quick else 3]
    prompts = [lm.tokenizer(t)["input_ids"] for t in texts]
    cases = [(i, name, scale) for i in range(len(prompts)) for name in sites for scale in (-1.0, 0.0, 1.0)]

    def local(ids, name, scale):
        sched = Scheduler(lm.model, lm.tokenizer, lm.layout, max_batch=1)
        job = Job(list(ids), LocalParams(max_tokens=args.tokens, temperature=0.0, step=None),
                  steer=[(vectors[name], scale)] if scale else [])
        fut = sched.submit(job)
        while not fut.done():
            sched.step()
        return fut.result()[0].token_ids

    def margin(ids, name, scale, prefix):
        from steerscale.engine.runtime import intervene

        edits = vectors[name].interventions(scale) if scale else []
        with torch.no_grad(), intervene(lm.layout, edits, prompt_width=len(ids)):
            logits = lm.model(input_ids=torch.tensor([list(ids) + list(prefix)])).logits[0, -1].float()
        top = logits.topk(2).values
        return float(top[0] - top[1])

    t_local = time.perf_counter()
    want = [local(prompts[i], name, scale) for i, name, scale in cases]
    t_local = time.perf_counter() - t_local

    t_start = time.perf_counter()
    llm = SteeredLLM(args.model, vectors=vectors, max_model_len=256, max_num_seqs=32, max_num_batched_tokens=64,
                     enable_prefix_caching=True, seed=0)
    t_start = time.perf_counter() - t_start
    greedy = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    steer_of = [[f"{name}:{scale}"] if scale else None for _, name, scale in cases]
    reqs = [{"prompt_token_ids": list(prompts[i])} for i, _, _ in cases]

    t_gen = time.perf_counter()
    batched = [list(o.outputs[0].token_ids) for o in llm.generate(reqs, greedy, steer=steer_of)]
    t_gen = time.perf_counter() - t_gen
    report = []
    for (i, name, scale), got, ref in zip(cases, batched, want):
        if got != ref[: len(got)]:
            k = next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
            report.append({"prompt": i, "vector": name, "scale": scale, "first_difference": k,
                           "margin": margin(prompts[i], name, scale, ref[:k])})
    equivalence = sum(1 for r in report if r["margin"] >= 1e-4)

    alone = [list(llm.generate(r, greedy, steer=s).outputs[0].token_ids) for r, s in zip(reqs, steer_of)]
    isolation = sum(a != b for a, b in zip(alone, batched))
    # the prefix cache: unsteered first (its KV cached), then steered: the steered answer, not the cached one
    cached = []
    for i, name, scale in [(0, "a", 4.0), (1, "b", -4.0)]:
        ids = {"prompt_token_ids": list(prompts[i]) * 9}  # long enough for whole 128-token cache blocks
        plain = list(llm.generate(ids, greedy).outputs[0].token_ids)
        steered = list(llm.generate(ids, greedy, steer=[f"{name}:{scale}"]).outputs[0].token_ids)
        again = list(llm.generate(ids, greedy).outputs[0].token_ids)
        cached.append({"steered_as_local": steered == local(ids["prompt_token_ids"], name, scale),
                       "plain_unchanged": again == plain, "steering_acted": steered != plain})
    try:
        llm.generate(reqs[0], greedy, steer=["nope:1"])
        unknown_refused = False
    except SteerscaleError as exc:
        unknown_refused = "unknown steering vector" in str(exc)
    effect = sum(batched[cases.index((i, n, 1.0))] != batched[cases.index((i, n, 0.0))]
                 for i in range(len(prompts)) for n in sites)
    print(json.dumps({
        "cases": len(cases), "tokens": args.tokens, "equivalence_mismatches": equivalence,
        "token_differences": report, "isolation_mismatches": isolation,
        "prefix_cache_ok": all(all(c.values()) for c in cached), "prefix_cache": cached,
        "unknown_vector_refused": unknown_refused, "steering_changed_outputs": effect,
        "info": llm.info(), "local_s": round(t_local, 1), "vllm_start_s": round(t_start, 1),
        "vllm_batch_s": round(t_gen, 2), "wall_s": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
