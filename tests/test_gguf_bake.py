"""Portability: GGUF control vectors (llama.cpp / repeng) and baked checkpoints, on tiny random models."""

import argparse
import json

import numpy as np
import pytest
import torch

from steerscale import Ablate, Add, Intervention, Site, SiteKind, SteerscaleError, TokenScope, intervene
from steerscale.steer.bake import bake
from steerscale.steer.gguf import export_gguf, import_gguf
from steerscale.steer.vector import SteeringVector, fingerprint
from tiny import tiny_model

IDS = torch.tensor([[5, 17, 33, 2, 71, 40, 9, 88, 23, 61]])


def _rand(n, seed, norm=None):
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return v if norm is None else v / v.norm() * norm


def _vector(layout, sites, seed=0, name="tiny"):
    dirs = {s: _rand(layout.site_dim(s), seed + k, norm=3.0) for k, s in enumerate(sites)}
    return SteeringVector(dirs, name, fingerprint(layout), "caa", {"note": "test", "per_site": {"a": 1.5}})


@torch.no_grad()
def _logits(model, layout=None, ivs=()):
    if not ivs:
        return model(IDS).logits
    with intervene(layout, list(ivs)):
        return model(IDS).logits


def _plain_load(directory):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(model).__module__.startswith("transformers.")  # no steerscale code involved
    return model.eval()


# -- GGUF ------------------------------------------------------------------------------------------------------
def test_gguf_round_trip_is_the_same_edit_at_the_same_place(tmp_path):
    model, layout = tiny_model("llama")
    v = _vector(layout, [Site(1), Site(2)])
    path = export_gguf(v, tmp_path / "v.gguf", scale=2.5)
    back = import_gguf(path)
    assert back.sites == [Site(1), Site(2)]
    for s in v.sites:
        assert torch.allclose(back.directions[s], 2.5 * v.directions[s], atol=1e-6)
    # our metadata survives the round trip
    assert (back.method, back.model_name, back.model_fingerprint) == ("caa", "tiny", fingerprint(layout))
    assert back.metadata["note"] == "test" and back.metadata["per_site"] == {"a": 1.5}
    assert back.metadata["gguf_folded_scale"] == 2.5
    hooked = _logits(model, layout, v.interventions(2.5, layout=layout))
    assert torch.allclose(_logits(model, layout, back.interventions(1.0, layout=layout)), hooked, atol=1e-6)
    assert not torch.allclose(hooked, _logits(model), atol=1e-3)
    # SteeringVector.load dispatches on the suffix
    assert SteeringVector.load(path).sites == back.sites


def test_gguf_file_follows_llama_cpp_convention(tmp_path):
    import gguf

    _, layout = tiny_model("llama")
    v = _vector(layout, [Site(1), Site(3, SiteKind.RESID_PRE)])  # resid_pre of block 3 == output of block 2
    path = export_gguf(v, tmp_path / "v", model_hint="llama")
    assert path.name == "v.gguf"
    r = gguf.GGUFReader(str(path))
    field = lambda k: r.get_field(k).contents()
    assert field("general.architecture") == "controlvector"
    assert field("controlvector.model_hint") == "llama"
    assert field("controlvector.layer_count") == 2
    tensors = {t.name: t for t in r.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2"]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [32] for t in tensors.values())
    assert np.allclose(tensors["direction.2"].data, v.directions[Site(3, SiteKind.RESID_PRE)].numpy())


def test_gguf_resid_pre_exports_as_previous_block_output(tmp_path):
    model, layout = tiny_model("llama")
    v = _vector(layout, [Site(2, SiteKind.RESID_PRE)])
    back = import_gguf(export_gguf(v, tmp_path / "pre.gguf"))
    assert back.sites == [Site(1)]
    assert torch.allclose(_logits(model, layout, back.interventions(1.0)), _logits(model, layout, v.interventions(1.0)),
                          atol=1e-6)


def test_gguf_peer_file_without_steerscale_keys_imports(tmp_path):
    import gguf

    path = tmp_path / "peer.gguf"
    w = gguf.GGUFWriter(str(path), "controlvector")  # what repeng's export_gguf writes
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", 2)
    for n in (1, 2):
        w.add_tensor(f"direction.{n}", np.full(32, float(n), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    v = import_gguf(path)
    assert v.sites == [Site(1), Site(2)] and v.model_fingerprint == "" and v.method == "gguf"
    assert v.model_name == "llama" and float(v.directions[Site(2)][0]) == 2.0
    _, layout = tiny_model("llama")
    v.check_compatible(layout)  # no fingerprint: only sizes are checked


def test_gguf_export_refuses_what_llama_cpp_cannot_express(tmp_path):
    _, layout = tiny_model("llama")
    iti = _vector(layout, [Site(1, SiteKind.HEAD_OUT, 2)])
    with pytest.raises(SteerscaleError, match=r"(?s)per-head.*steerscale bake"):
        export_gguf(iti, tmp_path / "iti.gguf")
    with pytest.raises(SteerscaleError, match="mlp_out"):
        export_gguf(_vector(layout, [Site(1, SiteKind.MLP_OUT)]), tmp_path / "mlp.gguf")
    both = _vector(layout, [Site(0), Site(2)])
    with pytest.raises(SteerscaleError, match="direction.0"):
        export_gguf(both, tmp_path / "l0.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written
    back = import_gguf(export_gguf(both, tmp_path / "l0.gguf", drop_layer0=True))
    assert back.sites == [Site(2)] and back.metadata["gguf_dropped_sites"] == ["resid_post.0"]


def _write_cv(path, tensors, arch="controlvector"):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


BAD_FILES = {
    "garbage": lambda p: p.write_bytes(b"this is not a gguf file at all" * 10),
    "truncated": lambda p: (_write_cv(p, {"direction.1": np.ones(64, np.float32)}), p.write_bytes(p.read_bytes()[:70])),
    "a model, not a control vector": lambda p: _write_cv(p, {"token_embd.weight": np.ones((4, 8), np.float32)}, "llama"),
    "direction.0": lambda p: _write_cv(p, {"direction.0": np.ones(8, np.float32), "direction.1": np.ones(8, np.float32)}),
    "mixed sizes": lambda p: _write_cv(p, {"direction.1": np.ones(8, np.float32), "direction.2": np.ones(9, np.float32)}),
    "not F32": lambda p: _write_cv(p, {"direction.1": np.ones(8, np.float16)}),
    "2-D": lambda p: _write_cv(p, {"direction.1": np.ones((2, 8), np.float32)}),
    "foreign tensor": lambda p: _write_cv(p, {"direction.1": np.ones(8, np.float32), "bias.1": np.ones(8, np.float32)}),
    "empty": lambda p: _write_cv(p, {}),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_gguf_bad_files_give_a_clear_error(tmp_path, case):
    path = tmp_path / "bad.gguf"
    BAD_FILES[case](path)
    with pytest.raises(SteerscaleError):
        import_gguf(path)


def test_gguf_missing_file(tmp_path):
    with pytest.raises(SteerscaleError, match="not found"):
        import_gguf(tmp_path / "nope.gguf")


# -- bake ------------------------------------------------------------------------------------------------------
def test_bake_residual_vector_llama(tmp_path):
    model, layout = tiny_model("llama")
    before = _logits(model)
    v = _vector(layout, [Site(0), Site(2), Site(2, SiteKind.RESID_PRE), Site(1, SiteKind.ATTN_OUT)])
    report = bake(model, layout, v, 3.0, tmp_path / "baked", verify=True)
    hooked = _logits(model, layout, v.interventions(3.0))
    baked = _logits(_plain_load(tmp_path / "baked"))
    assert (baked - hooked).abs().max() < 1e-4
    assert (hooked - before).abs().max() > 1e-2  # the edit is not trivially small
    # the model passed in is untouched
    assert torch.equal(_logits(model), before) and all(m.bias is None for m in layout.out_projs)
    cfg = json.loads((tmp_path / "baked" / "config.json").read_text())
    assert cfg["mlp_bias"] is True and cfg["attention_bias"] is True and "auto_map" not in cfg
    saved = json.loads((tmp_path / "baked" / "steerscale.json").read_text())
    assert saved["edits"][0] == {"site": "resid_post.0", "scale": 3.0, "bias": "model.layers.0.mlp.down_proj.bias"}
    assert {e["bias"] for e in saved["edits"]} >= {"model.layers.1.mlp.down_proj.bias", "model.layers.1.self_attn.o_proj.bias"}
    assert saved["vectors"][0]["method"] == "caa" and report["check"]["reload_max_abs_diff"] < 1e-4


def test_bake_iti_vector_several_heads_several_layers_llama(tmp_path):
    model, layout = tiny_model("llama")
    heads = [(0, 1), (0, 3), (1, 0), (2, 2), (2, 3)]
    v = _vector(layout, [Site(l, SiteKind.HEAD_OUT, h) for l, h in heads], seed=10)
    bake(model, layout, v, 2.0, tmp_path / "iti", verify=False)
    baked_model = _plain_load(tmp_path / "iti")
    hooked = _logits(model, layout, v.interventions(2.0))
    assert (_logits(baked_model) - hooked).abs().max() < 1e-4
    cfg = json.loads((tmp_path / "iti" / "config.json").read_text())
    assert cfg["attention_bias"] is True and not cfg.get("mlp_bias")
    assert baked_model.model.layers[1].self_attn.q_proj.bias.abs().max() == 0  # zero biases where nothing was edited


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_bake_residual_and_iti_other_bias_layouts(tmp_path, family):
    """qwen2 hard-codes bias=False on o_proj/MLP (saved as an equivalent Llama); gpt2's Conv1D already has biases."""
    model, layout = tiny_model(family)
    v = _vector(layout, [Site(1), Site(0, SiteKind.HEAD_OUT, 2), Site(2, SiteKind.HEAD_OUT, 0),
                         Site(2, SiteKind.HEAD_OUT, 1)], seed=20)
    report = bake(model, layout, v, 1.5, tmp_path / family, verify=False)
    baked = _logits(_plain_load(tmp_path / family))
    assert (baked - _logits(model, layout, v.interventions(1.5))).abs().max() < 1e-4
    if family == "qwen2":
        assert report["saved_as"] == "llama"
    else:
        assert report["saved_as"] == "gpt2" and report["config_flags_set"] == [] and report["zero_biases_added"] == 0


def test_bake_gemma3_heads_yes_residual_no(tmp_path):
    """Gemma 3 has attention_bias but no MLP bias, and a norm after its MLP: per-head edits bake, residual ones cannot."""
    model, layout = tiny_model("gemma3")
    v = _vector(layout, [Site(0, SiteKind.HEAD_OUT, 1), Site(2, SiteKind.HEAD_OUT, 3)], seed=30)
    bake(model, layout, v, 2.0, tmp_path / "g", verify=False)
    assert (_logits(_plain_load(tmp_path / "g")) - _logits(model, layout, v.interventions(2.0))).abs().max() < 1e-4
    with pytest.raises(SteerscaleError, match="no bias at model.layers.1.mlp.down_proj"):
        bake(model, layout, _vector(layout, [Site(1)]), 1.0, tmp_path / "g2")
    assert not (tmp_path / "g2").exists()


def test_bake_refuses_what_a_bias_cannot_express(tmp_path):
    model, layout = tiny_model("llama")
    vec = _rand(32, 0)
    cases = {
        "scoped to prompt tokens": [Intervention(Site(1), Add(vec, 1.0), TokenScope.parse("last:2"))],
        "only constant additions": [Intervention(Site(1), Ablate(vec))],
        "resid_pre.0": [Intervention(Site(0, SiteKind.RESID_PRE), Add(vec, 1.0))],
        "preserve_norm": [Intervention(Site(1), Add(vec, 1.0, preserve_norm=True))],
        "per-row": [Intervention(Site(1), Add(torch.stack([vec, vec]), 1.0))],
    }
    for why, ivs in cases.items():
        with pytest.raises(SteerscaleError, match=why.split()[0]):
            bake(model, layout, ivs, 1.0, tmp_path / "x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    ok = [Intervention(Site(1), Add(vec, 1.0))]
    with pytest.raises(SteerscaleError, match="not empty"):
        bake(model, layout, ok, 1.0, tmp_path / "busy")
    with pytest.raises(SteerscaleError, match="not an earlier steerscale bake"):
        bake(model, layout, ok, 1.0, tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_bake_leaves_the_model_and_the_directory_as_they_were_when_saving_fails(tmp_path, monkeypatch):
    model, layout = tiny_model("llama")
    model.train()
    before = [(n, p.clone()) for n, p in model.named_parameters()]
    v = _vector(layout, [Site(1), Site(2, SiteKind.HEAD_OUT, 1)])

    def fail(*args, **kwargs):
        assert layout.out_projs[2].bias is not None and not model.training  # biases set, eval mode, while saving
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        bake(model, layout, v, 2.0, tmp_path / "out")
    assert model.training and all(m.bias is None for m in layout.out_projs)
    after = list(model.named_parameters())
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(after, before))
    assert list(tmp_path.iterdir()) == []  # neither the output nor the staging directory


def test_any_module_that_loads_vectors_reads_gguf(tmp_path):
    """SteeringVector.load reads .gguf files even when nothing imported steer.gguf by name."""
    import subprocess
    import sys

    _, layout = tiny_model("llama")
    path = export_gguf(_vector(layout, [Site(1)]), tmp_path / "v.gguf")
    code = f"from steerscale.steer.vector import SteeringVector; print(SteeringVector.load({str(path)!r}).method)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "caa"


# -- CLI -------------------------------------------------------------------------------------------------------
def _cli(argv):
    from steerscale.commands import portability_cmds

    parser = argparse.ArgumentParser()
    portability_cmds.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(96)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0", eos_token="w1")


def test_cli_export_import_bake(tmp_path, capsys):
    model, layout = tiny_model("llama")
    v = _vector(layout, [Site(1), Site(2)], seed=40)
    vpath = v.save(tmp_path / "v.safetensors")
    assert _cli(["export", str(vpath), "--gguf", str(tmp_path / "v.gguf"), "--scale", "2"]) == 0
    assert _cli(["import", str(tmp_path / "v.gguf"), "-o", str(tmp_path / "back.safetensors")]) == 0
    back = SteeringVector.load(tmp_path / "back.safetensors")
    assert torch.allclose(back.directions[Site(2)], 2 * v.directions[Site(2)])

    model.save_pretrained(tmp_path / "m")
    _tiny_tokenizer().save_pretrained(tmp_path / "m")
    assert _cli(["bake", "-m", str(tmp_path / "m"), "--device", "cpu", "--steer", f"{vpath}:2",
                 "-o", str(tmp_path / "baked")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (_logits(_plain_load(tmp_path / "baked")) - _logits(model, layout, v.interventions(2.0))).abs().max() < 1e-4
    assert (tmp_path / "baked" / "tokenizer.json").exists()


# -- the real model ----------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_smollm2_bake_parity_residual_vector(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steerscale import load_model

    lm = load_model("smollm2-135m-instruct", device="cpu")
    dirs = {Site(l): _rand(576, l, norm=8.0) for l in (6, 12, 18)}
    v = SteeringVector(dirs, lm.name, fingerprint(lm.layout), "custom")
    report = bake(lm.model, lm.layout, v, 1.0, tmp_path / "smol", lm.tokenizer, verify=False)
    assert report["config_flags_set"] == ["mlp_bias"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "smol")
    ids = tok("The capital of France is Paris, and the capital of Spain is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with intervene(lm.layout, v.interventions(1.0)):
            hooked = lm.model(ids).logits
        plain = lm.model(ids).logits
        baked = AutoModelForCausalLM.from_pretrained(tmp_path / "smol", dtype=torch.float32).eval()(ids).logits
    assert (hooked - plain).abs().max() > 0.1
    assert (baked - hooked).abs().max() < 1e-4
