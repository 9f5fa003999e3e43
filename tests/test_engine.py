"""The hook runtime on tiny random models of every supported family."""

import pytest
import torch

from steerscale import Ablate, Add, Affine, Intervention, Lambda, SetProjection, Site, SiteKind, SteerscaleError, TokenScope, intervene
from steerscale.engine import capture, generate
from tiny import FAMILIES, TinyTokenizer, tiny_model

FAMILY_NAMES = list(FAMILIES)


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _vec(dim, seed=1, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, generator=g) * scale


def _site_for(layout, kind):
    layer = layout.n_layers // 2
    return Site(layer, kind, head=1 if kind is SiteKind.HEAD_OUT else None)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("kind", [SiteKind.RESID_PRE, SiteKind.RESID_POST, SiteKind.ATTN_OUT, SiteKind.MLP_OUT, SiteKind.HEAD_OUT])
def test_every_site_changes_logits_and_leaves_no_hook(family, kind):
    model, layout = tiny_model(family)
    ids = torch.randint(2, 90, (2, 7))
    before = _hooks(model)
    base = model(ids).logits
    site = _site_for(layout, kind)
    with intervene(layout, Intervention(site, Add(_vec(layout.site_dim(site)), 3.0))):
        steered = model(ids).logits
    after = model(ids).logits
    assert not torch.allclose(base, steered, atol=1e-4)
    assert torch.equal(base, after)
    assert _hooks(model) == before


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_router_site_changes_routing(family):
    model, layout = tiny_model(family)
    assert layout.is_moe and layout.n_experts == 4
    ids = torch.randint(2, 90, (2, 6))
    base = model(ids).logits
    bias = torch.tensor([50.0, -50.0, -50.0, 50.0])
    with intervene(layout, Intervention(Site(1, SiteKind.ROUTER), Add(bias))):
        steered = model(ids).logits
    assert not torch.allclose(base, steered, atol=1e-4)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("scope", ["all", "prompt", "generated", "last:2", "positions:1,-1"])
def test_cached_and_uncached_generation_agree(family, scope):
    model, layout = tiny_model(family)
    tok = TinyTokenizer()
    site = Site(1, SiteKind.RESID_POST)
    ivs = [Intervention(site, Add(_vec(layout.hidden_size, scale=4.0)), TokenScope.parse(scope))]
    kw = dict(max_new_tokens=6, chat=False)
    cached = generate(model, tok, layout, ["hello there", "hi"], ivs, use_cache=True, **kw)
    uncached = generate(model, tok, layout, ["hello there", "hi"], ivs, use_cache=False, **kw)
    assert [g.token_ids for g in cached] == [g.token_ids for g in uncached]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_cached_logits_match_full_forward(family):
    """Logits of each decode step with the cache equal a full uncached forward, under a generated-only edit."""
    model, layout = tiny_model(family)
    ids = torch.randint(2, 90, (1, 9))
    prompt = 5
    iv = Intervention(Site(1), Add(_vec(layout.hidden_size, scale=3.0)), TokenScope.parse("generated"))
    with intervene(layout, iv, prompt_width=prompt):  # one pass over prompt + "generated" tokens
        full = model(ids, use_cache=False).logits
    with intervene(layout, iv):
        out = model(ids[:, :prompt], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
        for t in range(prompt, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
            steps.append(out.logits)
    stepped = torch.cat(steps, dim=1)
    assert torch.allclose(full, stepped, atol=1e-4)
    plain = model(ids).logits
    assert torch.allclose(plain[:, : prompt - 1], full[:, : prompt - 1], atol=1e-6)
    assert not torch.allclose(plain[:, prompt - 1 :], full[:, prompt - 1 :], atol=1e-3)


def test_generated_scope_steers_first_generated_token():
    model, layout = tiny_model("llama")
    ids = torch.randint(2, 90, (1, 6))
    base = model(ids).logits
    with intervene(layout, Intervention(Site(2), Add(_vec(32, scale=5.0)), TokenScope.parse("generated"))):
        steered = model(ids).logits
    assert torch.allclose(base[:, :-1], steered[:, :-1], atol=1e-6)  # prompt positions untouched
    assert not torch.allclose(base[:, -1], steered[:, -1], atol=1e-4)  # the prediction of token 1 is steered


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_does_not_change_a_rows_edit(padding_side):
    """A row steered in a padded batch gives the same logits (on real tokens) as alone."""
    model, layout = tiny_model("llama")
    tok = TinyTokenizer()
    tok.padding_side = padding_side
    iv = Intervention(Site(1), Add(_vec(32, scale=3.0)), TokenScope.parse("last:2"))
    texts = ["a short one", "a considerably longer prompt here"]
    enc = tok(texts)
    with intervene(layout, iv):
        batched = model(enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    for row, text in enumerate(texts):
        single = tok([text])
        with intervene(layout, iv):
            alone = model(single["input_ids"]).logits[0]
        real = enc["attention_mask"][row].bool()
        assert torch.allclose(batched[row][real], alone, atol=1e-4)


def test_per_row_vectors_and_scales():
    model, layout = tiny_model("qwen2")
    tok = TinyTokenizer()
    enc = tok(["same text", "same text", "same text"])
    v = _vec(32, scale=3.0)
    per_row = Intervention(Site(1), Add(torch.stack([v, torch.zeros(32), -v]), scale=torch.tensor([1.0, 1.0, 1.0])))
    with intervene(layout, per_row):
        rows = model(**enc).logits
    for i, s in enumerate([1.0, 0.0, -1.0]):
        with intervene(layout, Intervention(Site(1), Add(v, s))):
            single = model(**enc).logits[i]
        assert torch.allclose(rows[i], single, atol=1e-5)
    only_first = Intervention(Site(1), Add(v, 1.0), rows=(0,))
    with intervene(layout, only_first):
        out = model(**enc).logits
    plain = model(**enc).logits
    assert torch.allclose(out[1:], plain[1:]) and not torch.allclose(out[0], plain[0])


def test_composition_order_is_given_order():
    model, layout = tiny_model("llama")
    ids = torch.randint(2, 90, (1, 5))
    v = _vec(32)
    u = v / v.norm()
    add_then_ablate = [Intervention(Site(1), Add(v, 5.0)), Intervention(Site(1), Ablate(u))]
    ablate_only = [Intervention(Site(1), Ablate(u))]
    with intervene(layout, add_then_ablate):
        a = model(ids).logits
    with intervene(layout, ablate_only):
        b = model(ids).logits
    assert torch.allclose(a, b, atol=1e-4)  # adding along u then removing u == removing u


def test_ops_semantics():
    h = torch.randn(2, 3, 8)
    u = torch.zeros(8)
    u[0] = 1
    assert torch.allclose(Ablate(u)(h)[..., 0], torch.zeros(2, 3))
    assert torch.allclose(SetProjection(u, 2.5)(h)[..., 0], torch.full((2, 3), 2.5))
    clamped = SetProjection(u, 0.0, mode="min")(h)[..., 0]
    assert (clamped >= 0).all() and torch.allclose(clamped[h[..., 0] > 0], h[..., 0][h[..., 0] > 0])
    eye = Affine(matrix=torch.eye(8), bias=torch.ones(8))
    assert torch.allclose(eye(h), h + 1)
    from steerscale.engine.ops import apply_edit
    big = Add(u * 100, 1.0, preserve_norm=True)
    assert torch.allclose(apply_edit(big, h).norm(dim=-1), h.norm(dim=-1), atol=1e-4)


def test_exception_inside_block_leaves_model_exactly_as_before():
    model, layout = tiny_model("gemma3")
    ids = torch.randint(2, 90, (1, 5))
    before_hooks = _hooks(model)
    base = model(ids).logits
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(layout, [Intervention(Site(0), Add(_vec(32), 2.0)), Intervention(Site(1, SiteKind.HEAD_OUT, 0), Add(_vec(16), 2.0))]):
            model(ids)
            raise RuntimeError("boom")
    assert _hooks(model) == before_hooks
    assert torch.equal(model(ids).logits, base)


def test_failing_edit_mid_forward_leaves_no_hooks():
    model, layout = tiny_model("llama")
    before = _hooks(model)

    def broken(h):
        raise ValueError("edit failed")

    with pytest.raises(ValueError, match="edit failed"):
        with intervene(layout, [Intervention(Site(0), Add(_vec(32))), Intervention(Site(2), Lambda(broken))]):
            model(torch.randint(2, 90, (1, 4)))
    assert _hooks(model) == before


def test_no_intervention_attaches_nothing():
    model, layout = tiny_model("llama")
    before = _hooks(model)
    with intervene(layout, []):
        assert _hooks(model) == before


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda L: Intervention(Site(L.n_layers), Add(torch.ones(32))), "out of range"),
        (lambda L: Intervention(Site(-1), Add(torch.ones(32))), "out of range"),
        (lambda L: Intervention(Site(0), Add(torch.ones(31))), "size 31"),
        (lambda L: Intervention(Site(0, SiteKind.HEAD_OUT, 9), Add(torch.ones(8))), "head 9"),
        (lambda L: Intervention(Site(0), Add(torch.ones(32), float("nan"))), "finite"),
        (lambda L: Intervention(Site(0), Add(torch.tensor([float("inf")] * 32))), "NaN or inf"),
        (lambda L: Intervention(Site(0, SiteKind.ROUTER), Add(torch.ones(4))), "no MoE router"),
    ],
)
def test_bad_input_is_named(make, match):
    model, layout = tiny_model("llama")
    before = _hooks(model)  # transformers' own output recorders may be there (they stay once a pass records)
    with pytest.raises(SteerscaleError, match=match):
        with intervene(layout, make(layout)):
            pass
    assert _hooks(model) == before


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "mixtral"])
def test_capture_readouts_and_padding(family):
    model, layout = tiny_model(family)
    hooks = _hooks(model)
    tok = TinyTokenizer()
    texts = ["one", "a much longer text"]
    sites = [Site(0), Site(1, SiteKind.HEAD_OUT, 2), Site(1, SiteKind.MLP_OUT)]
    batched = capture(model, tok, layout, texts, sites, "last", batch_size=2)
    alone = [capture(model, tok, layout, [t], sites, "last", batch_size=1) for t in texts]
    for s in sites:
        assert batched[s].shape == (2, layout.site_dim(s))
        for i in range(2):
            assert torch.allclose(batched[s][i], alone[i][s][0], atol=1e-4)
    every = capture(model, tok, layout, texts, [Site(0)], "all")
    assert [t.shape[0] for t in every[Site(0)]] == [len(tok.encode(t)) for t in texts]
    mean = capture(model, tok, layout, texts, [Site(0)], "mean")
    assert torch.allclose(mean[Site(0)][1], every[Site(0)][1].mean(0), atol=1e-5)
    span = capture(model, tok, layout, texts, [Site(0)], "mean", spans=[(0, 2), (3, 5)])
    assert torch.allclose(span[Site(0)][1], every[Site(0)][1][3:5].mean(0), atol=1e-5)
    assert _hooks(model) == hooks


def test_capture_sees_the_edit_of_an_outer_intervention():
    model, layout = tiny_model("llama")
    tok = TinyTokenizer()
    v = _vec(32)
    plain = capture(model, tok, layout, ["text"], [Site(1)])[Site(1)]
    with intervene(layout, Intervention(Site(1), Add(v, 1.0))):
        steered = capture(model, tok, layout, ["text"], [Site(1)])[Site(1)]
    assert torch.allclose(steered, plain + v, atol=1e-5)


def test_several_heads_of_one_layer_each_get_their_own_slice():
    """Edits on heads 0 and 2 of one layer equal the same edits on a manual concatenation."""
    model, layout = tiny_model("llama")
    ids = torch.randint(2, 90, (1, 5))
    d = layout.head_dim
    v0, v2 = _vec(d, seed=3), _vec(d, seed=4)
    heads = [Intervention(Site(1, SiteKind.HEAD_OUT, 0), Add(v0)), Intervention(Site(1, SiteKind.HEAD_OUT, 2), Add(v2))]
    full = torch.zeros(layout.n_heads * d)
    full[:d], full[2 * d : 3 * d] = v0, v2
    seen = {}
    with intervene(layout, heads):
        # registered after the intervention's hook, so it sees the edited input
        hook = layout.out_projs[1].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
        try:
            a = model(ids).logits
        finally:
            hook.remove()
    plain = {}
    hook = layout.out_projs[1].register_forward_pre_hook(lambda m, a: plain.setdefault("x", a[0].clone()))
    try:
        model(ids)
    finally:
        hook.remove()
    assert torch.allclose(seen["x"], plain["x"] + full, atol=1e-6)
    assert not torch.allclose(a, model(ids).logits)


def test_observe_reads_without_changing_and_stops_after_a_block():
    """The runtime's read side (what capture uses): observers change nothing, stop_after skips later blocks."""
    from steerscale.engine import Observer, StopForward, observe

    model, layout = tiny_model("llama")
    hooks = _hooks(model)
    ids = torch.randint(2, 90, (2, 5))
    before = model(ids).logits
    seen, ran = {}, []
    later = layout.blocks[2].register_forward_hook(lambda m, a, o: ran.append(2))
    try:
        with observe(layout, [Observer(Site(1), lambda h: seen.setdefault("resid", h.clone())),
                              Observer(Site(1, SiteKind.HEAD_OUT, 2), lambda h: seen.setdefault("head", h.clone()))]):
            assert torch.equal(model(ids).logits, before)
        with observe(layout, [Observer(Site(0), lambda h: seen.setdefault("early", h))], stop_after=0), \
                pytest.raises(StopForward):
            model(ids)
    finally:
        later.remove()
    assert ran == [2]  # the unstopped pass only
    assert seen["resid"].shape == (2, 5, layout.hidden_size) and seen["head"].shape == (2, 5, layout.head_dim)
    assert "early" in seen and _hooks(model) == hooks
    with pytest.raises(SteerscaleError, match="stop_after"), observe(layout, [], stop_after=layout.n_layers):
        pass


def test_the_kv_cache_goes_under_the_keyword_the_model_takes():
    from steerscale.engine.kvcache import with_cache

    class Old(torch.nn.Module):  # transformers < 5.20
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return past_key_values

    class New(torch.nn.Module):  # transformers >= 5.20 (past_key_values would land in **kwargs)
        def forward(self, input_ids=None, cache=None, **kwargs):
            return cache

    marker = object()
    assert with_cache(Old(), marker) == {"past_key_values": marker}
    assert with_cache(New(), marker) == {"cache": marker}
    assert New()(**with_cache(New(), marker)) is marker and Old()(**with_cache(Old(), marker)) is marker
