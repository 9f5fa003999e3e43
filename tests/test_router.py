"""MoE router steering (``steer.router``, ``steerscale experts``) on tiny random qwen2_moe and mixtral models."""

import dataclasses
import json

import pytest
import torch

from steerscale import SteerscaleError
from steerscale.cli import build_parser, main
from steerscale.commands.experts_cmd import check_args, format_table, read_prompts, report
from steerscale.engine.runtime import intervene
from steerscale.models.sites import Site, SiteKind
from steerscale.steer.router import (ExpertContrast, expert_contrast, expert_usage, router_vector,
                                     router_vector_from_contrast)
from steerscale.steer.vector import SteeringVector, fingerprint
from tiny import TinyTokenizer, tiny_lm, tiny_model

MOE = ["qwen2_moe", "mixtral"]
TEXTS = ["hello there friend", "a b", "the quick brown fox jumps", "zz", "router steering on a tiny model"]
TOK = TinyTokenizer()


@pytest.mark.parametrize("family", MOE)
def test_usage_rows_sum_to_top_k_and_ignore_padding(family):
    model, layout = tiny_model(family)
    usage = expert_usage(model, TOK, layout, TEXTS)
    assert sorted(usage) == [0, 1, 2]
    for row in usage.values():
        assert row.shape == (4,) and ((row >= 0) & (row <= 1)).all()
        assert float(row.sum()) == pytest.approx(2.0, abs=1e-5)  # top_k = 2: each token counts twice
    # Texts of different lengths are left-padded in a batch; one text a batch has no padding. Same usage: padding
    # positions (routed too) are not counted.
    alone = expert_usage(model, TOK, layout, TEXTS, batch_size=1)
    assert all(torch.allclose(usage[k], alone[k], atol=1e-6) for k in usage)
    assert sorted(expert_usage(model, TOK, layout, TEXTS, layers=[1])) == [1]


@pytest.mark.parametrize("family", MOE)
def test_large_bias_forces_and_forbids_an_expert(family):
    model, layout = tiny_model(family)
    vector = router_vector(layout, {1: {2: 50.0}}, model_name=f"tiny-{family}")
    assert vector.sites == [Site(1, SiteKind.ROUTER)]
    assert vector.directions[Site(1, SiteKind.ROUTER)].tolist() == [0.0, 0.0, 50.0, 0.0]
    base = expert_usage(model, TOK, layout, TEXTS)
    assert 0 < float(base[1][2]) < 1  # not already always/never chosen: the test below is not vacuous
    toward = expert_usage(model, TOK, layout, TEXTS, interventions=vector.interventions(1.0, layout=layout))
    away = expert_usage(model, TOK, layout, TEXTS, interventions=vector.interventions(-1.0, layout=layout))
    assert float(toward[1][2]) == 1.0 and float(away[1][2]) == 0.0
    assert torch.equal(toward[0], base[0]) and torch.equal(away[0], base[0])  # layers before the edit: untouched
    # the model's output changes too (the runtime re-routes from the edited logits), and nothing stays attached
    ids = torch.randint(2, 90, (2, 6))
    with intervene(layout, vector.interventions(1.0, layout=layout)):
        steered = model(ids).logits
    assert not torch.allclose(steered, model(ids).logits, atol=1e-4)
    assert torch.equal(expert_usage(model, TOK, layout, TEXTS)[1], base[1])


def test_contrast_finds_a_planted_difference_and_builds_a_vector(tmp_path):
    """Positive usage is read under a known router bias (+3 on layer 1 expert 3): the contrast must rank that
    expert first, and the vector built from it must bias exactly it."""
    model, layout = tiny_model("qwen2_moe")
    plant = router_vector(layout, {1: {3: 3.0}})
    pos = expert_usage(model, TOK, layout, TEXTS, interventions=plant.interventions(1.0, layout=layout))
    contrast = ExpertContrast(pos, expert_usage(model, TOK, layout, TEXTS), 100, 100)
    (layer, expert, diff), = contrast.top(1)
    assert (layer, expert) == (1, 3) and diff > 0.2
    assert all(d < 0 for _, _, d in contrast.top(10, sign=-1)) and contrast.top(10, sign=-1)
    assert contrast.table()[0] == contrast.row(1, 3) and len(contrast.table()) == 3 * 4
    vec = router_vector_from_contrast(layout, contrast, k=1, bias=2.5, model_name="tiny-qwen2_moe")
    assert vec.directions[Site(1, SiteKind.ROUTER)].tolist() == [0.0, 0.0, 0.0, 2.5]
    assert vec.metadata["contrast"]["chosen"][0]["expert"] == 3 and vec.method == "router"
    away = router_vector_from_contrast(layout, contrast, k=1, bias=2.5, away=True)
    assert away.directions[Site(1, SiteKind.ROUTER)].tolist() == [0.0, 0.0, 0.0, -2.5]
    contrast.plot(tmp_path / "experts.png")
    assert (tmp_path / "experts.png").stat().st_size > 1000


def test_identical_sets_have_no_contrast():
    model, layout = tiny_model("mixtral")
    contrast = expert_contrast(model, TOK, layout, TEXTS, TEXTS, layers="0-1")
    assert contrast.layers == [0, 1] and contrast.n_tokens_pos == contrast.n_tokens_neg > 0
    assert all(float(d.abs().max()) == 0 for d in contrast.diff.values()) and contrast.top(5) == []
    with pytest.raises(SteerscaleError, match="no expert is used more"):
        router_vector_from_contrast(layout, contrast)


def test_vector_round_trips_and_refuses_another_model(tmp_path):
    _, qwen = tiny_model("qwen2_moe")
    _, mixtral = tiny_model("mixtral")
    vec = router_vector(qwen, {0: {1: 4.0}, 2: {0: -4.0, 3: 1.5}}, model_name="tiny-qwen2_moe")
    loaded = SteeringVector.load(vec.save(tmp_path / "router.safetensors"))
    assert loaded.model_fingerprint == fingerprint(qwen) and loaded.method == "router"
    assert loaded.metadata["biases"] == {"0": {"1": 4.0}, "2": {"0": -4.0, "3": 1.5}}
    assert all(torch.equal(loaded.directions[s], vec.directions[s]) for s in vec.sites)
    assert len(loaded.interventions(2.0, layout=qwen)) == 2
    with pytest.raises(SteerscaleError, match="fingerprint"):
        loaded.interventions(1.0, layout=mixtral)


def test_dense_models_and_bad_inputs_are_refused():
    llama, dense = tiny_model("llama")
    with pytest.raises(SteerscaleError, match="dense") as exc:
        expert_usage(llama, TOK, dense, TEXTS)
    assert "MoE model" in exc.value.hint
    with pytest.raises(SteerscaleError, match="dense"):
        router_vector(dense, {0: {0: 1.0}})
    model, layout = tiny_model("mixtral")
    for biases, message in [({1: {4: 1.0}}, "expert 4 is out of range"), ({1: {-1: 1.0}}, "out of range"),
                            ({1: {0: float("nan")}}, "finite"), ({3: {0: 1.0}}, "out of range"),
                            ({}, "no router biases"), ({1: {}}, "no expert biases")]:
        with pytest.raises(SteerscaleError, match=message):
            router_vector(layout, biases)
    # a model whose layer 1 has a dense MLP (qwen2_moe's mlp_only_layers)
    partial = dataclasses.replace(layout, routers=[layout.routers[0], None, layout.routers[2]])
    with pytest.raises(SteerscaleError, match="dense MLP") as exc:
        router_vector(partial, {1: {0: 1.0}})
    assert "0,2" in exc.value.hint
    with pytest.raises(SteerscaleError, match="dense MLP"):
        expert_usage(model, TOK, partial, TEXTS, layers=[1])
    assert sorted(expert_usage(model, TOK, partial, TEXTS)) == [0, 2]
    with pytest.raises(SteerscaleError, match="no texts"):
        expert_usage(model, TOK, layout, [])


# -- the command ---------------------------------------------------------------------------------------------------


def test_experts_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["experts", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--positive" in out and "--away" in out and "steerscale experts -m" in out


def test_read_prompts(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  second prompt  \n")
    assert read_prompts(txt) == ["first prompt", "second prompt"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"text": "a"}\n\n{"instruction": "b", "output": "x"}\n{"prompt": "c"}\n')
    assert read_prompts(jl) == ["a", "b", "c"]
    for content, message in [('{"answer": "a"}\n', "p.jsonl:1: no non-empty"), ("{oops\n", "not valid JSON"),
                             ("\n", "has no prompts")]:
        jl.write_text(content)
        with pytest.raises(SteerscaleError, match=message):
            read_prompts(jl)
    with pytest.raises(SteerscaleError, match="not found"):
        read_prompts(tmp_path / "missing.txt")


def _args(*extra):
    return build_parser().parse_args(["experts", "--positive", "p.txt", "--negative", "n.txt", *extra])


def test_check_args_refuses_before_loading():
    check_args(_args("-o", "v.safetensors"))
    for extra, message in [(["-o", "v.gguf"], "safetensors"), (["--top", "0"], "--top"),
                           (["--bias", "-1"], "--bias"), (["--bias", "nan"], "--bias")]:
        with pytest.raises(SteerscaleError, match=message):
            check_args(_args(*extra))


def test_report_on_a_tiny_model(tmp_path):
    """The command's body on a tiny model (``run`` only adds file reading and model loading)."""
    lm = tiny_lm("qwen2_moe")
    out_vec = tmp_path / "experts.safetensors"
    args = _args("--layers", "1-2", "--show", "3", "-o", str(out_vec), "--top", "2", "--bias", "40")
    out = report(lm, args, ["def f(x): return x", "for i in range(3): pass"], ["the cat sat", "a sunny day outside"])
    assert out["layers"] == [1, 2] and len(out["top"]) == 3 and out["n_experts"] == 4
    json.dumps(out)  # what --json prints
    vec = SteeringVector.load(out_vec)
    assert {s.layer for s in vec.sites} <= {1, 2} and vec.model_fingerprint == fingerprint(lm.layout)
    for row in out["vector"]["chosen"]:  # bias 40 forces the chosen experts on the negative prompts
        assert row["diff"] > 0 and row["steered_usage"] == 1.0
    assert "layer" in format_table(out["top"]).splitlines()[0]
