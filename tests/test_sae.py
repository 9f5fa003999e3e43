"""SAE features: SAELens files (round trip, older layouts, bad files), encode/decode against hand-written formulas,
clamping as an edit (parity with a hand-written encode -> set -> decode + error; the identity at its own value;
per-row values), feature vectors in the steering engine, training (every architecture; resume = uninterrupted),
reading features, the CLI, and once on SmolLM2. The parity with SAELens itself runs where a python with sae_lens
is found (``SAELENS_PYTHON``, or the peers' venv)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from steerscale.engine.ops import Lambda
from steerscale.engine.runtime import Intervention, intervene
from steerscale.errors import SteerscaleError
from steerscale.models.loading import LoadedModel
from steerscale.models.sites import Site, SiteKind
from steerscale.steer.sae import ClampFeature, SAE, clamp_interventions, feature_vector, hook_of_site, load_sae, site_of_hook
from steerscale.steer.vector import SteeringVector
from tiny import CharTokenizer, tiny_model

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(120)]


def random_sae(d_in=32, d_sae=64, arch="standard", site=Site(1), seed=0, **kw) -> SAE:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    extra = {"threshold": r(d_sae).abs() * 0.3} if arch == "jumprelu" else {}
    return SAE(r(d_in, d_sae) * 0.3, r(d_sae) * 0.1, r(d_sae, d_in) * 0.3, r(d_in) * 0.1, site, arch,
               k=8 if arch == "topk" else None, **extra, **kw)


def by_hand(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """SAELens' encode, written out (see steer/sae/core.py's docstring)."""
    if sae.normalize_activations == "constant_norm_rescale":
        x = x * (sae.d_in ** 0.5) / x.norm(dim=-1, keepdim=True)
    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if sae.architecture == "jumprelu":
        return torch.relu(z) * (z > sae.threshold)
    if sae.architecture == "topk":
        v, i = z.topk(sae.k, dim=-1)
        return torch.zeros_like(z).scatter(-1, i, torch.relu(v))
    return torch.relu(z)


@pytest.fixture(scope="module")
def lm():
    model, layout = tiny_model("llama")
    return LoadedModel(model, CharTokenizer(), layout, "tiny-llama")


# -- files -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_saelens_round_trip_and_hand_written_encode(tmp_path, arch):
    sae = random_sae(arch=arch)
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["architecture"] == arch and (cfg["d_in"], cfg["d_sae"]) == (32, 64)
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and cfg["metadata"]["sae_lens_version"] >= "6"
    back = load_sae(tmp_path / "s")
    x = torch.randn(5, 7, 32)
    assert torch.equal(back.encode(x), sae.encode(x))
    assert torch.allclose(sae.encode(x), by_hand(sae, x), atol=1e-6)
    f = sae.encode(x)
    assert torch.allclose(sae.decode(f), f @ sae.W_dec + sae.b_dec, atol=1e-6)
    assert back.site == Site(1) and (arch != "topk" or back.k == 8)


def test_constant_norm_rescale_is_undone_on_decode():
    sae = random_sae(normalize_activations="constant_norm_rescale")
    x = torch.randn(4, 32) * 50
    assert torch.allclose(sae.encode(x), by_hand(sae, x), atol=1e-5)
    assert torch.allclose(sae.encode(x), sae.encode(x * 3), atol=1e-4)  # scale-free input
    xn = x * (32 ** 0.5) / x.norm(dim=-1, keepdim=True)
    want = (by_hand(sae, x) @ sae.W_dec + sae.b_dec) / ((32 ** 0.5) / x.norm(dim=-1, keepdim=True))
    assert torch.allclose(sae.reconstruct(x), want, atol=1e-4) and xn.shape == x.shape


def test_pre_6_cfg_layout_loads(tmp_path):
    """Older SAELens files: hook_point at the top level, TopK said through activation_fn_str and its kwargs."""
    sae = random_sae(arch="topk", site=Site(2, SiteKind.MLP_OUT))
    sae.save(tmp_path)
    cfg = {"d_in": 32, "d_sae": 64, "hook_point": "blocks.2.hook_mlp_out", "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 8}, "apply_b_dec_to_input": True, "normalize_activations": False,
           "model_name": "tiny"}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    old = load_sae(tmp_path)
    assert old.architecture == "topk" and old.k == 8 and old.site == Site(2, SiteKind.MLP_OUT)
    x = torch.randn(3, 32)
    assert torch.equal(old.encode(x), sae.encode(x))


def test_hook_names_map_to_sites():
    assert site_of_hook("blocks.12.hook_resid_post") == Site(12)
    assert site_of_hook("blocks.3.hook_resid_pre") == Site(3, SiteKind.RESID_PRE)
    assert site_of_hook("blocks.3.hook_attn_out") == Site(3, SiteKind.ATTN_OUT)
    assert site_of_hook("model.layers.7") == Site(7)
    assert site_of_hook("model.layers.7.mlp") == Site(7, SiteKind.MLP_OUT)
    for site in (Site(4), Site(4, SiteKind.RESID_PRE), Site(4, SiteKind.MLP_OUT), Site(4, SiteKind.ATTN_OUT)):
        assert site_of_hook(hook_of_site(site)) == site
    with pytest.raises(SteerscaleError, match="not a site steerscale can place"):
        site_of_hook("blocks.3.attn.hook_z")


def test_bad_files_are_refused_by_name(tmp_path, lm):
    good = tmp_path / "good"
    random_sae(d_in=32).save(good)

    def variant(name, edit_cfg=None, tensors=None, raw=None):
        d = tmp_path / name
        d.mkdir()
        cfg = json.loads((good / "cfg.json").read_text())
        (edit_cfg or (lambda c: None))(cfg)
        (d / "cfg.json").write_text(json.dumps(cfg))
        if raw is not None:
            (d / "sae_weights.safetensors").write_bytes(raw)
        else:
            from safetensors.torch import load_file, save_file

            w = load_file(str(good / "sae_weights.safetensors"))
            (tensors or (lambda w: None))(w)
            save_file(w, str(d / "sae_weights.safetensors"))
        return d

    import io
    buf = io.BytesIO()
    torch.save({"W_enc": torch.zeros(2)}, buf)
    cases = [
        (variant("missing_key", tensors=lambda w: w.pop("b_enc")), "lacks b_enc"),
        (variant("shape", tensors=lambda w: w.__setitem__("W_dec", torch.zeros(64, 31))), "W_dec has shape"),
        (variant("cfg_mismatch", edit_cfg=lambda c: c.__setitem__("d_sae", 99)), "cfg.json says"),
        (variant("pickle", raw=buf.getvalue()), "not a safetensors file"),
        (variant("arch", edit_cfg=lambda c: c.__setitem__("architecture", "gated")), "'gated' is not supported"),
        (variant("hook", edit_cfg=lambda c: c["metadata"].__setitem__("hook_name", "blocks.1.attn.hook_z")),
         "not a site"),
        (variant("no_threshold", edit_cfg=lambda c: c.__setitem__("architecture", "jumprelu")), "lacks threshold"),
        (variant("norm", edit_cfg=lambda c: c.__setitem__("normalize_activations", "expected_average_only_in")),
         "not supported"),
        (tmp_path / "nowhere", "not found"),
    ]
    for path, message in cases:
        with pytest.raises(SteerscaleError, match=message):
            load_sae(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SteerscaleError, match="no cfg.json"):
        load_sae(tmp_path / "empty")
    wide = tmp_path / "wide"
    random_sae(d_in=48).save(wide)
    with pytest.raises(SteerscaleError, match="48-wide activations"):
        load_sae(wide, lm.layout)


# -- clamping and feature vectors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family,arch", [("llama", "standard"), ("gpt2", "jumprelu"), ("qwen2", "topk")])
def test_clamp_matches_hand_written_encode_set_decode(family, arch):
    model, layout = tiny_model(family)
    sae = random_sae(arch=arch)
    feature, value = 5, 3.0

    def reference(h):  # encode, set, decode, and add back the reconstruction error
        f = by_hand(sae, h)
        error = h - (f @ sae.W_dec + sae.b_dec)
        f = f.clone()
        f[..., feature] = value
        return f @ sae.W_dec + sae.b_dec + error

    ids = torch.randint(2, 90, (2, 9))
    with torch.no_grad():
        with intervene(layout, clamp_interventions(sae, feature, value, layout=layout)):
            ours = model(ids).logits
        with intervene(layout, [Intervention(sae.site, Lambda(reference))]):
            ref = model(ids).logits
        plain = model(ids).logits
    assert torch.allclose(ours, ref, atol=1e-4)
    assert (ours - plain).abs().max() > 1e-3  # the clamp did something


def test_clamp_to_own_value_is_identity_and_values_can_be_per_row(lm):
    sae = random_sae(arch="jumprelu")

    class Own(ClampFeature):
        def _targets(self, h):
            return self.sae.encode(h)[..., self.features]

    ids = torch.randint(2, 90, (3, 8))
    with torch.no_grad():
        plain = lm.model(ids).logits
        with intervene(lm.layout, [Intervention(sae.site, Own(sae, [2, 7]))]):
            same = lm.model(ids).logits
        assert torch.allclose(same, plain, atol=1e-5)
        per_row = ClampFeature(sae, 4, [torch.tensor([0.0, 5.0, 0.0])])
        h = torch.randn(3, 6, 32)
        out = per_row(h)
        assert torch.allclose(out[0], ClampFeature(sae, 4, 0.0)(h)[0], atol=1e-6)
        assert torch.allclose(out[1], ClampFeature(sae, 4, 5.0)(h)[1], atol=1e-6)
        assert not torch.allclose(out[1], out[0])
    with pytest.raises(SteerscaleError, match="not a feature"):
        ClampFeature(sae, 64)
    with pytest.raises(SteerscaleError, match="2 clamp values for 1 features"):
        ClampFeature(sae, 3, [1.0, 2.0])


def test_massive_activation_tokens_are_left_alone():
    from steerscale.steer.sae import Splice
    from steerscale.steer.sae.train import drop_outliers

    sae = random_sae()
    h = torch.randn(2, 5, 32)
    h[0, 0] *= 500  # an attention sink's norm
    for edit in (ClampFeature(sae, 3, 7.0), Splice(sae)):
        out = edit(h)
        assert torch.equal(out[0, 0], h[0, 0]) and not torch.allclose(out[1], h[1])
        assert not torch.equal(type(edit)(sae, *( [3, 7.0] if isinstance(edit, ClampFeature) else []),
                                          outlier_factor=0)(h)[0, 0], h[0, 0])
    kept, dropped = drop_outliers(h.reshape(-1, 32), 10.0)
    assert dropped == 1 and kept.shape[0] == 9


def test_feature_vector_is_a_steering_vector_everywhere(tmp_path, lm):
    from steerscale.engine.generation import generate

    sae = random_sae()
    vec = feature_vector(sae, 9, lm.layout)
    assert torch.equal(vec.directions[Site(1)], sae.W_dec[9]) and vec.method == "sae_feature"
    vec = SteeringVector.load(vec.save(tmp_path / "f9.safetensors"))
    assert vec.metadata["features"] == [9]
    plain = generate(lm.model, lm.tokenizer, lm.layout, ["abc"], [], max_new_tokens=6)[0].text
    steered = generate(lm.model, lm.tokenizer, lm.layout, ["abc"], vec.interventions(40.0, layout=lm.layout),
                       max_new_tokens=6)[0].text
    assert steered != plain
    unit = feature_vector(sae, [1, 2], normalize=True)
    assert abs(float(unit.directions[Site(1)].norm()) - 1) < 1e-5


# -- training and reading -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["topk", "standard", "jumprelu"])
def test_training_learns_and_saves_saelens_files(tmp_path, lm, arch):
    from steerscale.steer.sae.train import TrainConfig, train_sae

    cfg = TrainConfig(architecture=arch, expansion=2, k=8, steps=120, batch_size=64, lr=3e-3, resample_every=40)
    sae, report = train_sae(lm, TEXTS, "resid_post.1", tmp_path, cfg, max_tokens=3000, progress=False)
    ev = report["held_out"]["explained_variance"]
    assert ev > 0.5, report["held_out"]
    assert report["held_out"]["l0"] < sae.d_sae / 2
    back = load_sae(tmp_path, lm.layout)
    x = torch.randn(4, 32)
    assert torch.allclose(back.encode(x), sae.encode(x)) and back.model_name == "tiny-llama"


def test_resumed_training_equals_an_uninterrupted_run(tmp_path, lm):
    from steerscale.steer.sae.train import TrainConfig, train_sae

    cfg = dict(expansion=2, k=8, steps=30, batch_size=64, resample_every=10, checkpoint_every=10)
    whole, _ = train_sae(lm, TEXTS, "resid_post.1", tmp_path / "a", TrainConfig(**cfg), 2000, progress=False)
    train_sae(lm, TEXTS, "resid_post.1", tmp_path / "b", TrainConfig(**cfg), 2000, progress=False, stop_after=17)
    resumed, report = train_sae(lm, TEXTS, "resid_post.1", tmp_path / "b", TrainConfig(**cfg), 2000, progress=False,
                                log=lambda m: None)
    assert report["finished"] and torch.allclose(whole.W_dec, resumed.W_dec, atol=1e-6)
    with pytest.raises(SteerscaleError, match="other settings"):
        train_sae(lm, TEXTS, "resid_post.1", tmp_path / "b", TrainConfig(**{**cfg, "k": 4}), 2000, progress=False)


def test_reading_features(lm):
    from steerscale.steer.pairs import bundled_pairs
    from steerscale.steer.sae.read import logit_effect, max_activating, search_features, spliced_loss, top_features

    sae = random_sae(d_sae=48)
    rows = top_features(lm, sae, "hello there", k=3)
    assert len(rows) == len("hello there") and all(len(r["features"]) <= 3 for r in rows)
    ctx = max_activating(lm, sae, 3, TEXTS[:10], top=4, progress=False)
    assert ctx == sorted(ctx, key=lambda r: -r["activation"]) and all(r["activation"] > 0 for r in ctx)
    scores = search_features(lm, sae, bundled_pairs("formal_casual"), top=5, progress=False)
    assert len(scores) == 5 and abs(scores[0].separation) >= abs(scores[-1].separation)
    flipped = search_features(lm, sae, positive=TEXTS[:6], negative=TEXTS[6:12], top=48, progress=False)
    assert len({s.feature for s in flipped}) == 48
    effect = logit_effect(lm, sae, 3, top=4)
    assert effect["promoted"][0][1] >= effect["promoted"][-1][1] >= effect["suppressed"][-1][1]
    loss = spliced_loss(lm, sae, TEXTS[:4])
    assert loss["clean"] > 0 and loss["spliced"] != loss["clean"]


def test_cli_actions_on_a_tiny_model(tmp_path, lm, capsys):
    from steerscale.cli import build_parser, main
    from steerscale.commands import sae_cmd

    folder = tmp_path / "sae"
    random_sae().save(folder)
    parse = build_parser().parse_args
    assert sae_cmd._top(parse(["sae", "top", str(folder), "-p", "hi you", "--json"]), lm) == 0
    assert len(json.loads(capsys.readouterr().out)) == 6
    assert sae_cmd._vector(parse(["sae", "vector", str(folder), "--feature", "3", "-o",
                                  str(tmp_path / "f.safetensors")]), lm) == 0
    assert SteeringVector.load(tmp_path / "f.safetensors").metadata["features"] == [3]
    assert "use --steer" in capsys.readouterr().out
    assert sae_cmd._clamp(parse(["sae", "clamp", str(folder), "--feature", "3", "--value", "9", "-p", "ab",
                                 "--max-new-tokens", "3", "--json"]), lm) == 0
    assert set(json.loads(capsys.readouterr().out)) >= {"plain", "clamped"}
    html = tmp_path / "c.html"
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(TEXTS[:8]))
    assert sae_cmd._contexts(parse(["sae", "contexts", str(folder), "--feature", "3", "--corpus", str(texts),
                                    "--html", str(html)]), lm) == 0
    assert "<mark>" in html.read_text() and "[[" in capsys.readouterr().out
    assert main(["sae", "info", str(folder)]) == 0
    assert json.loads(capsys.readouterr().out)["d_sae"] == 64
    for argv, message in ((["sae", "train", "-o", "x"], "needs --site and -o"),
                          (["sae", "vector", str(folder), "--feature", "1", "-o", "f.gguf"], ".safetensors"),
                          (["sae", "clamp", str(folder), "-p", "x"], "needs --feature"),
                          (["sae", "compare", str(folder)], "needs contrastive pairs"),
                          (["sae", "train", "--site", "resid_post.1", "-o", "x", "--train", "architecture=gated"],
                           "unknown SAE architecture"),
                          (["sae", "info", str(tmp_path / "missing")], "not found")):
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err


# -- SAELens itself, and SmolLM2 --------------------------------------------------------------------------------------
def _saelens_python() -> str | None:
    for py in (os.environ.get("SAELENS_PYTHON"), *(f"{ROOT}/{v}/bin/python" for v in (".venv-saelens", ".venv-peers"))):
        if py and Path(py).exists() and subprocess.run([py, "-c", "import sae_lens"], capture_output=True).returncode == 0:
            return py
    return None


@pytest.mark.skipif(_saelens_python() is None, reason="no python with sae_lens (bash scripts/make_saelens_venv.sh, "
                                                        "or set SAELENS_PYTHON)")
def test_saelens_loads_our_files_and_we_load_its_files(tmp_path):
    """Both directions in one SAELens process: our files through SAE.load_from_disk, and files SAELens' own
    save_model wrote through load_sae; encode and decode outputs compared."""
    from safetensors.torch import load_file, save_file

    x = torch.randn(6, 32)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    saes, argv = {}, []
    for arch in ("standard", "jumprelu", "topk"):
        saes[arch] = random_sae(arch=arch)
        saes[arch].save(tmp_path / arch)
        argv += [str(tmp_path / arch), str(tmp_path / "x.safetensors"), str(tmp_path / f"{arch}.out.safetensors")]
    theirs_dir = tmp_path / "made_by_saelens"
    out = subprocess.run([_saelens_python(), str(ROOT / "bench" / "peers" / "sae_lens_parity.py"), *argv,
                          "--make", str(theirs_dir), "--inputs", str(tmp_path / "x.safetensors")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for arch, sae in saes.items():
        theirs = load_file(str(tmp_path / f"{arch}.out.safetensors"))
        assert torch.allclose(theirs["feature_acts"], sae.encode(x), atol=1e-5), arch
        assert torch.allclose(theirs["reconstruction"], sae.reconstruct(x), atol=1e-5), arch
        ours = load_sae(theirs_dir / arch)
        made = load_file(str(theirs_dir / f"{arch}.out.safetensors"))
        assert ours.architecture == arch and ours.site == Site(1) and ours.model_name == "tiny"
        assert torch.allclose(ours.encode(x), made["feature_acts"], atol=1e-5), arch
        assert torch.allclose(ours.reconstruct(x), made["reconstruction"], atol=1e-5), arch


@pytest.mark.integration
def test_smollm2_train_clamp_and_steer(tmp_path):
    from steerscale.models.loading import load_model
    from steerscale.steer.sae.train import TrainConfig, train_sae

    lm = load_model("smollm2-135m-instruct")
    sae, report = train_sae(lm, TEXTS * 2, "resid_post.3", tmp_path, TrainConfig(expansion=2, k=16, steps=40,
                                                                                  batch_size=128), 1500, progress=False)
    assert report["held_out"]["explained_variance"] > 0.3, report["held_out"]
    sae = load_sae(tmp_path, lm.layout)
    ids = lm.tokenizer(["How was your weekend?"], return_tensors="pt")["input_ids"]

    class Own(ClampFeature):
        def _targets(self, h):
            return self.sae.encode(h)[..., self.features]

    with torch.no_grad():
        plain = lm.model(ids).logits
        with intervene(lm.layout, [Intervention(sae.site, Own(sae, 0))]):
            assert torch.allclose(lm.model(ids).logits, plain, atol=1e-3)
        with intervene(lm.layout, feature_vector(sae, 0, lm.layout).interventions(50.0)):
            assert (lm.model(ids).logits - plain).abs().max() > 0.1


def test_match_kl_finds_the_strength_of_a_target_cost():
    from steerscale.measure.sae_compare import match_kl

    calls = []

    def kl(s):  # a monotone cost, as KL grows with steering strength
        calls.append(s)
        return 0.02 * s ** 2

    strength, got = match_kl(lambda s: s, kl, 0.5, start=0.3)
    assert abs(got - 0.5) / 0.5 < 0.1 and abs(strength - 5.0) < 0.3 and len(calls) < 20
    strength, got = match_kl(lambda s: s, lambda s: 1e-4, 0.5, start=1.0)  # never reached: the strongest tried
    assert strength == 2 ** 12 and got == 1e-4


# -- SAE features in the steering plan and the server (issue 28, item 4) ------------------------------------------
@pytest.mark.parametrize("arch,rescale", [("standard", False), ("jumprelu", False), ("standard", True)])
def test_a_plan_clamp_equals_clamp_feature_with_its_fixed_cap(arch, rescale):
    from steerscale.engine.plan import SteeringPlan, build_tables, request_slots, token_index
    from steerscale.steer.sae import ClampableSAE

    sae = random_sae(arch=arch, rescale_acts_by_decoder_norm=rescale)
    h = torch.randn(3, 6, 32) * 2
    h[0, 0] *= 40  # a sink-like token past the cap: left alone
    cap = float(h[1].norm(dim=-1).max()) * 1.5
    served = ClampableSAE(sae, cap, "s")
    clamp = served.clamp(7)
    want = ClampFeature(sae, 7, 2.5, norm_cap=cap)(h)
    assert torch.equal(want[0, 0], h[0, 0]) and not torch.allclose(want[1], h[1])
    # the single clamp as the hook runtime runs it, and rows of a steering plan (row 1 unsteered, row 2 another value)
    (iv,) = clamp.interventions(("clamp", 2.5))
    assert torch.allclose(iv.edit(h), want, atol=1e-5)
    tables = build_tables([request_slots([(clamp, ("clamp", 2.5), "all")]),
                           request_slots([(clamp, ("clamp", -1.0), "generated")])])
    positions = torch.arange(6).expand(3, 6)
    index = token_index(torch.tensor([0, -1, 1])[:, None].expand(3, 6), positions, torch.full((3, 6), 4))
    out = SteeringPlan(tables, index).edit(sae.site, h)
    assert torch.allclose(out[0], want[0], atol=1e-5) and torch.equal(out[1], h[1])
    other = ClampFeature(sae, 7, -1.0, norm_cap=cap)(h)[2]
    assert torch.equal(out[2, :3], h[2, :3]) and torch.allclose(out[2, 3:], other[3:], atol=1e-5)  # generated scope


def test_only_separable_unnormalised_saes_clamp_in_a_plan():
    from steerscale.steer.sae import ClampableSAE

    for sae, what in [(random_sae(arch="topk"), "topk"),
                      (random_sae(normalize_activations="constant_norm_rescale"), "constant_norm_rescale")]:
        with pytest.raises(SteerscaleError, match=what):
            ClampableSAE(sae, 10.0).clamp(3)


def _post(url, body):
    from types import SimpleNamespace

    from test_serve import call  # the server tests' HTTP helper

    return call(SimpleNamespace(url=url), "/v1/completions", body)


def test_the_server_adds_and_clamps_sae_features_per_request():
    import threading
    import urllib.request

    from steerscale.scale import Budget, LocalBackend, SamplingParams
    from steerscale.serve import App, start_server
    from tiny import ChatCharTokenizer

    model, layout = tiny_model("llama")
    tok = ChatCharTokenizer()
    sae = random_sae(arch="jumprelu")
    sae.W_dec *= 8  # features strong enough to change a tiny random model's greedy text
    app = App(model, tok, layout, model_id="tiny", vectors={"f5": feature_vector(sae, 5)},
              saes={"s": sae, "wide": random_sae(arch="topk")}, max_n=8, max_batch=4)
    server = start_server(app)
    prompt, n = "steer me", 10
    try:
        def text(steer):
            status, out = _post(server.url, {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0,
                                             "steer": steer})
            assert status == 200, out
            return out["choices"][0]["text"]

        plain = text([])
        added = text([{"layer": "s", "index": 5, "strength": 4}])
        assert added == text([{"vector": "f5", "scale": 4}]) and added != plain  # Neuronpedia's additive shape
        cap = app.saes["s"].norm_cap
        assert cap > 0
        clamp = {"layer": "s", "index": 5, "strength": 12, "op": "clamp"}
        local = LocalBackend(model, tok, layout, chat=False,
                             steering=[Intervention(sae.site, ClampFeature(sae, 5, 12.0, norm_cap=cap))])
        want = local.sample(prompt, 1, SamplingParams(max_tokens=n, temperature=0, step=None), Budget())[0].text
        assert text([clamp]) == want != plain
        # one batch: each request gets its own steering
        bodies = [[], [clamp], [{"layer": "s", "index": 5, "strength": 4}], [{**clamp, "scope": "generated"}]]
        got = [None] * len(bodies)
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, text(bodies[i]))) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got[:3] == [plain, want, added]
        # bad entries: a 400 naming the field
        for steer, param in [([{"layer": "nope", "index": 1}], "steer"),
                             ([{"layer": "s", "index": 64}], "steer.0.index"),
                             ([{"layer": "s", "index": 1, "op": "clamp"}], "steer.0"),
                             ([{"vector": "f5", "strength": 2}], "steer.0"),
                             ([{"layer": "s", "index": 1, "scale": 2}], "steer.0"),
                             ([{"layer": "wide", "index": 1, "strength": 0, "op": "clamp"}], "steer.0.op")]:
            status, err = _post(server.url, {"model": "tiny", "prompt": prompt, "max_tokens": 2, "steer": steer})
            assert status == 400 and err["error"]["param"] == param, (steer, err)
        with urllib.request.urlopen(server.url.rsplit("/v1", 1)[0] + "/v1/steering/saes", timeout=30) as resp:
            listed = json.loads(resp.read())["data"]
        assert [c["id"] for c in listed] == ["s", "wide"] and listed[0]["norm_cap"] == round(cap, 4)
        assert text([]) == plain  # nothing left behind
    finally:
        server.close()
