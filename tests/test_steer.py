"""Steering vectors: methods, the artifact, pairs files, on tiny random models."""

import json

import numpy as np
import pytest
import torch

from steerscale import Site, SiteKind, SteerscaleError, intervene
from steerscale.steer.extract import extract, extract_labelled, parse_layers
from steerscale.steer.methods import caa, pca_center, pca_diff, probe
from steerscale.steer.pairs import load_labelled, load_pairs
from steerscale.steer.vector import SteeringVector, fingerprint, parse_steer_arg
from tiny import tiny_lm


def _pairs(n=12):
    return [{"positive": f"good kind lovely {i} " * 2, "negative": f"bad rude awful {i} " * 2} for i in range(n)]


def _toy(n=40, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    axis = torch.zeros(dim)
    axis[2] = 3.0
    base = torch.randn(n, dim, generator=g)
    # Concept strength varies by pair, as in real data: that variance is what PCA of differences picks up.
    strength = 0.5 + torch.rand(n, 1, generator=g)
    return base + strength * axis + 0.1 * torch.randn(n, dim, generator=g), base - strength * axis


def test_caa_is_mean_difference():
    pos, neg = _toy()
    d, _ = caa.fit(pos, neg)
    assert torch.allclose(d, (pos - neg).mean(0), atol=1e-5)


@pytest.mark.parametrize("method", [pca_diff, pca_center, probe])
def test_direction_methods_find_the_axis_and_point_positive(method):
    pos, neg = _toy()
    d, info = method.fit(pos, neg)
    cos = float(d @ torch.eye(8)[2] / d.norm())
    assert cos > 0.9, cos  # oriented toward the positive side
    assert ((pos - neg) @ d > 0).float().mean() > 0.9
    if method is probe:
        assert info["probe_accuracy"] >= 0.9


def test_extract_caa_explicit_layers_and_apply():
    lm = tiny_lm()
    v = extract(lm, _pairs(), "caa", "0-2", progress=False)
    assert [s.layer for s in v.sites] == [0, 1, 2] and v.method == "caa"
    assert v.metadata["n_pairs"] == 12 and v.model_fingerprint == fingerprint(lm.layout)
    ids = torch.randint(2, 90, (1, 5))
    with intervene(lm.layout, v.interventions(2.0, layout=lm.layout)):
        steered = lm.model(ids).logits
    assert not torch.allclose(steered, lm.model(ids).logits)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_extract_auto_and_iti(family):
    lm = tiny_lm(family)
    v, sweep = extract(lm, _pairs(), "pca", "auto", return_sweep=True, progress=False)
    assert len(v.sites) == 1 and set(sweep.accuracy) == {Site(i) for i in range(lm.layout.n_layers)}
    iti = extract(lm, _pairs(), "iti", "auto", iti_heads=3, progress=False)
    assert len(iti.sites) == 3 and all(s.kind is SiteKind.HEAD_OUT for s in iti.sites)
    assert all(d.shape[0] == lm.layout.head_dim for d in iti.directions.values())
    assert all("probe_accuracy" in m for m in iti.metadata["per_site"].values())


def test_prompt_pairs_and_mean_readout():
    lm = tiny_lm()
    pairs = [{"prompt": f"q{i}", "positive": "yes indeed", "negative": "no never"} for i in range(6)]
    v = extract(lm, pairs, "caa", "1", read="mean", progress=False)
    assert v.metadata["read"] == "mean"


def test_vector_arithmetic_and_roundtrip(tmp_path):
    lm = tiny_lm()
    a = extract(lm, _pairs(), "caa", "1", progress=False)
    b = SteeringVector({Site(1): torch.ones(32), Site(2): torch.ones(32)}, a.model_name, a.model_fingerprint)
    c = a + b
    assert torch.allclose(c.directions[Site(1)], a.directions[Site(1)] + 1) and Site(2) in c.directions
    assert torch.allclose((a - a).directions[Site(1)], torch.zeros(32))
    assert torch.allclose((2 * a).directions[Site(1)], a.directions[Site(1)] * 2)
    assert torch.allclose((-a).directions[Site(1)], -a.directions[Site(1)])
    path = c.save(tmp_path / "v")
    assert path.suffix == ".safetensors"
    back = SteeringVector.load(path)
    assert back.method == c.method and back.model_fingerprint == c.model_fingerprint
    assert all(torch.equal(back.directions[s], c.directions[s]) for s in c.directions)
    other = SteeringVector({Site(1): torch.ones(32)}, "other", "ffff")
    with pytest.raises(SteerscaleError, match="different models"):
        a + other
    with pytest.raises(SteerscaleError, match="sizes differ"):
        a + SteeringVector({Site(1): torch.ones(16)})
    with pytest.raises(SteerscaleError):
        a * float("nan")


def test_vector_checks_model(tmp_path):
    lm = tiny_lm()
    v = SteeringVector({Site(1): torch.ones(32)}, "x", "0123456789abcdef")
    with pytest.raises(SteerscaleError, match="different shape"):
        v.interventions(1.0, layout=lm.layout)
    wrong = SteeringVector({Site(7): torch.ones(32)})
    with pytest.raises(SteerscaleError, match="out of range"):
        wrong.interventions(1.0, layout=lm.layout)
    small = SteeringVector({Site(1): torch.ones(30)})
    with pytest.raises(SteerscaleError, match="size 30"):
        small.interventions(1.0, layout=lm.layout)


def test_bad_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(SteerscaleError, match="not a readable safetensors"):
        SteeringVector.load(junk)
    with pytest.raises(SteerscaleError, match="not found"):
        SteeringVector.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"positive": "a"}\n')
    with pytest.raises(SteerscaleError, match="'negative' is missing"):
        load_pairs(bad)
    bad.write_text("not json\n")
    with pytest.raises(SteerscaleError, match="not valid JSON"):
        load_pairs(bad)
    lab = tmp_path / "lab.jsonl"
    lab.write_text(json.dumps({"text": "a", "label": 1}) + "\n")
    with pytest.raises(SteerscaleError, match="one class"):
        load_labelled(lab)


def test_parse_helpers():
    assert parse_steer_arg("v.safetensors:4.5") == ("v.safetensors", 4.5)
    assert parse_steer_arg("v.safetensors") == ("v.safetensors", 1.0)
    assert parse_layers("2-4", 30) == [2, 3, 4] and parse_layers("1,5", 30) == [1, 5]
    with pytest.raises(SteerscaleError, match="out of range"):
        parse_layers("40", 30)
    with pytest.raises(SteerscaleError, match="finite"):
        parse_steer_arg("v.safetensors:nan")


def test_identical_pair_is_named():
    lm = tiny_lm()
    pairs = _pairs(3) + [{"positive": "same words", "negative": "same words"}]
    with pytest.raises(SteerscaleError, match="pair 3: positive and negative texts tokenize identically"):
        extract(lm, pairs, "caa", "1", progress=False)


def test_labelled_extraction():
    lm = tiny_lm()
    examples = [(f"good kind lovely {i}", 1) for i in range(8)] + [(f"bad rude awful {i}", 0) for i in range(6)]
    v = extract_labelled(lm, examples, "caa", "1", progress=False)
    from steerscale.engine.capture import capture

    acts = capture(lm.model, lm.tokenizer, lm.layout, [t for t, _ in examples], [Site(1)], "mean")[Site(1)]
    assert torch.allclose(v.directions[Site(1)], acts[:8].mean(0) - acts[8:].mean(0), atol=1e-4)
    assert v.metadata["data"] == "labelled" and v.metadata["n_examples"] == 14
    p = extract_labelled(lm, examples, "probe", "1", progress=False)
    assert 0.0 <= p.metadata["per_site"]["resid_post.1"]["probe_accuracy"] <= 1.0
    with pytest.raises(SteerscaleError, match="needs contrastive pairs"):
        extract_labelled(lm, examples, "pca", "1", progress=False)
    with pytest.raises(SteerscaleError, match="unbalanced"):
        extract_labelled(lm, [(f"good {i}", 1) for i in range(9)] + examples[8:10], "caa", "1", progress=False)


def test_batched_probe_matches_scikit_learn():
    """The batched Newton probe solves scikit-learn's L2 logistic regression: same accuracy, same weights."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    from steerscale.steer.methods.probe import probe_accuracies, split_pairs

    g = torch.Generator().manual_seed(0)
    pos = [torch.randn(120, 16, generator=g) + 0.3 * torch.randn(16, generator=g) for _ in range(5)]
    neg = [torch.randn(120, 16, generator=g) for _ in range(5)]
    ours = probe_accuracies(pos, neg, holdout=0.3, seed=1, C=0.5)
    tr, te = split_pairs(120, 0.3, 1)
    for k in range(5):
        x = torch.cat([pos[k][tr], neg[k][tr]]).double().numpy()
        y = np.r_[np.ones(len(tr)), np.zeros(len(tr))]
        mu, sd = x.mean(0), x.std(0) + 1e-6
        clf = sklearn.LogisticRegression(C=0.5, max_iter=5000, tol=1e-10).fit((x - mu) / sd, y)
        xt = torch.cat([pos[k][te], neg[k][te]]).double().numpy()
        acc = clf.score((xt - mu) / sd, np.r_[np.ones(len(te)), np.zeros(len(te))])
        assert ours[k][0] == pytest.approx(acc, abs=1e-12)
        np.testing.assert_allclose(ours[k][1], clf.coef_[0], rtol=1e-4, atol=1e-5)
        assert ours[k][2] == pytest.approx(clf.intercept_[0], abs=1e-5)


def test_one_registry_lists_every_method():
    from steerscale.registry import Registry
    from steerscale.steer import lofit
    from steerscale.steer.methods import ALIASES, METHODS, get_method, iti

    assert isinstance(METHODS, Registry)
    assert list(METHODS) == ["caa", "pca_diff", "pca_center", "probe", "iti", "lofit", "grains"]
    assert all(description for _, description in METHODS.describe())
    assert get_method("iti").fit is iti.fit and get_method("lofit").fit is lofit.fit_lofit
    assert get_method("pca").fit is pca_diff.fit and ALIASES["mean_diff"] == "caa"
    with pytest.raises(SteerscaleError, match="did you mean 'lofit'"):
        get_method("lofti")
    with pytest.raises(SteerscaleError, match="did you mean 'probe'"):
        extract(tiny_lm(), _pairs(), method="prob")


def test_a_norm_preserving_vector_is_honoured_where_it_can_be_and_refused_where_not(tmp_path):
    """GrAInS vectors carry ``preserve_norm``: the engine and the server's batches rescale, the formats that cannot
    (a llama.cpp control vector, a baked bias, the sum with a plain vector) refuse instead of steering otherwise."""
    from steerscale.scale import Budget, LocalBackend, SamplingParams
    from steerscale.serve.scheduler import Job, Scheduler
    from steerscale.steer.bake import bake
    from steerscale.steer.gguf import export_gguf

    lm = tiny_lm("llama")
    site = Site(1)
    g = torch.Generator().manual_seed(0)
    plain = SteeringVector({site: torch.randn(lm.layout.site_dim(site), generator=g) * 4})
    kept = SteeringVector(dict(plain.directions), metadata={"preserve_norm": True})
    assert kept.preserve_norm and not plain.preserve_norm
    (iv,) = kept.interventions(2.0)
    assert iv.edit.preserve_norm
    seen = {}
    from steerscale.engine.runtime import Observer, observe

    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), observe(lm.layout, [Observer(site, lambda h: seen.setdefault("base", h.clone()))]):
        lm.model(input_ids=ids)
    with torch.no_grad(), intervene(lm.layout, kept.interventions(2.0)), \
            observe(lm.layout, [Observer(site, lambda h: seen.setdefault("kept", h.clone()))]):
        lm.model(input_ids=ids)
    assert torch.allclose(seen["kept"].norm(dim=-1), seen["base"].norm(dim=-1), rtol=1e-5)
    assert not torch.allclose(seen["kept"], seen["base"])
    assert SteeringVector.load(kept.save(tmp_path / "k.safetensors")).preserve_norm
    assert (kept + kept).preserve_norm and (2 * kept).preserve_norm
    with pytest.raises(SteerscaleError, match="norm-preserving"):
        kept + plain
    with pytest.raises(SteerscaleError, match="norm-preserving"):
        export_gguf(kept, tmp_path / "k.gguf")
    with pytest.raises(SteerscaleError, match="preserve_norm"):
        bake(lm.model, lm.layout, kept, 1.0, tmp_path / "baked", lm.tokenizer)
    # decided per prompt (CAST, controllers): the rule's edits keep the vector's norm preservation
    from steerscale.engine.capture import tokenize
    from steerscale.engine.prompt_rules import PromptRule, Read, prompt_interventions

    class Always(PromptRule):
        vector = kept
        reads = (Read(Site(0), "last"),)

        def site_scales(self, readings):
            return {s: (d, torch.full((len(readings[self.reads[0]]),), 2.0)) for s, d in kept.directions.items()}

    edits, _ = prompt_interventions(lm.model, lm.layout, [Always()], tokenize(lm.tokenizer, ["hi"], "cpu"))
    assert [e.edit.preserve_norm for e in edits] == [True]
    # the batching scheduler: a norm-preserving request next to a plain and an unsteered one, each as alone
    greedy = SamplingParams(max_tokens=6, temperature=0.0, step=None)
    steers = [((kept, 2.0),), ((plain, 1.0),), ()]

    def run(jobs, max_batch):
        sched = Scheduler(lm.model, lm.tokenizer, lm.layout, max_batch=max_batch)
        futs = [sched.submit(j) for j in jobs]
        while not all(f.done() for f in futs):
            sched.step()
        return [f.result()[0].token_ids for f in futs]

    prompts = ["hello there", "ab", "a longer prompt here"]
    make = lambda: [Job(lm.tokenizer.encode(p), greedy, steer=s) for p, s in zip(prompts, steers)]
    alone = [run([j], 1)[0] for j in make()]
    assert run(make(), 8) == alone
    local = LocalBackend(lm.model, lm.tokenizer, lm.layout, kept.interventions(2.0), chat=False)
    assert local.sample(prompts[0], 1, greedy, Budget())[0].token_ids == alone[0]
