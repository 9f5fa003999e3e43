"""CASAL: a steering intervention amortised into one layer's MLP weights, on tiny random models."""

import json

import pytest
import torch

from steerscale import Add, Intervention, Site, SiteKind, SteerscaleError, TokenScope
from steerscale.models.loading import LoadedModel
from steerscale.steer.casal import CasalConfig, bake_casal, casal_texts, fit_casal, merged
from steerscale.steer.vector import SteeringVector, fingerprint
from tiny import TinyTokenizer, hook_count, tiny_lm, tiny_model

# word-level texts ("w5 w17 ..."), so the same texts work with the byte tokenizer and the saved HF tokenizer
TEXTS = [" ".join(f"w{(7 * i + 3 * k) % 90 + 2}" for k in range(6 + i % 4)) for i in range(12)]
KEEP = [" ".join(f"w{(11 * i + 5 * k) % 90 + 2}" for k in range(5 + i % 3)) for i in range(8)]
IDS = torch.tensor([[5, 17, 33, 2, 71, 40, 9, 88, 23, 61]])


def _vec(lm, seed=1, norm=3.0):
    v = torch.randn(lm.layout.hidden_size, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


def _add(lm, layer=1, **kw):
    return [Intervention(Site(layer), Add(_vec(lm), 1.0, **kw))]


def _snapshot(model):
    """The parameters and the hook count (transformers' own output recorders stay once a pass has recorded; the
    tiny models are shared by the tests of a process, so "no hooks" would depend on which tests ran before)."""
    return [(n, p.detach().clone()) for n, p in model.named_parameters()], hook_count(model)


def _unchanged(model, before) -> bool:
    params, hooks = before
    after = list(model.named_parameters())
    return (hook_count(model) == hooks and [n for n, _ in after] == [n for n, _ in params]
            and all(torch.equal(p, q) for (_, p), (_, q) in zip(after, params)))


@torch.no_grad()
def _logits(model):
    return model(IDS).logits


def _hf_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0", eos_token="w1")
    out.padding_side = "left"
    return out


def _lm_with_hf_tokenizer(family):
    model, layout = tiny_model(family)
    return LoadedModel(model, _hf_tokenizer(), layout, f"tiny-{family}")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gemma3"])
def test_fit_reproduces_a_constant_add_and_leaves_the_model_untouched(family):
    lm = tiny_lm(family)
    before = _snapshot(lm.model)
    forward = family == "gemma3"  # Gemma 3 norms the MLP output before the residual: a model pass per step
    res = fit_casal(lm, _add(lm), TEXTS, rank=4, steps=60 if forward else 150, lr=3e-2 if forward else 1e-2)
    assert res.fit["steer"]["before"] == pytest.approx(1.0, abs=1e-5)
    assert res.fit["steer"]["after"] < 0.25, res.fit  # most of the edit is reproduced without hooks
    assert res.losses[-1] < 0.3 * res.losses[0]
    assert res.mode == ("forward" if forward else "cached")
    assert res.layer == 1 and res.module.endswith(("down_proj", "mlp.c_proj"))
    d_in, d_out = res.params["d_in"], res.params["d_out"]
    assert res.params["trainable"] == 4 * (d_in + d_out) and res.params["merged_matrix"] == d_in * d_out
    assert res.flops["total"] > res.flops["training"] > 0 and res.seconds > 0
    assert _unchanged(lm.model, before)


def test_cached_and_forward_modes_agree():
    lm = tiny_lm("llama")
    cached = fit_casal(lm, _add(lm), TEXTS, rank=2, steps=8, lr=1e-2, batch_size=64)
    forward = fit_casal(lm, _add(lm), TEXTS, rank=2, steps=8, lr=1e-2, batch_size=64, mode="forward")
    assert cached.mode == "cached" and forward.mode == "forward"
    assert torch.allclose(torch.tensor(cached.losses), torch.tensor(forward.losses), rtol=1e-4, atol=1e-6)
    assert cached.fit["steer"]["after"] == pytest.approx(forward.fit["steer"]["after"], rel=1e-3)


def test_keep_texts_keep_their_activations():
    lm = tiny_lm("llama")
    ivs = _add(lm)
    free = fit_casal(lm, ivs, TEXTS, KEEP, rank=4, steps=150, lr=1e-2, keep_weight=0.0)
    kept = fit_casal(lm, ivs, TEXTS, KEEP, rank=4, steps=150, lr=1e-2, keep_weight=1.0)
    assert free.fit["keep"]["before"] == 0.0
    assert kept.fit["keep"]["after"] < 0.5 * free.fit["keep"]["after"], (kept.fit, free.fit)
    assert kept.fit["steer"]["after"] < 0.6  # still steers the steer texts


def test_input_dependent_edit_amortises():
    """A norm-preserving add cannot be a bias (bake refuses it); CASAL learns it."""
    lm = tiny_lm("llama")
    res = fit_casal(lm, _add(lm, preserve_norm=True), TEXTS, rank=8, steps=200, lr=1e-2)
    assert res.fit["steer"]["after"] < 0.5 * res.fit["steer"]["before"] and res.edits[0]["preserve_norm"]


def test_several_layers_train_the_deepest():
    lm = tiny_lm("llama")
    ivs = [Intervention(Site(0), Add(_vec(lm, 2), 1.0)), Intervention(Site(2, SiteKind.ATTN_OUT), Add(_vec(lm), 1.0))]
    assert fit_casal(lm, ivs, TEXTS, rank=2, steps=5).layer == 2
    assert fit_casal(lm, ivs[:1], TEXTS, rank=2, steps=5, layer=2).layer == 2  # a later block is allowed


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_baked_checkpoint_equals_the_merged_model(tmp_path, family):
    from transformers import AutoModelForCausalLM

    from steerscale import load_model

    lm = _lm_with_hf_tokenizer(family)
    before = _snapshot(lm.model)
    res = fit_casal(lm, _add(lm), TEXTS, KEEP, rank=4, steps=60, lr=1e-2)
    report = bake_casal(lm, res, tmp_path / "c")
    assert _unchanged(lm.model, before)
    with merged(lm.model, res):
        reference = _logits(lm.model)
    assert _unchanged(lm.model, before)  # merged() puts the weight back
    assert (reference - _logits(lm.model)).abs().max() > 1e-3  # the update does something
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(plain).__module__.startswith("transformers.")
    assert (_logits(plain.eval()) - reference).abs().max() < 1e-4
    again = load_model(str(tmp_path / "c"), device="cpu")
    assert (_logits(again.model) - reference).abs().max() < 1e-4
    files = {p.name for p in (tmp_path / "c").iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    record = json.loads((tmp_path / "c" / "casal.json").read_text())
    assert record["layer"] == 1 and record["fit"] == res.fit and len(record["losses"]) == 60
    assert report["check"]["reload_max_abs_diff"] < 1e-4 and report["weight"] == f"{res.module}.weight"
    with pytest.raises(SteerscaleError, match="not empty"):
        bake_casal(lm, res, tmp_path / "c")
    bake_casal(lm, res, tmp_path / "c", overwrite=True, verify=False)  # an earlier steerscale checkpoint


def test_config_validation_and_parsing():
    assert CasalConfig.parse("rank=8,steps=200") == {"rank": 8, "steps": 200}
    parsed = CasalConfig.parse("lr=0.01,mode=forward,keep_weight=2")
    assert parsed == {"lr": 0.01, "mode": "forward", "keep_weight": 2.0}
    assert CasalConfig.build(CasalConfig(rank=4), steps=7) == CasalConfig(rank=4, steps=7)
    for spec, match in [("rank", "bad CASAL setting"), ("depth=3", "bad CASAL setting"), ("rank=x", "must be a number")]:
        with pytest.raises(SteerscaleError, match=match):
            CasalConfig.parse(spec)
    for knobs, match in [({"rank": 0}, "rank"), ({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"),
                         ({"lr": float("nan")}, "lr"), ({"keep_weight": -1.0}, "keep_weight"), ({"layer": -2}, "layer"),
                         ({"mode": "fast"}, "mode"), ({"depth": 3}, "unknown CASAL setting")]:
        with pytest.raises(SteerscaleError, match=match):
            CasalConfig.build(**knobs)


def test_bad_input_is_refused_with_a_message(tmp_path):
    lm = tiny_lm("llama")
    ivs = _add(lm, layer=2)
    cases = [
        (dict(steering=ivs, texts=[]), "non-empty texts"),
        (dict(steering=[], texts=TEXTS), "needs steering edits"),
        (dict(steering=[Intervention(Site(1), Add(_vec(lm), 1.0), TokenScope.parse("last:2"))], texts=TEXTS),
         "scoped to"),
        (dict(steering=[Intervention(Site(1), Add(torch.stack([_vec(lm)] * 2), 1.0))], texts=TEXTS), "per-row"),
        (dict(steering=ivs, texts=TEXTS, layer=1), "comes before an edit in block 2"),
        (dict(steering=ivs, texts=TEXTS, layer=3), "out of range"),
        (dict(steering=ivs, texts=TEXTS, rank=33), "larger than the projection"),
        (dict(steering=[Intervention(Site(1), Add(_vec(lm), 0.0))], texts=TEXTS), "does not change"),
    ]
    for kwargs, match in cases:
        with pytest.raises(SteerscaleError, match=match):
            fit_casal(lm, **kwargs)
    gemma = tiny_lm("gemma3")
    with pytest.raises(SteerscaleError, match="mode=forward"):
        fit_casal(gemma, _add(gemma), TEXTS, mode="cached")
    moe = tiny_lm("qwen2_moe")
    with pytest.raises(SteerscaleError, match="mixture-of-experts"):
        fit_casal(moe, _add(moe), TEXTS)


def test_diverging_loss_stops_with_a_message_and_leaves_the_model_untouched():
    lm = tiny_lm("gpt2")
    before = _snapshot(lm.model)
    with pytest.raises(SteerscaleError, match="CASAL training diverged"):
        fit_casal(lm, _add(lm), TEXTS, rank=2, steps=50, lr=1e30, mode="forward")
    assert _unchanged(lm.model, before)


def test_texts_from_files(tmp_path):
    tok = _hf_tokenizer()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"positive": "w3 w4", "negative": "w3 w5"}\n{"positive": "w6 w7", "negative": "w6 w8"}\n')
    assert casal_texts(tok, pairs) == ["w3 w4", "w6 w7", "w3 w5", "w6 w8"]
    lines = tmp_path / "texts.jsonl"
    lines.write_text('{"text": "w9 w10"}\n{"prompt": "w11"}\n')
    assert casal_texts(tok, lines) == ["w9 w10", "w11"]  # no chat template: the prompt as it is
    assert len(casal_texts(TinyTokenizer(), "formal_casual")) == 80  # a bundled pairs set: both replies of 40 pairs
    with pytest.raises(SteerscaleError, match="no non-empty"):
        (tmp_path / "bad.jsonl").write_text('{"label": 1}\n')
        casal_texts(tok, tmp_path / "bad.jsonl")


def test_cli_end_to_end(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from steerscale.cli import main

    model, layout = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    _hf_tokenizer().save_pretrained(tmp_path / "m")
    v = SteeringVector({Site(1): torch.randn(32, generator=torch.Generator().manual_seed(3)) * 0.5}, "tiny",
                       fingerprint(layout), "caa")
    vpath = v.save(tmp_path / "v.safetensors")
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tmp_path / "keep.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in KEEP))
    out = tmp_path / "casal_model"
    argv = ["casal", "-m", str(tmp_path / "m"), "--device", "cpu", "--vector", f"{vpath}:2", "--texts",
            str(tmp_path / "texts.jsonl"), "--keep", str(tmp_path / "keep.jsonl"), "--rank", "4", "--steps", "80",
            "--lr", "0.01", "-o", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "relative MSE" in printed and "parameters changed" in printed and f"generate -m {out}" in printed
    record = json.loads((out / "casal.json").read_text())
    assert record["fit"]["steer"]["after"] < 0.9 and record["config"]["rank"] == 4  # keep texts pull the other way
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"
    assert main(argv) == 2 and "not empty" in capsys.readouterr().err  # no --overwrite
    assert main(argv + ["--overwrite", "--train", "keep_weight=-1"]) == 2 and "keep_weight" in capsys.readouterr().err
