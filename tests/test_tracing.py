"""Causal tracing (steer.tracing): exactness of restoration, batching, files, layer specs, errors, the CLI."""

import dataclasses
import json

import pytest
import torch
from tiny import ChatCharTokenizer, CharTokenizer, tiny_lm, tiny_model

from steerscale.errors import SteerscaleError
from steerscale.models.loading import LoadedModel
from steerscale.models.sites import Site
from steerscale.steer.layers import parse_layers
from steerscale.steer.tracing import (CLASSES, TraceCase, TraceResult, aggregate, clean_run, encode_case,
                                      metric_of, position_class, run_rows, trace, trace_many)

PROMPT, TARGET, FOIL = "the cat sat on a mat", " and", " but"


def _lm(family="llama", tokenizer=None):
    model, layout = tiny_model(family)
    return LoadedModel(model, tokenizer or CharTokenizer(), layout, f"tiny-{family}")


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gemma3"])
def test_restoring_every_position_at_a_layer_gives_the_clean_run(family):
    lm = _lm(family)
    hooks = _hooks(lm.model)  # the shared tiny model may carry transformers' own hooks from another test
    enc = encode_case(lm.tokenizer, TraceCase(PROMPT, TARGET, FOIL, subject="cat"))
    sites = [Site(i) for i in range(lm.layout.n_layers)]
    clean_sums, clean = clean_run(lm, enc, sites)
    width = len(enc.item.prompt) + sum(map(len, enc.item.choices))
    noise = torch.randn(3, len(enc.corrupt), lm.layout.hidden_size, generator=torch.Generator().manual_seed(0)) * 5
    corrupted = run_rows(lm, enc, noise, {}, clean)
    assert (corrupted - clean_sums).abs().max() > 1e-3  # the noise does something
    for site in sites:
        every = torch.ones(3, width, dtype=torch.bool)  # prompt and continuations
        restored = run_rows(lm, enc, noise, {site: every}, clean)
        torch.testing.assert_close(restored, clean_sums.expand(3, -1), atol=1e-5, rtol=0)
    # A one-token target is predicted at the last prompt token: restoring the prompt alone is enough.
    one = encode_case(lm.tokenizer, TraceCase(PROMPT + " ", "x", subject="cat"))
    assert len(one.item.choices[0]) == 1
    sums1, clean1 = clean_run(lm, one, sites)
    mask = torch.zeros(3, len(one.item.prompt) + 1, dtype=torch.bool)
    mask[:, : len(one.item.prompt)] = True
    for site in sites:
        torch.testing.assert_close(run_rows(lm, one, noise, {site: mask}, clean1), sums1.expand(3, -1), atol=1e-5,
                                   rtol=0)
    assert _hooks(lm.model) == hooks


@pytest.mark.parametrize("kind", ["resid_post", "mlp_out", "attn_out", "head_out"])
def test_zero_noise_leaves_the_clean_metric_and_no_effect(kind):
    lm = _lm("qwen2")
    r = trace(lm, PROMPT, TARGET, subject="sat on", kind=kind, noise=0.0, samples=2, metric="logprob", progress=False)
    assert r.corrupted == pytest.approx(r.clean, abs=1e-5)
    assert float(r.effects.abs().max()) < 1e-5
    shape = (3, lm.layout.n_heads) if kind == "head_out" else (3, len(r.tokens) - r.corrupt[0])
    assert tuple(r.effects.shape) == shape


@pytest.mark.parametrize("kind", ["resid_post", "mlp_out", "head_out"])
def test_batched_rows_equal_each_restoration_alone(kind):
    lm = _lm("llama")
    kw = dict(subject="cat", kind=kind, samples=2, noise=4.0, metric="contrast", window=2, positions=[4, 6, 9, -1],
              progress=False)
    many = trace(lm, PROMPT, TARGET, FOIL, batch_size=64, **kw)
    alone = trace(lm, PROMPT, TARGET, FOIL, batch_size=1, **kw)
    torch.testing.assert_close(many.effects, alone.effects, atol=1e-5, rtol=0)
    assert many.corrupted == pytest.approx(alone.corrupted, abs=1e-5)
    assert float(many.effects.abs().max()) > 1e-4  # something was measured (tiny random models: small effects)
    if kind == "resid_post":  # restoring the last layer at the last prompt token brings back the prediction
        exact = trace(lm, PROMPT + " ", "x", subject="cat", kind=kind, samples=2, noise=4.0, metric="logprob",
                      layers=[2], positions=[-1], progress=False)
        assert exact.effects[0, 0].item() == pytest.approx(exact.clean - exact.corrupted, abs=1e-5)


def test_position_trace_matches_a_hand_made_restore():
    lm = _lm("gpt2")
    r = trace(lm, PROMPT, TARGET, subject="cat", samples=2, noise=3.0, metric="logprob", layers=[1], seed=7,
              progress=False)
    enc = encode_case(lm.tokenizer, TraceCase(PROMPT, TARGET, subject="cat"))
    _, clean = clean_run(lm, enc, [Site(1)])
    draws = torch.randn(2, len(enc.corrupt), lm.layout.hidden_size, generator=torch.Generator().manual_seed(7))
    draws = draws * r.metadata["noise_std"]
    col = r.columns[3]
    mask = torch.zeros(2, len(enc.item.prompt) + len(enc.item.choices[0]), dtype=torch.bool)
    mask[:, col] = True
    restored = metric_of(run_rows(lm, enc, draws, {Site(1): mask}, clean), "logprob").double().mean()
    corrupted = metric_of(run_rows(lm, enc, draws, {}, clean), "logprob").double().mean()
    assert r.effects[0, 3].item() == pytest.approx((restored - corrupted).item(), abs=1e-5)


def test_hooks_never_leak_after_an_error_inside():
    lm = _lm("llama")
    enc = encode_case(lm.tokenizer, TraceCase(PROMPT, TARGET, subject="cat"))
    hooks = _hooks(lm.model)  # the shared tiny model may carry transformers' own hooks from another test
    before = clean_run(lm, enc, [Site(1)])[0]
    assert _hooks(lm.model) == hooks
    bad = {Site(1): torch.zeros(4, lm.layout.hidden_size)}  # wrong width: the edit raises mid-forward
    with pytest.raises(SteerscaleError, match="do not fit"):
        run_rows(lm, enc, None, {Site(1): torch.ones(1, 30, dtype=torch.bool)}, bad)
    assert _hooks(lm.model) == hooks
    torch.testing.assert_close(clean_run(lm, enc, [Site(1)])[0], before, atol=0, rtol=0)


def test_subject_span_inside_the_chat_template():
    tok = ChatCharTokenizer()
    enc = encode_case(tok, TraceCase("Where is the Eiffel Tower?", " Paris", subject="Eiffel Tower"))
    assert enc.chat and "".join(enc.tokens[c] for c in enc.corrupt).strip() == "Eiffel Tower"
    whole = encode_case(tok, TraceCase("Where is it?", "Paris"))
    assert "".join(whole.tokens[c] for c in whole.corrupt) == "Where is it?"  # the user text, not the template
    assert whole.corrupt[0] == len("user: ")
    raw = encode_case(tok, TraceCase("Where is it?", "Paris"), chat=False)
    assert raw.corrupt == tuple(range(len("Where is it?"))) and raw.item.choices[0] == tok.encode(" Paris")


def test_file_round_trip_heatmaps_and_layer_specs(tmp_path):
    lm = _lm("llama")
    r = trace(lm, PROMPT, TARGET, FOIL, subject="cat", samples=2, progress=False)
    path = r.save(tmp_path / "trace.json")
    back = TraceResult.load(path)
    for f in dataclasses.fields(TraceResult):
        a, b = getattr(r, f.name), getattr(back, f.name)
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        else:
            assert a == b, f.name
    assert json.loads(path.read_text())["format"] == "steerscale.trace"
    assert r.heatmap(tmp_path / "t.png").stat().st_size > 1000
    top = r.top_layers(3)
    assert sorted(top) == [0, 1, 2] and r.layer_scores()[top[0]] == max(r.layer_scores().values())
    assert parse_layers(str(path), 3) == [top[0]]
    assert parse_layers(f"{path}:2", 3) == sorted(top[:2])
    assert parse_layers(path, 3) == [top[0]]  # a Path too
    with pytest.raises(SteerscaleError, match="3 blocks"):
        parse_layers(str(path), 30)
    with pytest.raises(SteerscaleError, match="not found"):
        parse_layers(str(tmp_path / "none.json"), 3)
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(SteerscaleError, match="not a steerscale trace"):
        parse_layers(str(tmp_path / "other.json"), 3)
    assert parse_layers("auto", 3) == "auto" and parse_layers("0-1", 3) == [0, 1] and parse_layers("2,0", 3) == [0, 2]
    with pytest.raises(SteerscaleError, match="bad layer spec"):
        parse_layers("x", 3)
    # Extraction takes the trace's top layer as its layer.
    from steerscale.steer.extract import extract

    pairs = [{"positive": f"good kind lovely {i} " * 2, "negative": f"bad rude awful {i} " * 2} for i in range(8)]
    vec = extract(tiny_lm(), pairs, layers=str(path), progress=False)
    assert [s.layer for s in vec.directions] == [top[0]]


def test_aggregate_over_prompts_by_position_class(tmp_path):
    lm = _lm("llama")
    cases = [TraceCase(PROMPT, TARGET, subject="cat"), {"prompt": "a dog ran far away", "target": " x",
                                                        "subject": "dog ran"}]
    results = trace_many(lm, cases, samples=2, metric="logprob", progress=False)
    agg = aggregate(results)
    assert agg.axis == "class" and agg.labels == CLASSES and agg.metadata["n_prompts"] == 2
    r0 = results[0]
    last = len(r0.tokens) - 1
    classes = [position_class(c, r0.corrupt, last) for c in r0.columns]
    assert classes[0] == "first corrupted" and classes[-1] == "last token" and "first after" in classes
    # The "last token" class is the mean of each prompt's last column.
    want = torch.stack([r.effects[:, -1] for r in results]).mean(0)
    torch.testing.assert_close(agg.effects[:, CLASSES.index("last token")], want, atol=1e-9, rtol=0)
    assert agg.heatmap(tmp_path / "agg.png").is_file()
    TraceResult.load(agg.save(tmp_path / "agg.json"))
    heads = aggregate(trace_many(lm, cases[:1] * 2, kind="head_out", samples=1, progress=False))
    assert heads.axis == "head" and heads.effects.shape == (3, lm.layout.n_heads)


def test_bad_inputs_are_named():
    lm = _lm("llama")
    hooks = _hooks(lm.model)
    cases = [
        (dict(prompt="", target=" x"), "empty prompt"),
        (dict(prompt="   ", target=" x"), "empty prompt"),
        (dict(prompt=PROMPT, target=""), "empty target"),
        (dict(prompt=PROMPT, target=" x", subject="dog"), "not found in prompt"),
        (dict(prompt=PROMPT, target=" x", layers=[3]), "out of range"),
        (dict(prompt=PROMPT, target=" x", layers=[]), "no layers"),
        (dict(prompt=PROMPT, target=" x", kind="mlp"), "unknown trace kind"),
        (dict(prompt=PROMPT, target=" x", metric="contrast"), "needs a foil"),
        (dict(prompt=PROMPT, target=" x", foil=" x"), "foil equals target"),
        (dict(prompt=PROMPT, target=" x", samples=0), "samples"),
        (dict(prompt=PROMPT, target=" x", noise=float("nan")), "noise"),
        (dict(prompt=PROMPT, target=" x", positions=[99]), "outside the prompt"),
        (dict(prompt=PROMPT, target=" x", head_positions="some"), "head_positions"),
    ]
    for kw, message in cases:
        with pytest.raises(SteerscaleError, match=message):
            trace(lm, progress=False, samples=kw.pop("samples", 1), **kw)
    headless = LoadedModel(lm.model, lm.tokenizer, dataclasses.replace(lm.layout, n_heads=0), "headless")
    with pytest.raises(SteerscaleError, match="no attention heads"):
        trace(headless, PROMPT, " x", kind="head_out", progress=False)
    with pytest.raises(SteerscaleError, match="some cases have a foil"):
        trace_many(lm, [TraceCase(PROMPT, " x", " y"), TraceCase(PROMPT, " x")], progress=False)
    with pytest.raises(SteerscaleError, match="different kinds"):
        aggregate([trace(lm, PROMPT, " x", samples=1, progress=False),
                   trace(lm, PROMPT, " x", samples=1, kind="mlp_out", progress=False)])
    assert _hooks(lm.model) == hooks


def test_cli_traces_a_tiny_model_end_to_end(tmp_path, capsys, monkeypatch):
    from steerscale.cli import build_parser, main
    from steerscale.commands import trace_cmd

    lm = _lm("llama")
    monkeypatch.setattr(trace_cmd, "load", lambda args: lm)
    out, png = tmp_path / "t.json", tmp_path / "t.png"
    argv = ["trace", "-p", PROMPT, "--target", TARGET, "--foil", FOIL, "--subject", "cat", "--samples", "2",
            "-o", str(out), "--plot", str(png)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "top layers" in text and f"--layers {out}:1" in text and out.is_file() and png.is_file()
    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(json.dumps(d) for d in ({"prompt": PROMPT, "target": " x", "subject": "cat"},
                                                       {"prompt": "a dog ran", "target": " y"})))
    assert main(["trace", "--prompts", str(facts), "--samples", "1", "--kind", "attn_out", "--layers", "1-2",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_prompts"] == 2 and summary["kind"] == "attn_out" and set(summary["top_layers"]) <= {1, 2}
    for bad, message in ((["trace", "-p", PROMPT], "needs a prompt and a target"),
                         (["trace", "-p", PROMPT, "--target", " x", "-o", "t.safetensors"], "written as .json"),
                         (["trace", "-p", PROMPT, "--target", " x", "--subject", "zebra"], "not found in prompt"),
                         (["trace", "--prompts", str(facts), "-p", "x"], "exclusive")):
        assert main(bad) == 2
        assert message in capsys.readouterr().err
    args = build_parser().parse_args(argv)
    assert trace_cmd.report(lm, args)["top_layers"]


@pytest.mark.integration
def test_cli_traces_smollm2(tmp_path, capsys):
    from steerscale.cli import main

    out = tmp_path / "t.json"
    assert main(["trace", "-p", "The Eiffel Tower is located in the city of", "--target", " Paris", "--subject",
                 "Eiffel Tower", "--no-chat", "--layers", "4,12", "--samples", "2", "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    result = TraceResult.load(out)
    assert summary["clean"] > summary["corrupted"] and result.clean > 0.2
    assert "".join(result.tokens[c] for c in result.corrupt).strip() == "Eiffel Tower"
    assert parse_layers(f"{out}:2", 30) == sorted(result.top_layers(2))
