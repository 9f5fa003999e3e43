"""Every engine decodes by the one core (issue 24): the same steered request gives the same tokens through
``generate``, ``LocalBackend`` (strategies) and the server's ``Scheduler`` (alone and in a mixed batch), greedy in
float32, on tiny llama, qwen2 and gemma3 models and on the real SmolLM2. Where two engines differ, the first
differing token must be a near tie (top-2 log-probs within ``MARGIN``): batch shapes change float rounding.
``tests/test_vllm.py`` checks the vLLM worker against the local engine for what runs there."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from steerscale import Site
from steerscale.engine.decoding import SamplingParams, score_tokens
from steerscale.engine.generation import generate
from steerscale.engine.logit_contrast import LogitContrast
from steerscale.engine.plan import FeatureClamp
from steerscale.engine.runtime import Observer, observe
from steerscale.engine.token_gates import TokenGate
from steerscale.scale import Budget, LocalBackend
from steerscale.serve.scheduler import Job, Scheduler
from steerscale.steer.conditional import Condition, ConditionalSteering
from steerscale.steer.vector import SteeringVector
from served import random_controller
from tiny import CharTokenizer, tiny_model

MARGIN = 1e-3
TOKENS = 10


def _vectors(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = layout.site_dim(Site(0))
    a = SteeringVector({Site(0): torch.randn(dim, generator=g) * 2})
    b = SteeringVector({Site(1): torch.randn(dim, generator=g) * 2})
    kept = SteeringVector({Site(1): torch.randn(dim, generator=g) * 2}, metadata={"preserve_norm": True})
    # an SAE-like feature to clamp (engine.plan.FeatureClamp), every token under its norm cap
    clamp = FeatureClamp(Site(1), torch.randn(dim, generator=g) / dim ** 0.5, 0.1, 0.0,
                         torch.randn(dim, generator=g), 1e4, "feature")
    return a, b, kept, clamp


def _condition(layout, threshold: float) -> Condition:
    """A CAST condition on block 0 whose decision is fixed by ``threshold`` (cosine similarity is in [-1, 1])."""
    dim = layout.site_dim(Site(0))
    return Condition(Site(0), torch.ones(dim), torch.zeros(dim), threshold)


def requests(layout):
    """(name, steer entries as the scheduler takes them, logit contrast): plain, +/- scales, two vectors, the
    scopes, ablate, set, a norm-preserving vector, a clamped feature, a CAST decision each way, a learned controller,
    logit contrast."""
    a, b, kept, clamp = _vectors(layout)
    yes = ConditionalSteering(b, [_condition(layout, -2.0)], scale=1.5)  # always holds
    no = ConditionalSteering(b, [_condition(layout, 2.0)], scale=1.5)  # never holds
    return [
        ("plain", [], None),
        ("plus", [(a, 2.0, "all")], None),
        ("minus", [(a, -2.0, "all")], None),
        ("two vectors", [(a, 1.0, "all"), (b, -1.5, "all")], None),
        ("generated scope", [(b, 2.0, "generated")], None),
        ("prompt scope", [(b, 2.0, "prompt")], None),
        ("ablate", [(a, ("set", 0.0), "all")], None),
        ("set", [(b, ("set", 12.0), "all")], None),
        ("norm-preserving", [(kept, 3.0, "all")], None),
        ("clamp", [(clamp, ("clamp", 4.0), "all")], None),
        ("CAST holds", [yes], None),
        ("CAST does not hold", [no], None),
        ("controller", [random_controller(layout, b)], None),
        ("logit contrast", [(a, 1.0, "all")], LogitContrast.parse("dola:high")),
    ]


def mid_generation_gate(model, layout, prompt_ids, plain_ids) -> tuple[TokenGate, int]:
    """A token gate on block 0 that fires partway through ``plain_ids`` (what the request generates before its gate
    fires), and the real index it fires at: a probe (each position's state less the mean of those before it, or a
    random direction) whose reading at some generated position beats every earlier reading by the widest relative
    gap, its threshold half-way across (float rounding between engines, about 1e-6, cannot move the trigger)."""
    seen = []
    with observe(layout, [Observer(Site(0), lambda h: seen.append(h[0].float()))]), torch.no_grad():
        model(input_ids=torch.tensor([list(prompt_ids) + list(plain_ids)]))
    h, n = seen[0][len(prompt_ids) - 1:], len(prompt_ids)  # the last prompt token onwards, as a gate reads
    probes = [h[t] - h[:t].mean(0) for t in range(2, len(h) - 3)]
    probes += [torch.randn(h.shape[-1], generator=torch.Generator().manual_seed(seed)) for seed in range(16)]
    best = None
    for w in probes:
        reading = h @ w
        for t in range(2, len(reading) - 3):  # fires after a few tokens, with some left to steer
            gap = float(reading[t] - reading[:t].max()) / float(reading.abs().max())
            if best is None or gap > best[0]:
                best = (gap, w, float(reading[t] + reading[:t].max()) / 2, n - 1 + t)
    gap, w, middle, at = best
    assert gap > 1e-3, f"no probe fires mid-generation on this model (widest relative gap {gap})"
    return TokenGate(Site(0), w, bias=-middle), at


def gate_requests(model, tok, layout, prompt, prompt_ids, tokens):
    """Token-gated requests: a gated vector alone, and beside an ungated one. Each gate fires partway through what
    the request's ungated edits generate (``mid_generation_gate``)."""
    _, b, kept, _ = _vectors(layout)
    out = []
    for name, ungated, gated in (("token gate", [], (b, 3.0, "all")),
                                 ("gate and vector", [(kept, 2.0, "all")], (b, -3.0, "generated"))):
        ivs = [iv for vector, op, scope in ungated for iv in vector.interventions(op, scope)]
        before = generate(model, tok, layout, [prompt], ivs, max_new_tokens=tokens, chat=False)[0].token_ids
        gate, _ = mid_generation_gate(model, layout, prompt_ids, before)
        out.append((name, [*ungated, (*gated, gate)], None))
    return out


def _split(entries):
    ivs = []
    for e in entries:
        if isinstance(e, tuple):
            gate = e[3] if len(e) > 3 else None
            ivs += [dataclasses.replace(iv, gate=gate) for iv in e[0].interventions(e[1], e[2])]
    return ivs, [e for e in entries if not isinstance(e, tuple)]


def _strip(ids, eos):
    ids = list(ids)
    while ids and ids[-1] in eos:
        ids.pop()
    return ids


def _check_same(model, layout, prompt_ids, entries, contrast, want, got, what):
    """``got`` equals ``want``, or first differs where the steered distribution nearly ties."""
    if got == want:
        return
    k = next((i for i, (x, y) in enumerate(zip(want, got)) if x != y), min(len(want), len(got)))
    ivs, rules = _split(entries)
    assert not rules or k < min(len(want), len(got)), f"{what}: lengths differ"
    _, tops = score_tokens(model, layout, prompt_ids + want[:k] + [0], ivs, k=2, prompt_width=len(prompt_ids),
                           logit_contrast=contrast)
    (_, first), (_, second) = tops[len(prompt_ids) - 1 + k]
    assert first - second < MARGIN, f"{what}: token {k} differs ({want} vs {got}) with a margin of {first - second}"


def _agree(model, tok, layout, prompt, prompt_ids, only=None, tokens=TOKENS):
    eos = {tok.eos_token_id, tok.pad_token_id}
    greedy = SamplingParams(max_tokens=tokens, temperature=0.0, step=None)
    reqs = [r for r in requests(layout) + gate_requests(model, tok, layout, prompt, prompt_ids, tokens)
            if only is None or r[0] in only]
    # the scheduler, all requests in one mixed batch
    sched = Scheduler(model, tok, layout, max_batch=len(reqs))
    futures = [sched.submit(Job(list(prompt_ids), greedy, steer=entries, logit_contrast=contrast))
               for _, entries, contrast in reqs]
    while not all(f.done() for f in futures):
        sched.step()
    sched.stop()
    plain = None
    for (name, entries, contrast), future in zip(reqs, futures):
        ivs, rules = _split(entries)
        local = LocalBackend(model, tok, layout, steering=ivs, rules=rules, chat=False, logit_contrast=contrast)
        want = _strip(local.sample(prompt, 1, greedy, Budget())[0].token_ids, eos)
        generation = generate(model, tok, layout, [prompt], ivs, max_new_tokens=tokens, chat=False, rules=rules,
                              logit_contrast=contrast)[0]
        gen = generation.token_ids
        if "gate" in name:  # the gate switched its vector on partway through the generation
            start = generation.extra["gate_from"]
            assert start is not None and 0 < start < len(gen), f"{name}: the gate fired at {start}"
        batched = _strip(future.result()[0].token_ids, eos)
        _check_same(model, layout, prompt_ids, entries, contrast, want, _strip(gen, eos), f"{name}: generate")
        _check_same(model, layout, prompt_ids, entries, contrast, want, batched, f"{name}: scheduler batch")
        # the steering acted: every request that steers leaves the plain tokens (strong vectors may agree with
        # each other); the CAST condition that never holds leaves them as they were
        plain = want if name == "plain" else plain
        if plain is not None and name != "plain":
            assert (want == plain) is (name == "CAST does not hold"), f"{name}: {want} vs plain {plain}"


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_engines_agree_on_tiny_models(family):
    model, layout = tiny_model(family)
    tok = CharTokenizer()
    prompt = "The quick brown fox"
    _agree(model, tok, layout, prompt, tok.encode(prompt))


def test_engines_agree_on_smollm2():
    from steerscale.models.loading import load_model

    model, tok, layout = load_model("smollm2-135m-instruct", dtype="float32")
    prompt = "Tell me about the sea."
    ids = LocalBackend(model, tok, layout, chat=False).prompt_ids(prompt)
    # the real model, on the requests that exercise different code (the tiny models run them all)
    _agree(model, tok, layout, prompt, ids, only={"plain", "plus", "set", "norm-preserving", "clamp", "CAST holds", "token gate",
                                                  "logit contrast"}, tokens=6)
