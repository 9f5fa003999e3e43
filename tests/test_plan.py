"""The steering plan (``engine.plan``): tables and a per-token index give each token exactly the edit that request's
entries give it alone through ``engine.ops`` (add, set, ablate, norm-preserving), in order, by token class; padding
and unsteered rows are untouched. The scheduler and the vLLM worker both run this code."""

import pytest
import torch

from steerscale import Site, SteerscaleError
from steerscale.engine.ops import Add, SetProjection, apply_edit
from steerscale.engine.plan import SteeringPlan, build_tables, request_slots, token_index
from steerscale.steer.vector import SteeringVector

SITE = Site(0)


def _vec(seed, keep=False):
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({SITE: torch.randn(8, generator=g)}, metadata={"preserve_norm": True} if keep else {})


def _alone(h, entries, cls):
    """What the ordinary edits do to one token of class ``cls`` (0 early prompt, 1 last prompt, 2 generated)."""
    applies = {"all": (1, 1, 1), "prompt": (1, 1, 0), "generated": (0, 1, 1)}
    for vector, op, scope in entries:
        if not applies[scope][cls]:
            continue
        d = vector.directions[SITE]
        edit = SetProjection(d, op[1], preserve_norm=vector.preserve_norm) if isinstance(op, tuple) else \
            Add(d, op, preserve_norm=vector.preserve_norm)
        h = apply_edit(edit, h)
    return h


def test_the_plan_gives_each_token_its_requests_edits_in_order():
    a, b, kept = _vec(0), _vec(1), _vec(2, keep=True)
    requests = [
        [(a, 2.0, "all")],
        [(a, -1.0, "prompt"), (b, ("set", 1.5), "all")],
        [(b, ("set", 0.0), "generated"), (a, 0.5, "all")],
        [(kept, 3.0, "all")],
        [(kept, ("set", -2.0), "all"), (a, 1.0, "generated")],
    ]
    tables = build_tables([request_slots(r) for r in requests])
    # one packed pass, vLLM-style: every request's 4-token prompt, then one generated token each; plus an
    # unsteered request (slot -1) and a padding token (slot -1)
    prompt_len = 4
    slot, pos, plen, want_cls, owner = [], [], [], [], []
    for k in range(len(requests)):
        for p in range(prompt_len + 1):
            slot.append(k), pos.append(p), plen.append(prompt_len), owner.append(k)
            want_cls.append(0 if p < prompt_len - 1 else 1 if p == prompt_len - 1 else 2)
    slot += [-1, -1]
    pos += [0, 3]
    plen += [4, 4]
    owner += [None, None]
    want_cls += [0, 1]
    index = token_index(torch.tensor(slot), torch.tensor(pos), torch.tensor(plen))
    h = torch.randn(len(slot), 8, generator=torch.Generator().manual_seed(9))
    out = SteeringPlan(tables, index).edit(SITE, h)
    for t in range(len(slot)):
        want = h[t] if owner[t] is None else _alone(h[t:t + 1], requests[owner[t]], want_cls[t])[0]
        torch.testing.assert_close(out[t], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[-2:], h[-2:])  # unsteered and padding tokens: exactly as they were


def test_the_plan_runs_batched_rows_and_a_residual_stream():
    # (rows, tokens, width) as a local model passes it; vLLM passes the residual separately: x + extra is the stream
    a = _vec(3)
    tables = build_tables([request_slots([(a, ("set", 1.0), "all")])])
    index = torch.tensor([[1, 1, 2], [0, 0, 0]])
    x, extra = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    plan = SteeringPlan(tables, index)
    together = plan.edit(SITE, x, extra) + extra
    u = a.directions[SITE] / a.directions[SITE].norm()
    torch.testing.assert_close((together[0] * u).sum(-1), torch.ones(3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[1], x[1] + extra[1])


def test_the_static_plan_equals_the_plan_in_fixed_buffers():
    """``StaticPlan`` (buffers written in place, every stage run on every pass: what CUDA graphs replay) gives the
    edits of ``SteeringPlan`` for a batch of mixed requests, with and without a separate residual (vLLM's layers),
    and a second batch written into the same buffers leaves nothing of the first."""
    from steerscale.engine.plan import FeatureClamp, StaticPlan

    g = torch.Generator().manual_seed(0)
    w = 16
    site, other = Site(1), Site(2)

    def vec(*sites, keep=False):
        return SteeringVector({s: torch.randn(w, generator=g) for s in sites},
                              metadata={"preserve_norm": True} if keep else {})

    a, b, kept = vec(site, other), vec(site), vec(site, keep=True)
    clamp = FeatureClamp(site, torch.randn(w, generator=g) / 4, 0.2, 0.1, torch.randn(w, generator=g), 30.0, "f#1")
    batches = [
        [[(a, 1.5, "all"), (b, ("set", 2.0), "generated")], [], [(kept, 2.0, "prompt"), (clamp, ("clamp", 3.0), "all")],
         [(b, ("set", 0.0), "all"), (a, -1.0, "generated"), (kept, ("set", 1.0), "all")]],
        [[(b, 0.5, "all")], [(a, 2.0, "prompt")]],
    ]
    static = StaticPlan({site: w, other: w}, requests=4, stages=3, directions=16, tokens=64)
    for requests in batches:
        n_req, length = len(requests), 6
        x, extra = torch.randn(n_req * length, w, generator=g) * 3, torch.randn(n_req * length, w, generator=g)
        x[min(2 * length, len(x) - 1)] *= 10  # past the clamp's cap (the third request clamps)
        slot = torch.tensor([-1 if not r else sum(1 for q in requests[:i] if q) for i, r in enumerate(requests)])
        tok_req = torch.arange(n_req).repeat_interleave(length)
        positions = torch.arange(length).repeat(n_req)
        index = token_index(slot[tok_req], positions, torch.full((n_req * length,), 4))
        steered = [r for r in requests if r]
        dynamic = SteeringPlan(build_tables([request_slots(r) for r in steered]), index)
        static.load([static.request_stages(r) for r in steered], index)
        for s in (site, other):
            for res in (None, extra):
                want, got = dynamic.edit(s, x, res), static.edit(s, x, res)
                assert torch.allclose(got, want, atol=1e-5), (s, res is None, (got - want).abs().max())
        unsteered = (slot[tok_req] < 0)
        assert torch.equal(static.edit(site, x)[unsteered], x[unsteered])  # exactly as they were
        assert not torch.allclose(static.edit(site, x), x)
    with pytest.raises(SteerscaleError, match="per site"):
        static.request_stages([(a, 1.0, "all")] * 4)
