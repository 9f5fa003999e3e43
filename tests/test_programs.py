"""Inference programs (scale/programs): pipelines as data, checked at load, run within one budget, usable as the
``program`` strategy, and searched with optuna. Tiny random llama with a long context (fusion prompts are long)."""

import json

import pytest
import torch

from steerscale import SteerscaleError
from steerscale.scale import Budget, LocalBackend, StrategySpec
from steerscale.scale.programs import PROGRAMS, STAGES, Program, load_program
from steerscale.scale.programs.search import Problem, TotalSpent, evaluate, search

BUDGET_KEYS = ("generated_tokens", "prompt_tokens", "verifier_passes", "verifier_tokens", "judge_calls")


def _long_llama():
    import transformers
    from steerscale.models.layout import find_layout
    from tiny import FAMILIES

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**FAMILIES["llama"][1], "max_position_embeddings": 2048})
    model = transformers.LlamaForCausalLM(config).eval()
    return model, find_layout(model)


@pytest.fixture(scope="module")
def lm():
    return _long_llama()


@pytest.fixture(scope="module")
def be(lm):
    from tiny import CharTokenizer

    return LocalBackend(lm[0], CharTokenizer(), lm[1], chat=False, max_n=32)


def gen(**knobs):
    return {"type": "generate", "strategy": "majority", "knobs": {"n": 3, "max_tokens": 8, **knobs}}


# -- a program is data, checked at load ---------------------------------------------------------------------
@pytest.mark.parametrize("config, needle", [
    ({"stages": [{"type": "genrate"}]}, "did you mean 'generate'"),
    ({"stages": [gen(), {"type": "rank", "topk": 2}]}, "did you mean 'top_k'"),
    ({"stages": [gen(), {"type": "rank", "top_k": 0}]}, "'top_k' must be a number >= 1"),
    ({"stages": [gen(), {"type": "rank", "verifier": "nope"}]}, "unknown verifier"),
    ({"stages": [gen(), {"type": "fuse", "temperature": "hot"}]}, "'temperature' must be a finite number"),
    ({"stages": [{"type": "generate", "strategy": "majority", "knobs": {"nn": 3}}]}, "did you mean 'n'"),
    ({"stages": [{"type": "generate", "strategy": "best_of_m"}]}, "unknown strategy"),
    ({"stages": [{"type": "generate", "strategy": "program"}]}, "cannot run a program"),
    ({"stages": [{"type": "generate", "keep": "some"}]}, "unknown value 'some'"),
    ({"stages": [{"type": "fuse"}, gen()]}, "no candidates to work on"),
    ({"stages": [{"type": "prompt", "preset": "cot"}]}, "at least one generate"),
    ({"stages": [{"type": "prompt", "preset": "cot", "text": "x"}, gen()]}, "exactly one of"),
    ({"stages": [{"type": "prompt", "preset": "cto"}, gen()]}, "did you mean 'cot'"),
    ({"stages": [gen()], "select": "median"}, "unknown program select"),
    ({"stages": [gen()], "layers": 2}, "no field 'layers'"),
    ({"stages": []}, "non-empty \"stages\""),
])
def test_bad_program_fails_at_load_naming_the_problem(config, needle):
    with pytest.raises(SteerscaleError, match=None) as err:
        load_program(config)
    assert needle in str(err.value), str(err.value)
    # the same refusal through the strategy spec (solve, eval and the server build one before any model work)
    with pytest.raises(SteerscaleError) as err2:
        StrategySpec.from_json({"name": "program", "program": json.dumps(config)})
    assert needle in str(err2.value) and "knob 'program'" in str(err2.value)


def test_server_answers_400_for_a_bad_program():
    from steerscale.serve.schema import ApiError, read_strategy

    with pytest.raises(ApiError) as err:
        read_strategy({"name": "program", "program": '{"stages": [{"type": "critic"}]}'}, {})
    assert err.value.status == 400 and "unknown stage 'critic'" in err.value.message
    ok = read_strategy({"name": "program", "program": "critique_fuse"}, {})
    assert ok.name == "program" and ok.knobs["program"] == "critique_fuse"


def test_program_sources_and_round_trip(tmp_path):
    config = {"name": "mine", "stages": [{"type": "prompt", "preset": "cautious"}, gen(temperature=0.5),
                                         {"type": "rank", "verifier": "logprob", "top_k": 2}, {"type": "fuse"}],
              "select": "first"}
    p = load_program(config)
    assert Program.from_json(p.to_dict()) == p and [s.type for s in p.stages] == ["prompt", "generate", "rank", "fuse"]
    path = tmp_path / "prog.json"
    path.write_text(json.dumps(config))
    assert load_program(str(path)) == p and load_program(json.dumps(config)) == p
    yaml = pytest.importorskip("yaml")
    ypath = tmp_path / "prog.yaml"
    ypath.write_text(yaml.safe_dump(config))
    assert load_program(ypath) == p
    with pytest.raises(SteerscaleError, match="does not exist"):
        load_program(str(tmp_path / "missing.json"))
    with pytest.raises(SteerscaleError, match="unknown program"):
        load_program("generate_rank_fuze")
    for name in PROGRAMS:  # every ready-made program is valid data
        assert load_program(name).name == name
    spec = StrategySpec.of("program", program=config)  # a dict from Python is kept as JSON text
    assert json.loads(spec.to_dict()["knobs"]["program"])["name"] == "mine"


# -- running --------------------------------------------------------------------------------------------------
def test_every_ready_made_program_runs_as_a_strategy(be):
    for name in PROGRAMS:
        spec = StrategySpec.of("program", program=name, budget="tokens=60")
        r = spec.run("Calculate 2 + 3.", be)
        assert r.strategy == "program" and r.info["program"] == name
        assert [t["type"] for t in r.info["trace"]] == [s.type for s in load_program(name).stages]
        assert r.best is not None and r.budget["spent"]["generated_tokens"] <= 60
        again = spec.run("Calculate 2 + 3.", be)  # seeded: the same run twice
        assert again.best.text == r.best.text and again.budget["spent"]["generated_tokens"] == \
            r.budget["spent"]["generated_tokens"]


def test_strategy_knobs_and_verifier_reach_the_program(be):
    bare = {"type": "generate", "strategy": "majority", "knobs": {"n": 3}}
    spec = StrategySpec.of("program", program={"stages": [bare], "select": "best"}, max_tokens=3, verifier="logprob")
    r = spec.run("Calculate 7 - 2.", be)
    assert all(c.n_tokens <= 3 and c.score is not None for c in r.candidates)  # the spec's max_tokens reached it
    assert r.best.score == max(c.score for c in r.candidates)  # the spec's verifier chose
    own = StrategySpec.of("program", program={"stages": [gen(n=3, max_tokens=8)]}, max_tokens=3)
    assert max(c.n_tokens for c in own.run("Calculate 7 - 2.", be).candidates) > 3  # a stage's own knob wins


def test_stages_do_what_they_say(be):
    base = load_program({"stages": [gen(n=4)]}).run("Calculate 7 - 2.", be)
    assert len(base.candidates) == 4
    ranked = load_program({"stages": [gen(n=4), {"type": "rank", "verifier": "logprob", "top_k": 2}],
                           "select": "best"}).run("Calculate 7 - 2.", be)
    assert len(ranked.candidates) == 2 and all(c.score is not None for c in ranked.candidates)
    assert ranked.candidates[0].score >= ranked.candidates[1].score
    assert min(c.score for c in ranked.candidates) >= sorted((c.mean_logprob for c in base.candidates))[-2] - 1
    voted = load_program({"stages": [gen(n=6, temperature=1.0), {"type": "vote"}]}).run("Calculate 7 - 2.", be)
    assert len({c.answer for c in voted.candidates}) == 1
    fused = load_program({"stages": [gen(n=3), {"type": "critique", "max_tokens": 6}, {"type": "fuse", "n": 2,
                                                                                       "max_tokens": 6}]})
    r = fused.run("Calculate 7 - 2.", be)
    assert len(r.candidates) == 2 and all(c.meta.get("by") == "fuse" for c in r.candidates)
    assert r.info["trace"][1]["prompt_tokens"] > r.info["trace"][0]["prompt_tokens"]  # the critic read candidates
    prompted = load_program({"stages": [{"type": "prompt", "preset": "direct"}, gen()]}).run("Calculate 7 - 2.", be)
    assert prompted.info["prompt"].endswith("Give only the final answer, without any explanation.")
    text = load_program({"stages": [{"type": "prompt", "text": "Be brief.", "where": "after"}, gen()]})
    assert text.run("Q?", be).info["prompt"] == "Q?\n\nBe brief."


@pytest.mark.parametrize("stage", [
    {"type": "generate", "strategy": "best_of_n", "verifier": "self_eval", "knobs": {"n": 4, "max_tokens": 8}},
    {"type": "critique", "max_tokens": 8},
    {"type": "rank", "verifier": "self_eval", "top_k": 1},
    {"type": "filter", "verifier": "self_eval", "threshold": 0.9},
    {"type": "vote"},
    {"type": "fuse", "n": 3, "max_tokens": 8},
    {"type": "prompt", "preset": "cot"},
], ids=lambda s: s["type"])
@pytest.mark.parametrize("limits", [{"tokens": 20}, {"prompt_tokens": 150}, {"verifier_passes": 2}],
                         ids=lambda d: next(iter(d)))
def test_budget_is_never_exceeded_by_any_stage(be, stage, limits):
    stages = [stage, gen(n=4)] if stage["type"] == "prompt" else [gen(n=4), stage] if stage["type"] != "generate" \
        else [stage]
    budget = Budget(dict(limits))
    r = load_program({"stages": stages}).run("Calculate 12 + 30.", be, budget)
    spent = r.budget["spent"]
    for key, lim in budget.limits.items():
        assert spent[key] <= lim, (key, spent[key], lim)


def test_a_stage_naming_a_model_uses_it_and_a_missing_one_fails_before_any_work(be, lm):
    from tiny import CharTokenizer

    class Counting(LocalBackend):  # the real backend, counting its sample calls
        calls = 0

        def sample(self, *a, **k):
            Counting.calls += 1
            return super().sample(*a, **k)

    judge = Counting(lm[0], CharTokenizer(), lm[1], chat=False)
    prog = load_program({"stages": [gen(n=2), {"type": "fuse", "model": "judge", "max_tokens": 6}]})
    budget = Budget()
    with pytest.raises(SteerscaleError, match="model 'judge'"):
        prog.run("Calculate 1 + 1.", be, budget)
    assert budget.spent()["generated_tokens"] == 0 and budget.spent()["prompt_tokens"] == 0
    r = prog.run("Calculate 1 + 1.", be, Budget(), models={"judge": judge})
    assert Counting.calls == 1 and r.candidates[0].meta["by"] == "fuse"


def test_stage_registry_lists_every_stage():
    assert set(STAGES) == {"prompt", "generate", "critique", "rank", "filter", "vote", "fuse", "handbook", "route"}


# -- search ---------------------------------------------------------------------------------------------------
def _problems():
    return [Problem(f"p{i}", f"Calculate {i} + 1.", lambda text, i=i: str(i + 1) in text) for i in range(2)]


def test_evaluate_charges_the_total_and_refuses_a_problem_it_cannot_pay(be):
    total = Budget.of(tokens=30)
    spec = StrategySpec.of("majority", n=2, max_tokens=6)
    out = evaluate(spec, _problems(), be, {"tokens": 12}, total=total)
    assert len(out) == 2 and total.spent()["generated_tokens"] == sum(o.generated_tokens for o in out) <= 24
    with pytest.raises(TotalSpent):
        evaluate(spec, _problems(), be, {"tokens": 12}, total=total)  # 30 - spent < 12: no partial problem


def test_search_runs_resumes_and_stays_within_its_total(be, tmp_path):
    pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    kw = dict(per_problem={"tokens": 24}, total={"tokens": 1500}, sampler="random", max_tokens=6, storage=storage,
              progress=False)
    first = search(_problems(), be, trials=2, **kw)
    assert len(first.trials) == 2 and first.best is not None and 0.0 <= first.best_dev_acc <= 1.0
    load_program(first.best)  # the best config is a valid program
    again = search(_problems(), be, trials=3, **kw)  # resumed: one more trial
    assert len(again.trials) == 3 and again.trials[0].program == first.trials[0].program
    assert again.spent["generated_tokens"] <= 1500
    from steerscale.scale.programs.search import SINGLE_STRATEGY_PARAMS

    warm = search(_problems(), be, trials=1, start_from=SINGLE_STRATEGY_PARAMS, **{**kw, "storage": None})
    assert warm.trials[0].program["stages"][0]["strategy"] == "majority"  # the enqueued point came first
    tight = search(_problems(), be, trials=4, **{**kw, "storage": None, "total": {"tokens": 60}})
    assert tight.spent["generated_tokens"] <= 60  # a trial the total cannot finish is failed, never scored
    assert all(t.dev_acc is None for t in tight.trials if t.state == "fail")
    with pytest.raises(SteerscaleError, match="total budget"):
        search(_problems(), be, trials=1, per_problem={"tokens": 10}, total={}, progress=False)
    too_wide = lambda trial: {"stages": [gen(n=trial.suggest_categorical("n", [64]))]}  # noqa: E731
    failed = search(_problems(), be, trials=2, space=too_wide, **{**kw, "storage": None})
    assert [t.state for t in failed.trials] == ["fail", "fail"] and "exceeds the cap of 32" in failed.trials[0].error
    assert failed.best is None


def test_cli_show_and_early_refusal(capsys):
    from steerscale.cli import main

    assert main(["program", "show"]) == 0
    assert "fuse" in capsys.readouterr().out
    assert main(["program", "show", "critique_fuse"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "critique_fuse"
    # refused before any model is loaded (an unknown model name would fail later, differently)
    assert main(["solve", "-m", "no/such-model", "-p", "hi", "--strategy", "program", "--knob",
                 'program={"stages": [{"type": "fuse"}]}']) == 2
    assert "no candidates to work on" in capsys.readouterr().err


# -- the server's strategy field, and a program on an OpenAI-compatible backend -----------------------------------
def call(server, path, body):
    """(status, JSON body, headers) of one POST, error statuses included."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(server.url.rsplit("/v1", 1)[0] + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read().decode()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode()), dict(exc.headers)


def test_a_program_through_the_server_and_through_openai_backend(lm):
    pytest.importorskip("fastapi")
    from steerscale.scale.remote import OpenAIBackend
    from steerscale.serve import App, start_server
    from tiny import ChatCharTokenizer

    program = {"stages": [gen(n=2, max_tokens=5), {"type": "fuse", "max_tokens": 5, "max_chars": 40}],
               "select": "first"}
    server = start_server(App(lm[0], ChatCharTokenizer(), lm[1], model_id="tiny", max_n=8))
    try:
        body = {"model": "tiny", "prompt": "12 + 3 =", "max_tokens": 5,
                "strategy": {"name": "program", "program": json.dumps(program), "seed": 1}}
        status, out, _ = call(server, "/v1/completions", body)
        assert status == 200, out
        info = out["steerscale"]
        assert info["strategy"] == "program" and info["budget"]["spent"]["generated_tokens"] > 0
        local = StrategySpec.of("program", program=program, seed=1, max_tokens=5).run(
            "12 + 3 =", LocalBackend(lm[0], ChatCharTokenizer(), lm[1], chat=False))
        assert out["choices"][0]["text"] == local.best.text  # the same program, the same answer
        bad = dict(body, strategy={"name": "program", "program": '{"stages": [{"type": "fuse"}]}'})
        status, out, _ = call(server, "/v1/completions", bad)
        assert status == 400 and "no candidates to work on" in out["error"]["message"]
        remote = OpenAIBackend(server.url, "tiny", chat=False)
        r = load_program(program).run("12 + 3 =", remote, Budget.of(tokens=40), seed=1)
        assert r.candidates and r.candidates[0].meta["by"] == "fuse" and r.budget["spent"]["generated_tokens"] <= 40
    finally:
        server.close()


# -- behaviour handbook (metacognitive reuse) ---------------------------------------------------------------------
def test_behaviour_lines_are_parsed_or_refused():
    from steerscale.scale.programs.memory import parse_behaviour

    assert parse_behaviour("Sure.\n- Check Units: convert every quantity to one unit first.") == \
        ("check_units", "convert every quantity to one unit first.")
    assert parse_behaviour("no behaviour here") is None and parse_behaviour("x: y") is None


def test_handbook_retrieves_by_similarity_and_its_stage_prepends_it(be, tmp_path):
    from steerscale.scale.programs import Behaviour, Handbook, build_handbook

    questions = ["Calculate 12 + 30.", "Name the capital of France, please, in one word."]
    vecs = be.embed(questions, Budget()).tolist()
    book = Handbook([Behaviour("add_tens", "add the tens first.", questions[0], vecs[0]),
                     Behaviour("recall", "recall the fact, then answer.", questions[1], vecs[1])], "tiny", len(vecs[0]))
    path = tmp_path / "handbook.json"
    book.save(path)
    loaded = Handbook.load(path)
    assert loaded == book
    budget = Budget()
    assert [b.name for b in loaded.retrieve(questions[1], be, budget, k=1)] == ["recall"]
    assert budget.spent()["verifier_passes"] == 1  # the question's embedding is paid for
    prog = load_program({"stages": [{"type": "handbook", "path": str(path), "k": 1}, gen()]})
    r = prog.run(questions[0], be, Budget())
    assert r.info["prompt"].startswith("Behaviours that may help with this problem:\n- add_tens: add the tens first.")
    with pytest.raises(SteerscaleError, match="does not exist"):
        load_program({"stages": [{"type": "handbook", "path": str(tmp_path / "none.json")}, gen()]})
    (tmp_path / "bad.json").write_text('{"behaviours": [{"name": "x"}]}')
    with pytest.raises(SteerscaleError, match="malformed"):
        load_program({"stages": [{"type": "handbook", "path": str(tmp_path / "bad.json")}, gen()]})
    built = build_handbook(_problems(), be, Budget.of(tokens=60), max_tokens=8)  # a random model: few or no entries
    assert isinstance(built, Handbook) and all(b.vector and len(b.vector) == built.dim for b in built.behaviours)


# -- prompt router (dynamic prompt selection) ---------------------------------------------------------------------
def test_router_picks_the_prompt_that_worked_on_the_nearest_questions(be, tmp_path):
    from steerscale.scale.programs import Router, build_router
    from steerscale.scale.programs.memory import RouteExample

    qa, qb = "Calculate 12 + 30.", "Name the capital of France, please, in one word."
    va, vb = be.embed([qa, qb], Budget()).tolist()
    router = Router(["none", "cot", "direct"], [RouteExample(qa, {"none": 0, "cot": 1, "direct": 0}, va),
                                                 RouteExample(qb, {"none": 0, "cot": 0, "direct": 1}, vb)],
                    "tiny", len(va))
    assert router.choose(qa, be, Budget(), k=1) == "cot" and router.choose(qb, be, Budget(), k=1) == "direct"
    assert router.choose(qa, be, Budget(), k=2) == "cot"  # a tie on both: the first of the best overall
    path = tmp_path / "router.json"
    router.save(path)
    assert Router.load(path) == router
    prog = load_program({"stages": [{"type": "route", "path": str(path), "k": 1}, gen()]})
    assert prog.run(qb, be, Budget()).info["prompt"].endswith("Give only the final answer, without any explanation.")
    bad = json.loads(path.read_text())
    bad["prompts"] = ["none", "cto"]
    path.write_text(json.dumps(bad))
    with pytest.raises(SteerscaleError, match="did you mean 'cot'"):
        load_program({"stages": [{"type": "route", "path": str(path)}, gen()]})
    budget = Budget()
    built = build_router(_problems(), be, ("none", "direct"), budget, max_tokens=4)
    assert [sorted(e.correct) for e in built.examples] == [["direct", "none"]] * 2
    assert all(len(e.vector) == built.dim for e in built.examples)
    assert budget.spent()["generated_tokens"] <= 2 * 2 * 4 and budget.spent()["verifier_passes"] == 2
    with pytest.raises(SteerscaleError, match="unknown prompt preset"):
        build_router(_problems(), be, ("none", "verbose"))


@pytest.mark.integration
def test_a_program_evaluates_on_smollm2(tmp_path):
    """``evaluate(strategy=StrategySpec.of("program", ...))`` on the real SmolLM2: every example answered within its
    budget, the program's stages in each record's trace."""
    import steerscale
    from steerscale.measure.runs import evaluate as run_eval

    task_file = tmp_path / "sums.jsonl"
    task_file.write_text("\n".join(json.dumps({"question": f"What is {a} + {b}? Answer with the number.",
                                                "answer": str(a + b)}) for a, b in [(2, 3), (10, 5)]) + "\n")
    lm = steerscale.load_model("smollm2-135m-instruct")
    spec = StrategySpec.of("program", program={"stages": [gen(n=2, max_tokens=12), {"type": "fuse", "max_tokens": 12}],
                                               "select": "first"}, budget="tokens=60")
    res = run_eval(lm, str(task_file), strategy=spec, outdir=tmp_path / "runs", progress=False)
    assert res.summary["n"] == 2 and res.summary["n_failed"] == 0
    for r in res.records:
        assert 0 < r["tokens"]["generated"] <= 60 and r["output"]["n_candidates"] == 1  # the fused answer
