"""LoFiT: learned per-head offsets, on tiny random models (training is real, just small)."""

import json
import math

import pytest
import torch

from steerscale import Site, SiteKind, SteerscaleError, intervene
from steerscale.cli import main
from steerscale.measure import mc
from steerscale.steer import lofit
from steerscale.steer.extract import extract, extract_labelled
from steerscale.steer.lofit import LofitConfig, fit_lofit, pair_items
from steerscale.steer.pairs import load_pairs
from steerscale.steer.vector import SteeringVector
from tiny import tiny_lm


def _pairs(n=8):
    return [{"prompt": f"question {i}:", "positive": " yes it is true", "negative": " no it is false"} for i in range(n)]


def _margins(lm, items, vector=None):
    ivs = vector.interventions(1.0, layout=lm.layout) if vector else []
    with torch.no_grad(), intervene(lm.layout, ivs):
        sums = mc.choice_logprob_sums(lm.model, items)
    return sums[:, 0] - sums[:, 1]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()]


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "qwen2"])
def test_lofit_learns_offsets_that_prefer_the_positive_completion(family):
    lm = tiny_lm(family)
    pairs = load_pairs(_pairs())
    items = pair_items(lm.tokenizer, pairs)
    before_state, before_flags = _snapshot(lm.model)
    hooks = _hooks(lm.model)  # the session's shared tiny model may carry transformers' own dormant recording hooks
    v = fit_lofit(lm, pairs, heads=3, epochs=4, select_epochs=1, lr=0.05, batch_size=4, progress=False)
    assert isinstance(v, SteeringVector) and v.method == "lofit" and len(v.sites) == 3
    assert all(s.kind is SiteKind.HEAD_OUT for s in v.sites)
    assert all(d.shape[0] == lm.layout.site_dim(s) for s, d in v.directions.items())
    # what training optimised (DPO margin of preferred over rejected completion) went up on the training pairs
    assert (_margins(lm, items, v) - _margins(lm, items)).mean() > 0.1
    assert v.metadata["loss_history"][-1] < v.metadata["loss_history"][0]
    # the model is exactly as before: weights, grad flags, no hooks left
    after_state, after_flags = _snapshot(lm.model)
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    assert after_flags == before_flags and _hooks(lm.model) == hooks


def test_head_selection_picks_the_heads_with_the_largest_scalings():
    lm = tiny_lm()
    v = fit_lofit(lm, _pairs(), heads=2, epochs=1, lr=0.05, select_lr=0.05, progress=False)
    norms = v.metadata["selection_norms"]
    assert len(norms) == lm.layout.n_layers * lm.layout.n_heads  # every candidate head is recorded
    chosen = {s.key() for s in v.sites}
    assert len(chosen) == 2 and min(norms[k] for k in chosen) > 0
    assert min(norms[k] for k in chosen) >= max(n for k, n in norms.items() if k not in chosen)
    assert v.metadata["select_loss_history"] and v.metadata["lofit"]["heads"] == 2
    with pytest.raises(SteerscaleError, match="have only 4"):
        fit_lofit(lm, _pairs(), heads=5, layers="1", progress=False)


def test_same_seed_same_vector():
    lm = tiny_lm()
    a, b = (fit_lofit(lm, _pairs(), heads=2, epochs=1, seed=3, progress=False) for _ in range(2))
    assert a.sites == b.sites and all(torch.equal(a.directions[s], b.directions[s]) for s in a.sites)


def test_dpo_objective_against_a_hand_computed_value():
    cfg = LofitConfig(beta=0.5)
    sums = torch.tensor([[-3.0, -5.0], [-2.0, -1.0]], dtype=torch.float64)
    ref = torch.tensor([[-4.0, -4.0], [-2.0, -2.0]], dtype=torch.float64)
    items = [mc.Item([1], [[2, 3], [4]]), mc.Item([1], [[2], [5]])]
    # margins: (1 - (-1)) = 2 and (0 - 1) = -1
    want = -(math.log(1 / (1 + math.exp(-1.0))) + math.log(1 / (1 + math.exp(0.5)))) / 2
    assert abs(float(lofit._objective(sums, ref, items, cfg)) - float(want)) < 1e-9
    sft = lofit._objective(sums, ref, items, LofitConfig(loss="sft"))  # mean NLL per token of the preferred side
    assert abs(float(sft) - (3.0 / 2 + 2.0 / 1) / 2) < 1e-9


def test_choice_logprob_sums_match_padded_scoring_and_carry_gradients():
    lm = tiny_lm()
    items = pair_items(lm.tokenizer, load_pairs(_pairs(3))) + [mc.Item([5, 6, 7], [[8], [9, 10], [11, 12, 13]])]
    padded = mc.score_items(lm.model, items, method="padded")
    sums = mc.choice_logprob_sums(lm.model, items)
    for row, r in zip(sums, padded):
        assert torch.allclose(row[: len(r["logprobs"])], torch.tensor(r["logprobs"], dtype=row.dtype), atol=1e-4)
    bias = torch.zeros(lm.layout.head_dim, requires_grad=True)
    from steerscale import Affine, Intervention

    with intervene(lm.layout, [Intervention(Site(1, SiteKind.HEAD_OUT, 0), Affine(bias=bias))]):
        mc.choice_logprob_sums(lm.model, items)[:, 0].sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0


def test_given_sites_skip_selection_and_sft_loss_raises_the_positive_likelihood():
    lm = tiny_lm()
    sites = [Site(0, SiteKind.HEAD_OUT, 1), Site(2, SiteKind.HEAD_OUT, 3)]
    items = pair_items(lm.tokenizer, load_pairs(_pairs()))
    v = fit_lofit(lm, _pairs(), sites=sites, loss="sft", epochs=5, lr=0.05, progress=False)
    assert v.sites == sites and v.metadata["select_loss_history"] == []
    with torch.no_grad():
        base = mc.choice_logprob_sums(lm.model, items)[:, 0]
        with intervene(lm.layout, v.interventions(1.0)):
            steered = mc.choice_logprob_sums(lm.model, items)[:, 0]
    assert (steered - base).mean() > 0


def test_vector_round_trips_and_scales(tmp_path):
    lm = tiny_lm()
    v = fit_lofit(lm, _pairs(), heads=2, epochs=1, progress=False)
    loaded = SteeringVector.load(v.save(tmp_path / "lofit.safetensors"))
    assert loaded.method == "lofit" and loaded.metadata["lofit"]["loss"] == "dpo"
    assert all(torch.equal(loaded.directions[s], v.directions[s]) for s in v.sites)
    assert torch.equal((2 * v).directions[v.sites[0]], 2 * v.directions[v.sites[0]])


def test_pairs_without_prompt_split_at_the_common_prefix():
    lm = tiny_lm()
    items = pair_items(lm.tokenizer, load_pairs([{"positive": "the sky is blue", "negative": "the sky is green"}]))
    assert len(items[0].prompt) > 0 and items[0].choices[0] != items[0].choices[1]
    with pytest.raises(SteerscaleError, match="share no leading token"):
        pair_items(lm.tokenizer, load_pairs([{"positive": "abc", "negative": "xyz"}]))
    with pytest.raises(SteerscaleError, match="identical"):
        pair_items(lm.tokenizer, load_pairs([{"prompt": "q", "positive": "same", "negative": "same"}]))


@pytest.mark.parametrize("knobs, match", [
    (dict(heads=0), "heads must be at least 1"),
    (dict(lr=float("nan")), "lr must be a positive finite"),
    (dict(beta=-1), "beta must be a positive"),
    (dict(loss="hinge"), "unknown LoFiT loss 'hinge'"),
    (dict(l1=float("inf")), "l1 must be"),
    (dict(epochz=2), "unknown LoFiT setting"),
])
def test_config_is_validated(knobs, match):
    with pytest.raises(SteerscaleError, match=match):
        LofitConfig.build(**knobs)


def test_parse_training_knobs():
    assert LofitConfig.parse("epochs=3,lr=0.01,loss=sft") == {"epochs": 3, "lr": 0.01, "loss": "sft"}
    with pytest.raises(SteerscaleError, match="bad LoFiT setting"):
        LofitConfig.parse("epochz=3")
    with pytest.raises(SteerscaleError, match="must be a number"):
        LofitConfig.parse("epochs=many")


def test_bad_sites_and_data():
    lm = tiny_lm()
    with pytest.raises(SteerscaleError, match="not a head_out site"):
        fit_lofit(lm, _pairs(), sites=[Site(1)], progress=False)
    with pytest.raises(SteerscaleError, match="out of range"):
        fit_lofit(lm, _pairs(), sites=[Site(9, SiteKind.HEAD_OUT, 0)], progress=False)
    with pytest.raises(SteerscaleError, match="distinct"):
        fit_lofit(lm, _pairs(), sites=[Site(1, SiteKind.HEAD_OUT, 0)] * 2, progress=False)
    with pytest.raises(SteerscaleError, match="distinct"):
        fit_lofit(lm, _pairs(), sites=[], progress=False)
    with pytest.raises(SteerscaleError, match="at least 2"):
        fit_lofit(lm, _pairs(1), progress=False)
    with pytest.raises(SteerscaleError, match="needs contrastive pairs"):
        extract_labelled(lm, [("good text", 1), ("fine text", 1), ("bad text", 0), ("awful text", 0)], "lofit")


@pytest.mark.parametrize("sites", [None, [Site(1, SiteKind.HEAD_OUT, 0)]], ids=["selection", "offsets"])
def test_an_exception_mid_training_leaves_the_model_as_before(monkeypatch, sites):
    lm = tiny_lm()
    before_state, before_flags = _snapshot(lm.model)
    hooks = _hooks(lm.model)  # the session's shared tiny model may carry transformers' own dormant recording hooks
    calls = {"n": 0}
    real = lofit.choice_logprob_sums

    def flaky(model, items, pad_id=0):
        calls["n"] += 1
        if calls["n"] == 4:  # 8 pairs in batches of 4: 2 reference calls, 1 full training step, then the failure
            raise RuntimeError("boom")
        return real(model, items, pad_id)

    monkeypatch.setattr(lofit, "choice_logprob_sums", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        fit_lofit(lm, _pairs(), sites=sites, heads=2, epochs=2, batch_size=4, progress=False)
    after_state, after_flags = _snapshot(lm.model)
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    assert after_flags == before_flags and _hooks(lm.model) == hooks


def test_extract_and_cli_route_to_lofit(tmp_path, monkeypatch, capsys):
    lm = tiny_lm()
    v = extract(lm, _pairs(), "lofit", "1-2", iti_heads=2, train="epochs=1", progress=False)
    assert v.method == "lofit" and {s.layer for s in v.sites} <= {1, 2}
    with pytest.raises(SteerscaleError, match="not by a probe sweep"):
        extract(lm, _pairs(), "lofit", return_sweep=True, progress=False)

    import steerscale.commands.steer_cmds as steer_cmds

    monkeypatch.setattr(steer_cmds, "load", lambda args: lm)
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in _pairs()))
    out = tmp_path / "v.safetensors"
    assert main(["extract", "--pairs", str(path), "--method", "lofit", "--heads", "2", "--train", "epochs=1",
                 "-o", str(out)]) == 0
    assert SteeringVector.load(out).method == "lofit"
    assert main(["extract", "--pairs", str(path), "--method", "caa", "--train", "epochs=1", "-o", str(out)]) == 2
    assert "does not train" in capsys.readouterr().err
    assert main(["extract", "--pairs", str(path), "--method", "lofit", "-o", str(tmp_path / "v.gguf")]) == 2
    assert "per attention head" in capsys.readouterr().err


@pytest.mark.integration
def test_lofit_on_smollm2_chat_pairs():
    """Real model, chat-templated prompt pairs (the bundled formal/casual set): a few steps raise the margin."""
    from steerscale.models.loading import load_model
    from steerscale.steer.pairs import bundled_pairs

    lm = load_model("smollm2-135m-instruct")
    pairs = load_pairs(bundled_pairs("formal_casual"))[:8]
    items = pair_items(lm.tokenizer, pairs)
    assert lm.tokenizer.decode(items[0].prompt).startswith("<|im_start|>")  # the chat template was applied
    sites = [Site(14, SiteKind.HEAD_OUT, 0), Site(14, SiteKind.HEAD_OUT, 3)]
    before = _margins(lm, items)
    v = fit_lofit(lm, pairs, sites=sites, epochs=3, lr=0.02, batch_size=4, progress=False)
    assert (_margins(lm, items, v) - before).mean() > 0.5
    assert torch.equal(_margins(lm, items), before) and _hooks(lm.model) == 0


def test_the_packed_scorer_has_one_home_in_the_engine():
    """measure.mc keeps its names, re-exported from engine.choices, where LoFiT reads them too."""
    from steerscale.engine import choices
    from steerscale.steer import lofit

    for name in ("Item", "encode", "build_items", "choice_logprob_sums", "sliding_window"):
        assert getattr(mc, name) is getattr(choices, name)
    assert lofit.choice_logprob_sums is choices.choice_logprob_sums
