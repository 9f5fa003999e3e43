"""GrAInS: Integrated Gradients over prompt tokens, masked-token activation differences, norm-preserving vectors."""

import json

import pytest
import torch

from steerscale import SteerscaleError, intervene
from steerscale.cli import main
from steerscale.engine.ops import apply_edit
from steerscale.measure import mc
from steerscale.models.loading import LoadedModel
from steerscale.models.sites import Site
from steerscale.steer import grains
from steerscale.steer.extract import extract
from steerscale.steer.grains import GrainsConfig, attribute, fit_grains, pair_examples, select_tokens
from steerscale.steer.pairs import load_pairs
from steerscale.steer.vector import SteeringVector
from tiny import ChatCharTokenizer, tiny_lm, tiny_model


def _pairs(n=6):
    return [{"prompt": f"question {i}: is it so?", "positive": " yes it is true", "negative": " no it is false"}
            for i in range(n)]


def _example(lm, i=0):
    return pair_examples(lm.tokenizer, load_pairs(_pairs()))[i]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()]


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family, baseline, steps", [("llama", "pad", 32), ("gpt2", "zero", 16)])
def test_integrated_gradients_add_up_to_the_change_of_the_contrast(family, baseline, steps):
    lm = tiny_lm(family)
    ex = _example(lm)
    fill = grains.pad_embedding(lm) if baseline == "pad" else None
    att = attribute(lm, ex.prompt, ex.positive, ex.negative, ex.positions, steps=steps, baseline=fill)
    total = att.f_input - att.f_baseline
    assert abs(total) > 1e-4 and abs(att.gap) < 0.02 * abs(total) + 1e-4
    assert torch.all(att.scores[[j for j in range(len(ex.prompt)) if j not in ex.positions]] == 0)


def test_the_zero_baseline_path_resolves_the_first_norm_switching_on():
    """llama's f jumps near alpha ~ 1e-3 from zero embeddings; evenly spaced points alone miss it."""
    alphas, weights = grains.path_points(16)
    assert len(alphas) == 16 and abs(float(weights.sum()) - 1) < 1e-6 and float(alphas.min()) < 1e-5
    lm = tiny_lm("llama")
    ex = _example(lm)
    att = attribute(lm, ex.prompt, ex.positive, ex.negative, ex.positions, steps=128)
    assert abs(att.gap) < 0.05 * abs(att.f_input - att.f_baseline) + 1e-4


def test_attribution_signs_flip_with_the_preferred_side_and_f_matches_the_scorer():
    lm = tiny_lm()
    ex = _example(lm)
    a = attribute(lm, ex.prompt, ex.positive, ex.negative, steps=8)
    b = attribute(lm, ex.prompt, ex.negative, ex.positive, steps=8)
    assert torch.allclose(a.scores, -b.scores, atol=1e-5) and abs(a.f_input + b.f_input) < 1e-5
    with torch.no_grad():
        sums = mc.choice_logprob_sums(lm.model, [mc.Item(ex.prompt, [ex.positive, ex.negative])])[0]
    assert abs(float(sums[0] - sums[1]) - a.f_input) < 1e-4
    top, bottom = select_tokens(a, 3)
    assert all(a.scores[j] > 0 for j in top) and all(a.scores[j] < 0 for j in bottom) and not set(top) & set(bottom)
    assert len(top) <= 3 and len(bottom) <= 3
    assert min((float(a.scores[j]) for j in top), default=0) >= max(
        (float(a.scores[j]) for j in a.positions if j not in top), default=0) or len(top) < 3


def test_only_the_users_text_is_attributed_not_the_template_or_special_tokens():
    model, layout = tiny_model("llama")

    class Special(ChatCharTokenizer):
        all_special_ids = [ChatCharTokenizer().encode("?")[0]]

    tok = Special()
    lm = LoadedModel(model, tok, layout, "tiny-llama-chat")
    ex = pair_examples(tok, load_pairs(_pairs(2)))[0]
    text = "".join(tok.decode([t]) for t in ex.prompt)
    assert text == "user: question 0: is it so?\nassistant:"
    start = len("user: ")
    # the user's text minus the special "?" token
    assert ex.positions == [j for j in range(start, start + len("question 0: is it so?")) if text[j] != "?"]
    att = attribute(lm, ex.prompt, ex.positive, ex.negative, ex.positions, steps=4)
    top, bottom = select_tokens(att, 50)  # k larger than the prompt: capped by it
    assert set(top) | set(bottom) <= set(ex.positions) and len(top) + len(bottom) <= len(ex.positions)
    v = fit_grains(lm, _pairs(4), layers="1", k=2, steps=4, progress=False)
    words = [w for r in v.metadata["examples"] for w, _ in r["positive_tokens"] + r["negative_tokens"]]
    assert words and not {"?", ":", "\n"} & set(words) - set("question 0123: is it so")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gemma3"])
def test_fit_grains_gives_finite_directions_at_the_requested_layers(family):
    lm = tiny_lm(family)
    for p in lm.model.parameters():  # the shared tiny model may carry gradients from another test's training
        p.grad = None
    before_state, before_flags = _snapshot(lm.model)
    hooks = _hooks(lm.model)  # transformers' own hooks from another test may be there already
    v = fit_grains(lm, _pairs(), layers="0,2", steps=4, progress=False)
    assert v.method == "grains" and v.sites == [Site(0), Site(2)] and v.is_residual
    assert all(torch.isfinite(d).all() and d.shape[0] == lm.layout.site_dim(s) for s, d in v.directions.items())
    assert any(float(d.norm()) > 0 for d in v.directions.values())
    meta = v.metadata
    assert meta["preserve_norm"] is True and meta["grains"]["k"] == 3 and len(meta["examples"]) == 5
    assert meta["n_pairs"] == 6 and meta["data_hash"]
    auto = fit_grains(lm, _pairs(), steps=4, aggregate="pca", progress=False)
    assert len(auto.sites) == 1 and auto.metadata["sweep"] and auto.metadata["layers"] == "auto"
    # the model is exactly as before: weights, grad flags, no gradients kept, no hooks left
    after_state, after_flags = _snapshot(lm.model)
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    assert after_flags == before_flags and _hooks(lm.model) == hooks
    assert all(p.grad is None for p in lm.model.parameters()) and torch.is_grad_enabled()


def test_pca_axis_is_oriented_and_scaled_like_the_mean():
    d = torch.tensor([[3.0, 0.1], [1.0, -0.1], [2.0, 0.0]])
    axis = grains._first_axis(d)
    assert float(axis[0]) > 0 and abs(float(axis.norm()) - 2.0) < 0.05
    plus, minus = d[:, None], torch.zeros(3, 1, 2)
    assert torch.allclose(grains.directions(plus, minus, "mean")[0], d.mean(0))


def test_vector_round_trips_with_preserve_norm_and_the_edit_keeps_norms(tmp_path):
    lm = tiny_lm()
    v = fit_grains(lm, _pairs(), layers="1", steps=4, progress=False)
    loaded = SteeringVector.load(v.save(tmp_path / "g.safetensors"))
    assert loaded.method == "grains" and loaded.metadata["preserve_norm"] is True
    assert torch.equal(loaded.directions[Site(1)], v.directions[Site(1)])
    (iv,) = loaded.interventions(50.0, layout=lm.layout)
    assert iv.edit.preserve_norm
    h = torch.randn(2, 5, lm.layout.hidden_size)
    out = apply_edit(iv.edit, h)
    assert torch.allclose(out.norm(dim=-1), h.norm(dim=-1), rtol=1e-4) and not torch.allclose(out, h)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), intervene(lm.layout, loaded.interventions(50.0)):
        steered = lm.model(ids).logits
    assert torch.isfinite(steered).all() and not torch.allclose(steered, lm.model(ids).logits)


@pytest.mark.parametrize("pairs, knobs, match", [
    ([], {}, "at least 2"),
    (_pairs(1), {}, "at least 2"),
    (_pairs(), dict(k=0), "k must be an integer of at least 1"),
    (_pairs(), dict(steps=-1), "steps must be"),
    (_pairs(), dict(aggregate="median"), "unknown GrAInS aggregate 'median'"),
    (_pairs(), dict(baseline="noise"), "unknown GrAInS baseline"),
    (_pairs(), dict(kk=3), "unknown GrAInS setting"),
    ([{"prompt": "q", "positive": "same", "negative": "same"}] * 2, {}, "identical"),
    ([{"positive": "abc", "negative": "xyz"}] * 2, {}, "no tokens of its own"),
])
def test_bad_input_is_refused(pairs, knobs, match):
    with pytest.raises(SteerscaleError, match=match):
        fit_grains(tiny_lm(), pairs, progress=False, **knobs)


def test_parse_knobs():
    assert GrainsConfig.parse("k=5,steps=32,aggregate=pca") == {"k": 5, "steps": 32, "aggregate": "pca"}
    with pytest.raises(SteerscaleError, match="bad GrAInS setting"):
        GrainsConfig.parse("epochs=3")
    with pytest.raises(SteerscaleError, match="must be a number"):
        GrainsConfig.parse("k=many")


def test_extract_and_cli_route_to_grains(tmp_path, monkeypatch, capsys):
    lm = tiny_lm()
    v = extract(lm, _pairs(), "grains", "1-2", train="k=2,steps=4", progress=False)
    assert v.method == "grains" and v.sites == [Site(1), Site(2)] and v.metadata["grains"]["k"] == 2
    with pytest.raises(SteerscaleError, match="not by a probe sweep"):
        extract(lm, _pairs(), "grains", return_sweep=True, progress=False)

    import steerscale.commands.steer_cmds as steer_cmds

    loads = []
    monkeypatch.setattr(steer_cmds, "load", lambda args: loads.append(1) or lm)
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in _pairs()))
    out = tmp_path / "v.safetensors"
    assert main(["extract", "--pairs", str(path), "--method", "grains", "--layers", "1", "--train", "k=2,steps=4",
                 "-o", str(out)]) == 0
    loaded = SteeringVector.load(out)
    assert loaded.method == "grains" and loaded.metadata["preserve_norm"] is True and loaded.sites == [Site(1)]
    n = len(loads)
    assert main(["extract", "--pairs", str(path), "--method", "grains", "--train", "k=0", "-o", str(out)]) == 2
    assert "k must be" in capsys.readouterr().err
    assert main(["extract", "--pairs", str(path), "--method", "grains", "-o", str(tmp_path / "v.gguf")]) == 2
    assert "cannot" in capsys.readouterr().err and len(loads) == n  # both refused before the model loads
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    assert "--method grains" in capsys.readouterr().out


@pytest.mark.integration
def test_grains_on_smollm2_chat_pairs():
    """Real model, chat-templated prompts: the system prompt and template are never attributed."""
    from steerscale.models.loading import load_model
    from steerscale.steer.pairs import bundled_pairs

    lm = load_model("smollm2-135m-instruct")
    pairs = load_pairs(bundled_pairs("formal_casual"))[:2]
    ex = pair_examples(lm.tokenizer, pairs)[0]
    assert lm.tokenizer.decode([ex.prompt[j] for j in ex.positions]) == pairs[0].prompt
    v = fit_grains(lm, pairs, layers="15", steps=1, progress=False)  # a smoke test: one IG point
    assert v.sites == [Site(15)] and float(v.directions[Site(15)].norm()) > 0 and _hooks(lm.model) == 0
