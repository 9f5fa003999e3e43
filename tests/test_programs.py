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


from long_context import be, lm  # noqa: E402,F401 (fixtures: a tiny llama with a long window)


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
    ({"stages": [{"type": "teacher"}, gen()]}, "did you mean 'teach'"),
    ({"stages": [{"type": "teach", "explanations": 0}, gen()]}, "'explanations' must be a number in [1, 8]"),
    ({"stages": [{"type": "teach", "studnet": "s"}, gen()]}, "did you mean 'student'"),
    ({"stages": [{"type": "concepts"}, gen()]}, "needs a \"path\""),
    ({"stages": [{"type": "concepts", "path": "/no/such/concepts.json"}, gen()]}, "does not exist"),
    ({"stages": [{"type": "unit_tests", "tests": "assert answer > 0"}, gen()]}, "must be a list of strings"),
    ({"stages": [{"type": "unit_tests", "tests": ["assert answer.real > 0"]}, gen()]}, "restricted evaluator refuses"),
    ({"stages": [{"type": "unit_tests", "generate": False}, gen()]}, "needs fixed \"tests\""),
    ({"stages": [gen(), {"type": "run_tests", "min_pas": 0.5}]}, "did you mean 'min_pass'"),
    ({"stages": [{"type": "run_tests"}, gen()]}, "no candidates to work on"),
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
    for bad, needle in [('{"stages": [{"type": "teach", "explanations": 0}, {"type": "generate"}]}', "explanations"),
                        ('{"stages": [{"type": "unit_tests", "tests": ["assert open(1)"]}, {"type": "generate"}]}',
                         "restricted evaluator"),
                        ('{"stages": [{"type": "concepts", "path": "/no/such.json"}, {"type": "generate"}]}',
                         "names a file on the server")]:  # a request never reads the server's files
        with pytest.raises(ApiError) as err:
            read_strategy({"name": "program", "program": bad}, {})
        assert err.value.status == 400 and needle in err.value.message, err.value.message
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
    assert set(STAGES) == {"prompt", "generate", "critique", "rank", "filter", "vote", "fuse", "handbook", "route",
                           "concepts", "teach", "unit_tests", "run_tests"}


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


def test_the_server_runs_program_stages_on_memories_its_operator_registered(lm, tmp_path):
    """A request names a registered memory (``--memory NAME=PATH``), never a path; the stage reads the file the
    operator gave (the same answer as the local run on that file); unknown names and writes are 400s."""
    pytest.importorskip("fastapi")
    from steerscale.scale.programs import Behaviour, Handbook
    from steerscale.serve import App, start_server
    from steerscale.serve.schema import ProgramMemory
    from tiny import ChatCharTokenizer

    tok = ChatCharTokenizer()
    local_be = LocalBackend(lm[0], tok, lm[1], chat=False)
    question = "Calculate 12 + 30."
    vec = local_be.embed([question], Budget()).tolist()[0]
    path = tmp_path / "handbook.json"
    Handbook([Behaviour("add_tens", "add the tens first.", question, vec)], "tiny", len(vec)).save(path)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SteerscaleError, match="not a JSON object"):
        ProgramMemory.load(tmp_path / "list.json")
    server = start_server(App(lm[0], tok, lm[1], model_id="tiny", max_n=8,
                              memories={"hb": ProgramMemory.load(path)}))
    try:
        def ask(stage):
            program = {"stages": [stage, gen(max_tokens=5)], "select": "first"}
            return call(server, "/v1/completions", {"model": "tiny", "prompt": question, "max_tokens": 5, "strategy": {
                "name": "program", "program": json.dumps(program), "seed": 1}})[:2]

        status, out = ask({"type": "handbook", "memory": "hb", "k": 1})
        assert status == 200, out
        want = StrategySpec.of("program", seed=1, max_tokens=5, program={
            "stages": [{"type": "handbook", "path": str(path), "k": 1}, gen(max_tokens=5)], "select": "first"}).run(
            question, local_be)
        assert out["choices"][0]["text"] == want.best.text
        for stage, needle in [({"type": "handbook", "memory": "nope"}, "not registered on this server; it has: hb"),
                              ({"type": "concepts", "memory": "hb", "update": True}, "read-only here"),
                              ({"type": "handbook", "path": str(path)}, "names a file on the server")]:
            status, out = ask(stage)
            assert status == 400 and needle in out["error"]["message"], out
        import urllib.request

        with urllib.request.urlopen(server.url.rsplit("/v1", 1)[0] + "/v1/steering/memories", timeout=30) as resp:
            listed = json.loads(resp.read())["data"]
        assert listed == [{"id": "hb", "object": "program_memory", "file": "handbook.json"}]  # no server path
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


# -- ArcMemo concept memory ---------------------------------------------------------------------------------------
def _memory(be, path):
    from steerscale.scale.programs import Concept, ConceptMemory

    questions = ["Calculate 12 + 30.", "Name the capital of France, please, in one word."]
    vecs = be.embed(questions, Budget()).tolist()
    memory = ConceptMemory([Concept("add_tens", "when adding two-digit numbers, add the tens first.", questions[0],
                                    vecs[0]),
                            Concept("recall_fact", "when a question asks a fact, recall it, then answer.", questions[1],
                                    vecs[1])], "tiny", len(vecs[0]))
    memory.save(path)
    return memory, questions


def test_concepts_are_parsed_from_lessons_or_refused():
    from steerscale.scale.programs.concepts import parse_concept

    assert parse_concept("equal_groups: when groups are equal, multiply.") == ("equal_groups",
                                                                                "when groups are equal, multiply.")
    assert parse_concept("If the numbers are large, add the tens first") == (
        "numbers_large_add", "if the numbers are large, add the tens first")
    assert parse_concept("When it comes to units, convert first. In this case, D.") == (
        "units_convert_first", "when it comes to units, convert first.")  # the first sentence, named by content
    assert parse_concept("12") is None and parse_concept("") is None


def test_concept_memory_selects_by_similarity_or_by_the_model(be, tmp_path):
    from steerscale.scale.programs import ConceptMemory

    path = tmp_path / "concepts.json"
    memory, questions = _memory(be, path)
    assert ConceptMemory.load(path) == memory
    budget = Budget()
    assert [c.name for c in memory.select(questions[1], be, budget, k=1)] == ["recall_fact"]
    assert budget.spent()["verifier_passes"] == 1  # the question's embedding
    budget = Budget()
    chosen = memory.select(questions[0], be, budget, k=2, how="model", pool=2)
    assert budget.spent()["verifier_passes"] == 1 + 2  # the embedding, then one yes/no pass per concept of the pool
    assert len(chosen) <= 2 and all(c in memory.concepts for c in chosen)
    prog = load_program({"stages": [{"type": "concepts", "path": str(path), "k": 1}, gen()]})
    r = prog.run(questions[0], be, Budget())
    assert r.info["prompt"].startswith("Concepts that may help with this problem:\n- add_tens: when adding")
    assert r.info["concepts"] == ["add_tens"]
    (tmp_path / "bad.json").write_text('{"concepts": [{"name": "x"}]}')
    with pytest.raises(SteerscaleError, match="malformed"):
        load_program({"stages": [{"type": "concepts", "path": str(tmp_path / "bad.json")}, gen()]})


def test_concept_memory_learns_during_a_run_when_asked(be, tmp_path, monkeypatch):
    from steerscale.scale.programs import ConceptMemory, build_concepts, concepts

    path = tmp_path / "concepts.json"
    ConceptMemory([], "tiny", 0).save(path)  # an empty memory: a run fills it
    monkeypatch.setattr(concepts, "write_concept", lambda q, s, b, budget, **k: ("carry_over", "when digits sum past "
                                                                                 "nine, carry one."))
    prog = {"stages": [{"type": "concepts", "path": str(path), "update": True, "min_score": 0.0}, gen(n=2)]}
    r = load_program(prog).run("Calculate 19 + 23.", be, Budget())
    assert r.info["learned"] == "carry_over"
    saved = ConceptMemory.load(path)
    assert [c.name for c in saved.concepts] == ["carry_over"] and saved.concepts[0].origin == "update"
    assert saved.dim == len(saved.concepts[0].vector) > 0
    r2 = load_program(prog).run("Calculate 18 + 24.", be, Budget())  # the next problem selects it
    assert r2.info["concepts"] == ["carry_over"] and "learned" not in r2.info  # one concept per name
    strict = {"stages": [{"type": "concepts", "path": str(path), "update": True, "min_score": 1.0}, gen(n=2)]}
    monkeypatch.setattr(concepts, "write_concept", lambda *a, **k: ("never", "when never, never."))
    assert "learned" not in load_program(strict).run("Calculate 1 + 2.", be, Budget()).info  # not confident enough
    budget = Budget()
    built = build_concepts(_problems(), be, budget, max_tokens=8)  # a random model: few or no concepts
    assert isinstance(built, ConceptMemory) and all(len(c.vector) == built.dim for c in built.concepts)


# -- teacher intervention -----------------------------------------------------------------------------------------
def test_teacher_explains_only_when_simulating_the_student_says_it_helps(be, lm):
    from tiny import CharTokenizer

    class Counting(LocalBackend):
        samples = 0
        passes = 0

        def sample(self, *a, **k):
            Counting.samples += 1
            return super().sample(*a, **k)

        def choice_logprobs(self, *a, **k):
            Counting.passes += 1
            return super().choice_logprobs(*a, **k)

    teacher = Counting(lm[0], CharTokenizer(), lm[1], chat=False)
    answer = lambda text: "7"  # noqa: E731  (the teacher's answer the student is simulated on)
    stage = {"type": "teach", "model": "teacher", "explanations": 3, "max_tokens": 10, "threshold": -1e9}
    prog = load_program({"stages": [stage, gen(n=1)]})
    r = prog.run("Calculate 3 + 4.", be, Budget(), models={"teacher": teacher}, answer_fn=answer)
    assert Counting.samples == 1 and r.info["teach"]["explanations"] == 3 and r.info["teach"]["intervened"]
    assert "A teacher's explanation:" in r.info["prompt"]
    never = load_program({"stages": [dict(stage, threshold=1e9), gen(n=1)]})
    r = never.run("Calculate 3 + 4.", be, Budget(), models={"teacher": teacher}, answer_fn=answer)
    assert not r.info["teach"]["intervened"] and r.info["prompt"] is None  # the student answers alone
    assert isinstance(r.info["teach"]["gain"], float)
    student = load_program({"stages": [{"type": "teach", "student": "student", "max_tokens": 6}, gen(n=1)]})
    before = Counting.passes
    student.run("Calculate 3 + 4.", be, Budget(), models={"student": teacher}, answer_fn=answer)
    assert Counting.passes == before + 1  # the student was simulated, in one batched pass
    budget = Budget()
    with pytest.raises(SteerscaleError, match="model 'teacher'"):
        prog.run("Calculate 3 + 4.", be, budget)  # the teacher was not given: refused before any work
    assert budget.spent()["generated_tokens"] == 0


# -- Archon's unit-test stages --------------------------------------------------------------------------------------
def test_restricted_checks_run_without_executing_code():
    from steerscale.scale.programs.unit_tests import Check, CheckError, answer_value, read_tests

    assert answer_value("1,234") == 1234 and answer_value("-2.5") == -2.5 and answer_value("Paris") == "Paris"
    assert Check.parse("assert answer % 2 == 0 and 40 < answer <= 42").passes(42)
    assert Check.parse("assert max(answer, 3) == 5, 'message'").passes(5)
    assert not Check.parse("assert answer > 0").passes("Paris")  # a type error fails, it does not raise
    assert not Check.parse("assert answer > 0").passes(None)
    assert Check.parse("assert len(str(answer)) == 5").passes("Paris")
    assert not Check.parse("assert 9 ** 9 ** 9 > answer").passes(1)  # refused before it grows
    assert not Check.parse("assert 'a' * 10 ** 9 == answer").passes("a")
    for bad in ["assert answer.__class__", "assert __import__('os').system('true')", "assert (lambda: 1)()",
                "assert [x for x in 'ab']", "assert open('f')", "assert answer[0] == 1", "assert answer == 1; 1",
                "print(1)", "assert eval('1')", "assert int(x=1)"]:
        with pytest.raises(CheckError):
            Check.parse(bad)
    checks, tests = read_tests(["1. assert answer > 0", "- `assert answer < 100`", "The answer is a whole number.",
                                "assert import os", "ok"])
    assert [c.text for c in checks] == ["assert answer > 0", "assert answer < 100"]
    assert tests == ["The answer is a whole number."]


def test_unit_test_stages_rank_candidates_by_the_checks_they_pass(be):
    answers = iter(["5", "7", "5", "x"])
    read = lambda text: next(answers)  # noqa: E731
    prog = load_program({"stages": [{"type": "unit_tests", "generate": False, "tests": ["assert answer == 5",
                                                                                          "assert answer > 0"]},
                                    gen(n=4), {"type": "run_tests", "top_k": 2}], "select": "best"})
    r = prog.run("Calculate 2 + 3.", be, Budget(), answer_fn=read)
    assert [c.answer for c in r.candidates] == ["5", "5"] and all(c.score == 1.0 for c in r.candidates)
    assert r.candidates[0].meta["tests_passed"] == "2/2" and r.info["unit_tests"] == ["assert answer == 5",
                                                                                        "assert answer > 0"]
    budget = Budget()
    judged = load_program({"stages": [{"type": "unit_tests", "generate": False,
                                       "tests": ["The answer is a whole number."]}, gen(n=3),
                                      {"type": "run_tests"}]}).run("Calculate 2 + 3.", be, budget)
    assert budget.spent()["verifier_passes"] == 3 and all(c.score in (0.0, 1.0) for c in judged.candidates)
    written = load_program({"stages": [{"type": "unit_tests", "n": 2, "max_tokens": 12}, gen(n=2),
                                       {"type": "run_tests"}]}).run("Calculate 2 + 3.", be, Budget())
    assert isinstance(written.info["unit_tests"], list)  # whatever a random model writes, read safely


# -- every new stage type within its budget -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["concepts", "concepts_model", "concepts_update", "teach", "unit_tests"])
@pytest.mark.parametrize("limits", [{"tokens": 20}, {"prompt_tokens": 150}, {"verifier_passes": 2}],
                         ids=lambda d: next(iter(d)))
def test_budget_is_never_exceeded_by_the_new_stages(be, tmp_path, kind, limits):
    path = tmp_path / "concepts.json"
    _memory(be, path)
    stages = {
        "concepts": [{"type": "concepts", "path": str(path)}, gen(n=4)],
        "concepts_model": [{"type": "concepts", "path": str(path), "select": "model", "pool": 2}, gen(n=4)],
        "concepts_update": [{"type": "concepts", "path": str(path), "update": True, "min_score": 0.0}, gen(n=4)],
        "teach": [{"type": "teach", "explanations": 3, "max_tokens": 12, "threshold": -1e9}, gen(n=4)],
        "unit_tests": [{"type": "unit_tests", "n": 3, "max_tokens": 12, "tests": ["The answer is positive."]},
                       gen(n=4), {"type": "run_tests"}],
    }[kind]
    budget = Budget(dict(limits))
    r = load_program({"stages": stages}).run("Calculate 12 + 30.", be, budget)
    spent = r.budget["spent"]
    for key, lim in budget.limits.items():
        assert spent[key] <= lim, (key, spent[key], lim)


# -- the CLI's steered stages ---------------------------------------------------------------------------------------
def test_cli_steered_stage_flag_builds_a_steered_copy_and_refuses_early(be, lm, tmp_path, capsys):
    import types

    from steerscale import Site
    from steerscale.cli import main
    from steerscale.commands.program_cmd import _models
    from steerscale.steer.vector import SteeringVector
    from tiny import CharTokenizer

    vec = SteeringVector({Site(1): torch.ones(lm[0].config.hidden_size)}).save(tmp_path / "v")
    prog = '{"stages": [{"type": "generate", "strategy": "greedy", "model": "formal", "knobs": {"max_tokens": 4}}]}'
    args = types.SimpleNamespace(with_models=[], steer_with=[f"formal={vec}:2"], no_chat=True, device=None,
                                 dtype=None)
    models = _models(args, types.SimpleNamespace(model=lm[0], tokenizer=CharTokenizer(), layout=lm[1]))
    assert set(models) == {"formal"} and len(models["formal"].steering) >= 1
    steered = load_program(prog).run("Calculate 1 + 1.", be, Budget(), models=models)
    plain = load_program(prog).run("Calculate 1 + 1.", be, Budget(), models={"formal": be})
    assert steered.best.token_ids != plain.best.token_ids or steered.best.text != plain.best.text
    # refused before any model is loaded
    assert main(["program", "run", prog, "-p", "hi", "-m", "no/such-model"]) == 2
    assert "--steer-with NAME=VEC" in capsys.readouterr().err
    assert main(["program", "run", prog, "-p", "hi", "-m", "no/such-model", "--steer-with",
                 f"formal={tmp_path / 'none.safetensors'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["program", "run", prog, "-p", "hi", "-m", "no/such-model", "--steer-with", f"formal={vec}",
                 "--with", "formal=gemma3-270m"]) == 2
    assert "both --with and --steer-with" in capsys.readouterr().err


@pytest.mark.integration
def test_new_stages_run_on_smollm2(tmp_path):
    """Concepts (selected and updated), a teacher and the unit-test stages on the real SmolLM2, within budget."""
    import steerscale
    from steerscale.scale.programs import ConceptMemory

    lm = steerscale.load_model("smollm2-135m-instruct")
    backend = LocalBackend(lm.model, lm.tokenizer, lm.layout)
    path = tmp_path / "concepts.json"
    ConceptMemory([], "smollm2", 0).save(path)
    program = load_program({"stages": [
        {"type": "concepts", "path": str(path), "update": True, "min_score": 0.0},
        {"type": "teach", "max_tokens": 48},
        {"type": "unit_tests", "n": 2, "max_tokens": 40, "tests": ["assert answer == 12 + 30"]},
        {"type": "generate", "strategy": "majority", "knobs": {"n": 2, "max_tokens": 24, "temperature": 0.7}},
        {"type": "run_tests", "top_k": 1}], "select": "best"})
    budget = Budget.of(tokens=300)
    r = program.run("What is 12 + 30? Answer with the number.", backend, budget)
    assert r.budget["spent"]["generated_tokens"] <= 300 and r.best is not None
    assert r.info["teach"]["explanations"] == 1 and isinstance(r.info["teach"]["gain"], (float, type(None)))
    assert "assert answer == 12 + 30" in r.info["unit_tests"] and "tests_passed" in r.best.meta
    saved = ConceptMemory.load(path)
    assert all(c.origin == "update" and len(c.vector) == saved.dim for c in saved.concepts)
