"""One strategy request built one way (``StrategySpec``), the budget as a hard cap, and one answer reader."""

import json
import math
import urllib.error
import urllib.request

import pytest
import torch

from steerscale import Add, Intervention, Site, SiteKind, SteerscaleError
from steerscale.answers import extract_answer, last_number, same_number
from steerscale.cli import main
from steerscale.scale import Budget, Candidate, LocalBackend, get_verifier, run_strategy
from steerscale.scale.backend import Backend, Branches
from steerscale.scale.spec import StrategySpec
from steerscale.scale.strategies import STRATEGIES
from steerscale.serve import App, start_server
from tiny import CharTokenizer, tiny_model


# -- one spec, three constructors, the same checks --------------------------------------------------------------
def test_the_three_constructors_build_the_same_spec():
    class Args:
        strategy, verifier, verifier_opt, reference, budget = "beam_search", "logprob", [], None, "tokens=300"
        n, max_tokens, temperature, seed, step, stop = 4, 20, 0.5, 3, "\\n", ["END"]
        knob = ["width=2", "select=vote"]

    kw = StrategySpec.of("beam_search", verifier="logprob", budget="tokens=300", n=4, max_tokens=20, temperature=0.5,
                         seed=3, step="\n", stop=["END"], width=2, select="vote")
    js = StrategySpec.from_json({"name": "beam_search", "verifier": "logprob", "budget": {"tokens": 300}, "n": 4,
                                 "width": 2, "select": "vote", "step": "\n", "stop": "END", "seed": 3},
                                inherit={"max_tokens": 20, "temperature": 0.5})
    assert StrategySpec.from_args(Args()) == kw == js
    assert kw.knobs["select"] == "vote" and dict(kw.budget) == {"generated_tokens": 300.0}
    with pytest.raises(TypeError):
        kw.knobs["n"] = 8  # frozen


@pytest.mark.parametrize("make,match", [
    (lambda: StrategySpec.of("majority", temprature=0), r"no knob 'temprature'; did you mean 'temperature'"),
    (lambda: StrategySpec.of("bets_of_n"), r"unknown strategy 'bets_of_n'; did you mean 'best_of_n'"),
    (lambda: StrategySpec.of("majority", n=2.5), r"knob 'n' must be an integer"),
    (lambda: StrategySpec.of("majority", n="8"), r"knob 'n' must be an integer"),
    (lambda: StrategySpec.of("majority", temperature=-1), r"temperature must be >= 0"),
    (lambda: StrategySpec.of("beam_search", select="bst"), r"unknown final selection 'bst'"),
    (lambda: StrategySpec.of("majority", budget="tokens=-5"), r"must be a positive finite number"),
    (lambda: StrategySpec.of("majority", budget="tokns=5"), r"unknown budget currency 'tokns'"),
    (lambda: StrategySpec.of("best_of_n", verifier="slef_eval"), r"unknown verifier 'slef_eval'; did you mean"),
    (lambda: StrategySpec.of("best_of_n", verifier="judge", verifier_options={"vots": 3}), r"has no option 'vots'"),
    (lambda: StrategySpec.of("greedy", n=4), r"strategy 'greedy' has no knob 'n'"),
    (lambda: StrategySpec.of("particle_filter", seed=-1), r"knob 'seed' must be an integer in"),
    (lambda: StrategySpec.of("majority", seed=2**70), r"knob 'seed' must be an integer in"),
])
def test_bad_specs_name_the_field(make, match):
    with pytest.raises(SteerscaleError, match=match):
        make()


def test_null_knobs_mean_none():
    spec = StrategySpec.from_json({"name": "majority", "stop": None, "seed": None, "step": None})
    assert spec.knobs["stop"] == () and spec.knobs["seed"] is None and spec.knobs["step"] is None


def test_a_typo_fails_before_any_sampling_from_python(backend):
    budget = Budget()
    with pytest.raises(SteerscaleError, match="temprature"):
        run_strategy("majority", "ab", backend, None, budget, n=2, temprature=0)
    assert budget.spent()["prompt_tokens"] == budget.spent()["generated_tokens"] == 0


def test_every_strategy_is_registered_with_a_description():
    assert "compute_optimal" in STRATEGIES and "self_consistency" in STRATEGIES  # an alias
    assert all(desc for _, desc in STRATEGIES.describe())


@pytest.mark.parametrize("argv,match", [
    (["--knob", "temprature=0"], "did you mean 'temperature'"),
    (["--strategy", "majorty"], "did you mean 'majority'"),
    (["--verifier", "nope"], "unknown verifier 'nope'"),
    (["--budget", "tokens=abc"], "is not a number"),
])
def test_cli_errors_are_one_line_before_the_model_loads(capsys, argv, match):
    rc = main(["solve", "-p", "1+1", "-m", "no/such-model", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err  # the bad model would fail later: it never loads


def test_cli_unknown_method_fails_before_the_model_loads(capsys, tmp_path):
    rc = main(["extract", "-m", "no/such-model", "--pairs", "formal_casual", "--method", "proble",
               "-o", str(tmp_path / "v.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown steering method 'proble'; did you mean 'probe'?" in err


@pytest.fixture(scope="module")
def app():
    model, layout = tiny_model("llama")
    server = start_server(App(model, CharTokenizer(), layout, model_id="tiny", max_n=8))
    yield server
    server.close()


def post(server, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + "/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("strategy,match", [
    ({"name": "majority", "temprature": 0}, "did you mean 'temperature'"),
    ({"name": "majorty"}, "did you mean 'majority'"),
    ({"name": "best_of_n", "verifier": "nope"}, "unknown verifier"),
    ({"name": "majority", "budget": "tokens=-1"}, "positive finite"),
    ({"name": "majority", "budget": [1]}, "budget"),
])
def test_server_answers_400_naming_the_strategy_field(app, strategy, match):
    status, body = post(app, {"prompt": "ab", "strategy": strategy})
    assert status == 400 and body["error"]["param"] == "strategy" and match in body["error"]["message"]


def test_server_strategy_inherits_only_the_request_knobs_it_takes(app):
    body = {"prompt": "ab", "max_tokens": 3, "temperature": 0.9, "seed": 2, "strategy": {"name": "greedy"}}
    status, out = post(app, body)
    assert status == 200 and out["steerscale"]["strategy"] == "greedy"
    assert out["usage"]["completion_tokens"] <= 3


# -- steering belongs to the backend ---------------------------------------------------------------------------
def test_row_scales_need_a_steering_vector(backend):
    with pytest.raises(SteerscaleError, match="has none"):
        LocalBackend(backend.model, backend.tokenizer, backend.layout, row_scales=[0.0, 2.0])
    site = Site(1, SiteKind.RESID_POST)
    ivs = [Intervention(site, Add(torch.ones(backend.layout.site_dim(site)), 1.0))]
    with pytest.raises(SteerscaleError, match="finite"):
        LocalBackend(backend.model, backend.tokenizer, backend.layout, ivs, row_scales=[math.nan])


def test_cli_refuses_row_scales_for_a_remote_backend(capsys):
    rc = main(["solve", "-p", "x", "--steer-scales", "0,1", "-n", "2", "--backend-url", "http://127.0.0.1:9/v1"])
    assert rc == 2 and "--steer-scales" in capsys.readouterr().err


# -- the budget is a hard cap, currency by currency -------------------------------------------------------------
@pytest.mark.parametrize("limit", [1, 7, 50, 53])
def test_generated_tokens_never_exceed_the_limit(backend, limit):
    budget = Budget.of(tokens=limit)
    r = run_strategy("majority", "abc", backend, None, budget, n=8, max_tokens=30, temperature=1.0, step=None)
    assert r.budget["spent"]["generated_tokens"] == min(limit, 8 * 30) and r.budget["exhausted"]
    assert any(c.finish_reason == "budget" for c in r.candidates)


def test_prompt_tokens_and_flops_never_exceed_the_limit(backend):
    b = Budget.of(prompt_tokens=2)  # the prompt is 3 tokens: it is not encoded at all
    rows = backend.sample("abc", 2, _params(), b)
    assert b.spent()["prompt_tokens"] == 0 and all(c.finish_reason == "budget" and not c.text for c in rows)
    cap = 2.0 * backend.n_params * 10  # the prompt (3 tokens) and 7 generated tokens
    b = Budget.of(flops=cap)
    backend.sample("abc", 4, _params(), b)
    assert b.spent()["flops"] <= cap and b.spent()["generated_tokens"] == 7


def _params():
    from steerscale.scale import SamplingParams

    return SamplingParams(max_tokens=20, temperature=1.0, step=None)


@pytest.mark.parametrize("key", ["verifier_passes", "verifier_tokens"])
def test_verifier_work_never_exceeds_the_limit(backend, key):
    from steerscale.scale.verifiers.model_based import SELF_EVAL_TEMPLATE

    one_pass = len(SELF_EVAL_TEMPLATE.format(question="abc", solution="wxyz"))  # tokens of one pass, at most
    limits = {"verifier_passes": 2} if key == "verifier_passes" else {"verifier_tokens": int(2.5 * one_pass)}
    budget = Budget(limits)
    r = run_strategy("best_of_n", "abc", backend, get_verifier("self_eval", backend=backend), budget, n=4,
                     max_tokens=4, temperature=1.0, step=None)
    spent = r.budget["spent"]
    assert 0 < spent[key] <= limits[key]
    assert sum(c.score is not None for c in r.candidates) == spent["verifier_passes"] < 4


class Judged(Backend):
    """Answers every judge prompt with a rating of 7."""

    def sample(self, prompt, n, params, budget, *, seed=None):
        budget.charge(generated_tokens=n)
        return [Candidate(text="7") for _ in range(n)]

    def start(self, prompt, n, budget, *, seed=None):
        return Branches(prompt, [Candidate() for _ in range(n)])

    def extend(self, branches, params, budget):
        return branches

    def select(self, branches, indices):
        return Branches(branches.prompt, [branches.rows[i].copy() for i in indices])

    def merge(self, parts):
        return parts[0]

    def choice_logprobs(self, contexts, options, budget):
        return [[0.0] * len(options) for _ in contexts]


def test_judge_calls_never_exceed_the_limit():
    judge = get_verifier("judge", backend=Judged(), votes=3)
    budget = Budget.of(judge_calls=4)
    cands = [Candidate(text=f"answer {i}") for i in range(3)]
    from steerscale.scale.verifiers import score_candidates

    score_candidates(judge, "q", cands, budget)
    assert budget.spent()["judge_calls"] == 4
    assert [c.score for c in cands[:2]] == [0.7, 0.7] and cands[2].score is None  # 3 + 1 votes, then none left


# -- one answer reader: a strategy's vote and a task's score read the same answer --------------------------------
class Replies(Backend):
    """Returns fixed texts as samples (no model): the answer reading is what is under test."""

    texts = ["The answer is 12. I counted 5 apples twice, so 10.",
             "I think it is 10.", "12 + 3 gives... no: 10", "Answer: 12 (then 7)"]

    def sample(self, prompt, n, params, budget, *, seed=None):
        budget.charge(generated_tokens=n)
        return [Candidate(text=self.texts[i % len(self.texts)], logprobs=[-1.0], finished=True) for i in range(n)]

    start = Judged.start
    extend = Judged.extend
    select = Judged.select
    merge = Judged.merge
    choice_logprobs = Judged.choice_logprobs


def test_strategy_vote_and_task_score_read_the_same_answer(tmp_path):
    from steerscale.measure.runs import evaluate

    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"id": "q1", "question": "How many?", "answer": "10"}) + "\n")
    # the generic reader would vote 12 (two "answer ... 12" texts); the task reads the last number: 10, 10, 10, 7
    assert [extract_answer(t) for t in Replies.texts] == ["12", "10", "10", "12"]
    res = evaluate(None, str(data), strategy="majority", n=4, backend=Replies(), outdir=tmp_path / "runs",
                   progress=False)
    rec = res.records[0]
    assert rec["output"]["strategy_answer"] == last_number(rec["output"]["text"]) == "10"
    assert rec["score"] == float(same_number(rec["output"]["strategy_answer"], "10")) == 1.0
