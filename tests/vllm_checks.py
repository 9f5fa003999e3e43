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


# Malformed steering as a client sends it: each must be refused before any worker sees it (400 over HTTP).
BAD_SPECS = ["formal", "formal:abc", "nosuch:4", "formal:4:sometimes", "formal:1e9", "formal:nan", "formal:inf",
             "formal:-inf", "formal:=1e9", "formal:=x", "formal:4:", ":4", "formal:4:all:extra", "for mal:4",
             "formal/x:4", "a" * 129 + ":1", "formal:", "formal:ablate:nowhere", "formal::all", "formal:True",
             "formal:0x10", ["formal:4", 3], {"formal": 4}, 4, ["formal:abc"]]

# tiny random checkpoints of the families vLLM serves (head size 64: what vLLM's CPU attention kernels take)
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 64}),
    "gemma": ("GemmaConfig", {"head_dim": 64}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 64, "sliding_window": 64, "query_pre_attn_scalar": 64}),
}


def top2_margin(model, layout, vector, scale, ids, prefix) -> float:
    """The local engine's top-2 logit margin after ``ids + prefix`` under ``vector`` at ``scale``."""
    import torch

    from steerscale.engine.runtime import intervene

    edits = vector.interventions(scale) if scale else []
    with torch.no_grad(), intervene(layout, edits, prompt_width=len(ids)):
        logits = model(input_ids=torch.tensor([list(ids) + list(prefix)])).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def differences(cases, got, want, model, layout, vectors, prompts) -> list[dict]:
    """Each case whose vLLM tokens differ from the local ones, with the local top-2 margin at the first difference."""
    out = []
    for (i, name, scale), g, w in zip(cases, got, want):
        if g[: len(w)] != w[: len(g)]:  # vLLM ignores EOS; the local run stops at it
            k = next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            out.append({"prompt": i, "vector": name, "scale": scale, "first_difference": k, "vllm": g, "local": w,
                        "margin": top2_margin(model, layout, vectors[name], scale, prompts[i], w[:k])})
    return out


def full_forward_greedy(lm, vectors, ids, spec, tokens) -> list[int]:
    """Greedy tokens of the local engine under ``spec`` (adds, ablations, set projections, in order), one full
    forward pass per token (no cache): the reference for projection edits."""
    import torch

    from steerscale.engine.ops import SetProjection
    from steerscale.engine.runtime import Intervention, intervene
    from steerscale.vllm import parse_steer

    edits = []
    for name, op, scope in parse_steer(spec):
        if isinstance(op, tuple):
            edits += [Intervention(site, SetProjection(d, op[1]), scope) for site, d in vectors[name].directions.items()]
        else:
            edits += vectors[name].interventions(op, scope)
    out = []
    for _ in range(tokens):
        with torch.no_grad(), intervene(lm.layout, edits, prompt_width=len(ids)):
            logits = lm.model(input_ids=torch.tensor([list(ids) + out])).logits[0, -1]
        out.append(int(logits.argmax()))
        if out[-1] in (lm.tokenizer.eos_token_id,):
            break
    return out


def family_checks(family: str, tokens: int, eager: bool = False, tp: int = 1) -> dict:
    """A tiny random ``family`` checkpoint: steered greedy tokens in vLLM (one batch) vs the local engine."""
    import tempfile

    import torch
    import transformers
    from vllm import SamplingParams

    from steerscale import Site, SiteKind
    from steerscale.models.layout import find_layout
    from steerscale.scale import SamplingParams as LocalParams
    from steerscale.serve.scheduler import Job, Scheduler
    from steerscale.steer.vector import SteeringVector
    from steerscale.vllm import SteeredLLM
    from tiny import TinyTokenizer

    cls, extra = FAMILY_CONFIGS[family]
    if tp > 1:  # vLLM's CPU build runs one worker per core only when each is bound to its own
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(c) for c in range(tp)))
    config = getattr(transformers, cls)(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    if not config.tie_word_embeddings:  # random weights give near-flat logits: sharpen them (tied: the input too)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(20.0)
    directory = tempfile.mkdtemp(prefix=f"tiny-{family}-")
    model.save_pretrained(directory)
    layout = find_layout(model)
    prompts = [[1, 17, 99, 203, 45], [1, 300, 12, 7], [1, 64, 65, 66, 67, 68, 69]]
    with torch.no_grad():  # the vectors' size: 8x the residual stream's, so every family's answers move
        norm = float(model(input_ids=torch.tensor([prompts[0]]), output_hidden_states=True).hidden_states[1]
                     .norm(dim=-1).mean())
    g = torch.Generator().manual_seed(2)
    vectors = {}
    sites = {  # every hook kind of the vLLM path: block output and input, MLP output, one head
        "a": [Site(0, SiteKind.RESID_POST), Site(1, SiteKind.RESID_PRE)],
        "b": [Site(1, SiteKind.MLP_OUT), Site(0, SiteKind.HEAD_OUT, head=1), Site(1, SiteKind.HEAD_OUT, head=3)]}
    for name, group in sites.items():
        directions = {}
        for site in group:
            d = torch.randn(layout.site_dim(site), generator=g)
            directions[site] = 8.0 * norm * d / d.norm()
        vectors[name] = SteeringVector(directions)
    tok = TinyTokenizer(512)
    tok.eos_token_id = config.eos_token_id
    cases = [(i, name, scale) for i in range(len(prompts)) for name in vectors for scale in (-1.0, 0.0, 1.0)]
    want = []
    for i, name, scale in cases:
        sched = Scheduler(model, tok, layout, max_batch=1)
        fut = sched.submit(Job(prompts[i], LocalParams(max_tokens=tokens, temperature=0.0, step=None),
                               steer=[(vectors[name], scale)] if scale else []))
        while not fut.done():
            sched.step()
        want.append(fut.result()[0].token_ids)
    llm = SteeredLLM(directory, vectors=vectors, max_model_len=128, skip_tokenizer_init=True, max_num_seqs=32,
                     dtype="float32", enforce_eager=eager, tensor_parallel_size=tp)
    got = [list(o.outputs[0].token_ids) for o in llm.generate(
        [{"prompt_token_ids": prompts[i]} for i, _, _ in cases],
        SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, detokenize=False),
        steer=[[f"{n}:{s}"] if s else None for _, n, s in cases])]
    report = differences(cases, got, want, model, layout, vectors, prompts)
    acted = sum(got[k] != got[k + 1] for k in range(0, len(cases), 3))
    # a vector the workers refuse (a site the model lacks) is answered by every rank: the next call is not stale
    bad = SteeringVector({Site(7, SiteKind.RESID_POST): torch.ones(config.hidden_size)})
    try:
        llm.register("bad", bad)
        refused = False
    except Exception as exc:  # noqa: BLE001 (any failure mode is reported)
        refused = "layer" in str(exc)
    info = llm.info()
    return {"family": family, "architecture": info["architecture"], "cases": len(cases), "tensor_parallel": tp,
            "refusal_then_info_ok": refused and info["tensor_parallel"] == tp, "compiled": info["compiled"],
            "plan": info["plan"],
            "mismatches": sum(1 for r in report if r["margin"] >= 1e-4), "token_differences": report,
            "steering_acted": acted}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--eager", action="store_true", help="vLLM's eager mode (default: its compiled mode)")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel size (family checks; 2 binds a worker per core)")
    ap.add_argument("--family", choices=sorted(FAMILY_CONFIGS), default=None,
                    help="check a tiny random checkpoint of this family instead of SmolLM2")
    args = ap.parse_args()
    if args.family:
        print(json.dumps(family_checks(args.family, args.tokens, args.eager, args.tp)))
        return
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
    # a norm-preserving vector (GrAInS writes them): the stream keeps its norm after the edit
    vectors["n"] = SteeringVector(dict(vectors["a"].directions), model_name=args.model,
                                  metadata={"preserve_norm": True})
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

    t_local = time.perf_counter()
    want = [local(prompts[i], name, scale) for i, name, scale in cases]
    t_local = time.perf_counter() - t_local

    t_start = time.perf_counter()
    llm = SteeredLLM(args.model, vectors=vectors, max_model_len=256, max_num_seqs=32, max_num_batched_tokens=64,
                     enable_prefix_caching=True, seed=0, dtype="float32", enforce_eager=args.eager)
    t_start = time.perf_counter() - t_start
    greedy = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    steer_of = [[f"{name}:{scale}"] if scale else None for _, name, scale in cases]
    reqs = [{"prompt_token_ids": list(prompts[i])} for i, _, _ in cases]

    t_gen = time.perf_counter()
    batched = [list(o.outputs[0].token_ids) for o in llm.generate(reqs, greedy, steer=steer_of)]
    t_gen = time.perf_counter() - t_gen
    report = differences(cases, batched, want, lm.model, lm.layout, vectors, prompts)
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
    # projection edits (Ablate, SetProjection), alone and in order with an addition, against a full-forward local run
    projection = []
    for spec in (["a:ablate"], ["b:=20.0"], ["a:ablate", "a:1.0"], ["b:1.0", "b:=-20.0:generated"]):
        for i in range(2):
            got = list(llm.generate({"prompt_token_ids": list(prompts[i])}, greedy, steer=spec).outputs[0].token_ids)
            ref = full_forward_greedy(lm, vectors, prompts[i], spec, args.tokens)
            projection.append({"spec": spec, "prompt": i, "same": got[: len(ref)] == ref[: len(got)],
                               "changed": got != batched[cases.index((i, spec[0][0], 0.0))]})
    # norm-preserving steering, batched with plain requests, against the local scheduler
    # (strong enough that rescaling the stream changes the answer: compared with the plain add of the same vector)
    norm_cases = [(i, "n", scale) for i in range(len(prompts)) for scale in (4.0, -4.0)]
    norm_reqs = [reqs[cases.index((i, "a", 0.0))] for i, _, _ in norm_cases]
    norm_got = [list(o.outputs[0].token_ids) for o in llm.generate(
        norm_reqs + [reqs[0]], greedy, steer=[[f"n:{s}"] for _, _, s in norm_cases] + [None])]
    plain_add = [list(o.outputs[0].token_ids) for o in llm.generate(
        norm_reqs, greedy, steer=[[f"a:{s}"] for _, _, s in norm_cases])]
    norm_report = differences(norm_cases, norm_got[:-1], [local(prompts[i], n, s) for i, n, s in norm_cases],
                              lm.model, lm.layout, vectors, prompts)
    norm_mismatches = sum(1 for r in norm_report if r["margin"] >= 1e-4)
    norm_acted = sum(g != a for g, a in zip(norm_got, plain_add))
    # the offline front end refuses what the workers cannot run, before any worker sees it
    from vllm.exceptions import VLLMValidationError

    front_refusals = 0
    for xargs in [{"steer": ["a:nan"]}, {"steer": ["a:1"], "condition": "x"}, {"steer": ["nope:1"]}]:
        try:
            llm.llm.generate([reqs[0]], SamplingParams(max_tokens=2, extra_args=xargs), use_tqdm=False)
        except VLLMValidationError as exc:
            front_refusals += "vllm_xargs." in str(exc)
    # engine-wide steering: every request gets it, then it is lifted
    llm.set_steering(["a:1.0"])
    engine_wide = list(llm.generate(reqs[0], greedy).outputs[0].token_ids)
    llm.set_steering(None)
    lifted = list(llm.generate(reqs[0], greedy).outputs[0].token_ids)
    engine_wide_ok = (engine_wide == batched[cases.index((0, "a", 1.0))]
                      and lifted == batched[cases.index((0, "a", 0.0))])
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
        "unknown_vector_refused": unknown_refused, "engine_wide_ok": engine_wide_ok,
        "projection_mismatches": sum(not p["same"] for p in projection),
        "projection_changed": sum(p["changed"] for p in projection), "projection": projection, "steering_changed_outputs": effect,
        "norm_preserving_mismatches": norm_mismatches, "norm_preserving_acted": norm_acted,
        "norm_preserving_differences": norm_report, "front_end_refusals": front_refusals,
        "info": llm.info(), "local_s": round(t_local, 1), "vllm_start_s": round(t_start, 1),
        "vllm_batch_s": round(t_gen, 2), "wall_s": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
