"""Inference-time scaling: budget, local backend (shared prefix, KV reuse), verifiers, strategies."""

import math

import pytest
import torch

from steerscale import Add, Intervention, Site, SiteKind, SteerscaleError
from steerscale.scale import Budget, Candidate, LocalBackend, SamplingParams, get_verifier, run_strategy
from steerscale.answers import extract_answer
from steerscale.scale.strategies import STRATEGIES
from steerscale.scale.strategies.adaptive import prob_leader_better
from steerscale.scale.strategies.search import resample
from steerscale.scale.verifiers import score_candidates
from steerscale.scale.verifiers.base import Verifier

import numpy as np
from tiny import hook_count, record_registrations


def full_logprobs(backend, prompt, ids):
    """Reference: log-probs of ``ids`` after ``prompt`` by one uncached forward of the whole text."""
    p = backend.tokenizer([prompt])["input_ids"][0].tolist()
    x = torch.tensor([p + ids])
    with torch.no_grad():
        logp = torch.log_softmax(backend.model(input_ids=x, use_cache=False).logits[0].float(), -1)
    return [float(logp[len(p) - 1 + i, t]) for i, t in enumerate(ids)]


# -- budget ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [{"tokens": 0}, {"flops": -1}, {"wall": float("nan")}, {"tokens": "x"}, {"bogus": 3}])
def test_bad_budget_limits_raise(bad):
    with pytest.raises(SteerscaleError):
        Budget(bad)


def test_budget_ledger():
    b = Budget.parse("tokens=10, flops=1e6")
    assert b.limits == {"generated_tokens": 10.0, "flops": 1e6}
    b.charge(generated_tokens=4, flops=100)
    assert b.spent()["generated_tokens"] == 4 and b.remaining()["generated_tokens"] == 6 and not b.exhausted
    b.charge(generated_tokens=6)
    assert b.exhausted and b.exhausted_by() == ["generated_tokens"]
    with pytest.raises(SteerscaleError):
        b.charge(prompt_tokens=-1)
    with pytest.raises(SteerscaleError):
        Budget.parse("tokens")


# -- engine ---------------------------------------------------------------------------------------------------
def test_shared_prefix_sampling_logprobs_match_full_forward(backend):
    b = Budget()
    cands = backend.sample("Hello wor", 6, SamplingParams(max_tokens=12, temperature=1.0, step=None), b, seed=3)
    prompt_len = len(backend.tokenizer.encode("Hello wor"))
    assert b.spent()["prompt_tokens"] == prompt_len  # encoded once for 6 rows
    assert b.spent()["generated_tokens"] == sum(c.n_tokens for c in cands)
    assert b.spent()["flops"] == pytest.approx(2 * backend.n_params * (prompt_len + sum(c.n_tokens for c in cands)))
    assert len({tuple(c.token_ids) for c in cands}) > 1
    for c in cands:
        assert c.logprobs == pytest.approx(full_logprobs(backend, "Hello wor", c.token_ids), abs=1e-4)


def test_greedy_matches_transformers_generate(backend):
    from steerscale import generate

    c = backend.sample("abc", 1, SamplingParams(max_tokens=10, temperature=0, step=None), Budget())[0]
    ref = generate(backend.model, backend.tokenizer, backend.layout, ["abc"], max_new_tokens=10, chat=False)[0]
    n = len(ref.token_ids)
    assert c.token_ids[:n] == ref.token_ids


def test_stepwise_extension_with_kv_reuse_fork_and_merge(backend):
    """Rows end steps at different times (masked holes in the cache), get forked and merged; every row's
    log-probs still equal a fresh forward of its full text, so the KV reuse changes nothing."""
    b = Budget()
    params = SamplingParams(max_tokens=30, temperature=1.0, step="e", max_step_tokens=8)
    br = backend.start("The cat", 4, b, seed=0)
    backend.extend(br, params, b)
    lens = [c.n_tokens for c in br.rows]
    forked = backend.select(br, [2, 2, 0])
    assert forked.rows[0].token_ids == forked.rows[1].token_ids == br.rows[2].token_ids
    backend.extend(forked, params, b)
    other = backend.select(br, [1])
    backend.extend(other, params, b)
    backend.extend(other, params, b)  # now longer than `forked`
    merged = backend.merge([forked, other])
    backend.extend(merged, params, b)
    assert len(set(lens)) > 1 or any(c.finished for c in br.rows)
    for c in merged.rows:
        assert c.logprobs == pytest.approx(full_logprobs(backend, "The cat", c.token_ids), abs=1e-4)
        assert sum(len(s) for s in c.steps) == len(c.text)


def test_stop_strings_and_length_limit(backend):
    params = SamplingParams(max_tokens=7, temperature=0, stop=("never-produced-zzz",), step=None)
    c = backend.sample("xyz", 1, params, Budget())[0]
    assert c.finish_reason == "length" and c.n_tokens == 7
    free = backend.sample("xyz", 1, SamplingParams(max_tokens=7, temperature=0, step=None), Budget())[0]
    stop = free.text[2:4]
    cut = backend.sample("xyz", 1, SamplingParams(max_tokens=7, temperature=0, stop=(stop,), step=None), Budget())[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]


def test_bad_inputs(backend):
    with pytest.raises(SteerscaleError, match="capped"):
        backend.sample("x", 33, SamplingParams(), Budget())
    with pytest.raises(SteerscaleError, match="context window"):
        backend.sample("x" * 200, 1, SamplingParams(), Budget())
    with pytest.raises(SteerscaleError):
        SamplingParams(max_tokens=0)
    with pytest.raises(SteerscaleError):
        run_strategy("nope", "x", backend)


def test_per_row_steering_scales(backend):
    layout = backend.layout
    site = Site(1, SiteKind.RESID_POST)
    vec = torch.randn(layout.site_dim(site), generator=torch.Generator().manual_seed(0)) * 4
    steered = LocalBackend(backend.model, backend.tokenizer, layout, [Intervention(site, Add(vec, 1.0))], chat=False,
                           row_scales=[0.0, 3.0, 0.0])
    params = SamplingParams(max_tokens=8, temperature=0, step=None)
    plain = backend.sample("hi there", 1, params, Budget())[0]
    rows = steered.sample("hi there", 3, params, Budget())
    assert rows[0].token_ids == plain.token_ids == rows[2].token_ids
    assert rows[1].logprobs != pytest.approx(plain.logprobs)
    assert rows[1].meta["steer_scale"] == 3.0


def test_local_backend_attaches_its_hooks_once_for_its_lifetime(backend, monkeypatch):
    # issue 24: hooks go on at the backend's first steered pass and stay until close() or garbage collection; later
    # calls (a search's many extend/select/merge steps, scoring) register none
    model, layout = backend.model, backend.layout
    site = Site(1, SiteKind.RESID_POST)
    vec = torch.randn(layout.site_dim(site), generator=torch.Generator().manual_seed(0)) * 4
    before = hook_count(model)
    steered = LocalBackend(model, backend.tokenizer, layout, [Intervention(site, Add(vec, 1.0))], chat=False)
    assert hook_count(model) == before  # nothing until it steers
    steered.sample("hi there", 2, SamplingParams(max_tokens=4, temperature=0, step=None), Budget())
    attached = hook_count(model)
    assert attached > before
    registered = record_registrations(monkeypatch)
    for strategy in ("beam_search", "astar", "best_of_n"):
        run_strategy(strategy, "12 + 3 =", steered, get_verifier("logprob"), Budget(), seed=0, max_tokens=8,
                     step=" ", max_step_tokens=4, temperature=1.0, **KNOBS[strategy])
    steered.token_logprobs(steered.prompt_ids("hi there") + [5, 6], prompt_width=3)
    monkeypatch.undo()
    assert registered == [], f"hooks registered after the first call: {registered}"
    assert hook_count(model) == attached
    steered.close()
    assert hook_count(model) == before
    with LocalBackend(model, backend.tokenizer, layout, [Intervention(site, Add(vec, 1.0))], chat=False) as again:
        again.sample("hi", 1, SamplingParams(max_tokens=2, temperature=0, step=None), Budget())
        assert hook_count(model) == attached
    assert hook_count(model) == before
    dropped = LocalBackend(model, backend.tokenizer, layout, [Intervention(site, Add(vec, 1.0))], chat=False)
    dropped.sample("hi", 1, SamplingParams(max_tokens=2, temperature=0, step=None), Budget())
    del dropped
    import gc

    gc.collect()
    assert hook_count(model) == before


# -- verifiers ------------------------------------------------------------------------------------------------
def test_programmatic_verifiers():
    b = Budget()
    c = lambda t: Candidate(text=t)  # noqa: E731
    assert get_verifier("exact", reference="42").score("q", c("so the answer is 42."), b) == 1.0
    assert get_verifier("numeric", reference="0.5").score("q", c("Answer: 1/2"), b) == 1.0
    assert get_verifier("numeric", reference="3").score("q", c("Answer: 4"), b) == 0.0
    assert get_verifier("math", reference="1/2").score("q", c("\\boxed{2/4}"), b) == 1.0
    assert get_verifier("mc", reference="B").score("q", c("I think the answer is (B)"), b) == 1.0
    prm = get_verifier("arith_prm")
    assert prm.score("q", c("3 + 4 = 7\n7 * 2 = 14\nAnswer: 14"), b) == 1.0
    assert prm.score("q", c("3 + 4 = 8\nAnswer: 8"), b) == pytest.approx(0.05)
    assert prm.score("q", c("3 + 4 = 7\nAnswer: 9"), b) == pytest.approx(0.05)
    # a search step that ends just before a stop string is blank: it must not cap a correct solution at neutral
    stepped = Candidate(text="\n59 + 8 = 67\nAnswer: 67\n", steps=["\n59 + 8 = 67\n", "Answer: 67\n", ""])
    assert prm.score("q", stepped, b) == 1.0 and stepped.step_scores == [1.0, 1.0]
    with pytest.raises(SteerscaleError, match="reference"):
        get_verifier("exact").score("q", c("1"), b)
    assert extract_answer("x = 3, then 5. Answer: 1,234") == "1234"


@pytest.mark.parametrize("text, answer", [
    ("The answer is 34 + 17 = 51.", "51"),  # a worked expression after "answer is": its result, not 34
    ("answer: 2 * (3 + 4) = 14", "14"),
    ("Answer: -5", "-5"),
    ("Answer: 3.5", "3.5"),
    ("Answer: 1/2.", "1/2"),
    ("Answer: 12\n13 + 1 = 14", "12"),  # the expression skip stays on the answer's line
    ("The answer is (C).", "C"),
    ("Step 2: 20-8", "8"),  # no answer marker: the last number, and a binary minus is not its sign
    ("so x = -5", "-5"),
    ("(3)-2", "2"),
])
def test_extract_answer_reads_the_result_of_a_worked_answer(text, answer):
    assert extract_answer(text) == answer


def test_self_eval_and_logprob_scorers(backend):
    b = Budget()
    v = get_verifier("self_eval", backend=backend)
    cands = [Candidate(text="abc"), Candidate(text="zz")]
    assert score_candidates(v, "q?", cands, b) == []
    assert all(0 < x.score < 1 for x in cands)
    assert b.spent()["verifier_passes"] == 2 and b.spent()["verifier_tokens"] > 0
    assert get_verifier("logprob").score("q", Candidate(logprobs=[math.log(0.5)] * 3), b) == pytest.approx(0.5)


class Flaky(Verifier):
    name = "flaky"

    def score(self, question, candidate, budget, partial=False):
        if candidate.text.count("a") % 2:
            raise RuntimeError("boom")
        return float("nan") if "b" in candidate.text else 0.5


def test_failing_verifier_marks_candidate_failed_and_search_continues(backend):
    r = run_strategy("best_of_n", "abc", backend, Flaky(), Budget(), n=8, max_tokens=6, temperature=1.5, step=None)
    assert len(r.candidates) == 8
    failed = [c for c in r.candidates if c.failed]
    assert failed and r.failures and all(c.score is None for c in failed)
    if len(failed) < 8:
        assert not r.best.failed


# -- strategies -----------------------------------------------------------------------------------------------
KNOBS = {"greedy": {}, "best_of_n": {"n": 4}, "majority": {"n": 4}, "self_consistency": {"n": 4},
         "weighted_vote": {"n": 4}, "adaptive_sc": {"n": 8, "batch": 2}, "beam_search": {"n": 4, "width": 2},
         "dvts": {"n": 4, "width": 2}, "particle_filter": {"n": 4}, "astar": {"n": 2, "max_expansions": 4},
         "entropic_pf": {"n": 4}, "early_pruning": {"n": 4}, "refine": {"n": 2, "rounds": 2},
         "compute_optimal": {"total": 4, "probe": 2},
         "program": {"program": "cot_majority"},
         # hogwild: without its collaboration note, which would not fit the tiny model's 128-token window
         "hogwild": {"n": 2, "protocol": False}}


# navigator: its block prompts outgrow this tiny model's 128-token window; tests/test_navigator.py seeds it on a
# model with a longer one
@pytest.mark.parametrize("name", sorted(set(STRATEGIES) - {"navigator"}))
def test_every_strategy_is_seed_reproducible(backend, name):
    def go(seed):
        r = run_strategy(name, "12 + 3 =", backend, get_verifier("logprob"), Budget(), seed=seed, max_tokens=8,
                         step=" ", max_step_tokens=4, temperature=1.0, **KNOBS[name])
        return r, [c.token_ids for c in r.candidates]

    r1, t1 = go(5)
    r2, t2 = go(5)
    assert t1 == t2 and r1.answer == r2.answer
    assert r1.budget["spent"]["generated_tokens"] > 0 and "flops" in r1.budget["spent"]
    if name not in ("greedy",):
        _, t3 = go(6)
        assert t3 != t1


@pytest.mark.parametrize("name", ["majority", "particle_filter", "beam_search", "astar", "adaptive_sc"])
def test_strategies_stop_when_budget_is_spent(backend, name):
    b = Budget.of(tokens=20)
    r = run_strategy(name, "abc", backend, None, b, seed=0, max_tokens=30, step=" ", temperature=1.0,
                     **KNOBS[name])
    spent = r.budget["spent"]["generated_tokens"]
    assert r.budget["exhausted"] and 20 <= spent <= 20 + 16  # at most one batch step over
    assert r.candidates


def test_compute_optimal_allocates_more_to_harder_prompts(backend):
    from steerscale.scale.strategies import run_compute_optimal

    b = Budget()
    rs = run_compute_optimal(["ab", "xyz"], backend, None, b, total=10, probe=2, seed=0, max_tokens=4,
                             temperature=1.5)
    assert len(rs) == 2 and sum(r.info["samples"] for r in rs) == 10  # every sample of the total is spent
    assert b.spent()["generated_tokens"] == sum(c.n_tokens for r in rs for c in r.candidates)
    with pytest.raises(SteerscaleError):
        run_compute_optimal(["a", "b"], backend, None, Budget(), total=3, probe=2)


def test_entropic_tempering_keeps_ess():
    from steerscale.scale.strategies.extra import tempered

    w, beta = tempered([1.0, 1e-6, 1e-6, 1e-6], 0.5)
    assert beta < 1 and (w.sum() ** 2 / (w ** 2).sum()) / 4 >= 0.5 - 1e-6
    assert tempered([1, 1, 1], 0.5)[1] == 1.0


def test_entropic_tempering_keeps_failed_particles_at_zero():
    from steerscale.scale.strategies.extra import tempered

    w, beta = tempered([1.0, 0.0, float("nan"), 1e-6], 0.9)
    assert beta < 1 and w[1] == 0 and w[2] == 0 and w[3] > 0
    assert tempered([0.0, 0.0], 0.5)[0].tolist() == [0.0, 0.0]


def test_allocate_places_every_sample_by_difficulty_within_the_cap():
    from steerscale.scale.strategies.extra import allocate

    assert allocate(12, [0.5, 0.0, 1.0], 14).tolist() == [4, 0, 8]
    assert allocate(13, [0.5, 0.5, 0.2], 5).tolist() == [5, 5, 3]  # the capped overflow goes to the third
    assert allocate(40, [0.5, 0.0, 1.0], 14).tolist() == [14, 12, 14]  # more than fits: every prompt full
    assert allocate(7, [0, 0, 0], 14).sum() == 7 and allocate(5, [1, 1], 0).sum() == 0


class Recording(Verifier):
    name = "recording"
    process = True

    def __init__(self):
        super().__init__()
        self.calls = []

    def score(self, question, candidate, budget, partial=False):
        self.calls.append((partial, candidate.finished))
        return 1.0 / (1 + len(candidate.text))


@pytest.mark.parametrize("select", ["best", "weighted"])
def test_early_pruning_judges_the_finished_survivors(backend, select):
    v = Recording()
    r = run_strategy("early_pruning", "ab", backend, v, Budget(), n=4, keep=0.5, prune_after=1, select=select,
                     step="c", max_tokens=6, max_step_tokens=2, temperature=1.0, seed=0)
    assert any(p for p, _ in v.calls) and any(not p and fin for p, fin in v.calls)
    kept = [c for c in r.candidates]
    assert len(kept) == 2 and all(c.score == pytest.approx(1.0 / (1 + len(c.text))) for c in kept)
    with pytest.raises(SteerscaleError, match="final selection"):
        run_strategy("early_pruning", "ab", backend, v, Budget(), n=4, select="bogus")


@pytest.mark.parametrize("strategy", ["early_pruning", "beam_search", "dvts", "particle_filter", "entropic_pf",
                                      "astar"])
def test_unknown_final_selection_fails_before_any_sampling(backend, strategy):
    budget = Budget()
    with pytest.raises(SteerscaleError, match=r"(?s)unknown final selection 'bogus'.*best, vote, weighted"):
        run_strategy(strategy, "ab", backend, None, budget, n=4, select="bogus", max_tokens=4)
    assert budget.spent()["generated_tokens"] == 0 and budget.spent()["prompt_tokens"] == 0


def test_voting_and_resampling_helpers():
    assert prob_leader_better(5, 0) > 0.95 > prob_leader_better(2, 1)
    assert prob_leader_better(3, 3) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    idx = resample([0, 0, 1.0, 0], rng)
    assert idx == [2, 2, 2, 2]
    assert len(resample([1, 2, 3], rng, "multinomial")) == 3
    with pytest.raises(SteerscaleError):
        resample([1], rng, "bogus")


def test_adaptive_stopping_rule_replayed_on_a_pool():
    from steerscale.scale.strategies.adaptive import samples_needed, settled

    assert not settled(["7", "7", "7"], min_samples=4)  # too few samples yet
    assert settled(["7"] * 4) and not settled(["7", "7", "7", "8"])  # 4:0 passes the Beta test at 0.95, 3:1 not
    assert settled(["7", "7", "7", "8"], confidence=0.8)
    assert settled(["7", "7", None, "8"], criterion="supermajority", threshold=0.5)
    assert not settled([None] * 6, min_samples=1)
    pool = ["1", "2", "7", "7", "7", "7", "7", "7", "3", "4"]
    assert samples_needed(pool, batch=2, min_samples=2) == 8  # 6:1 after 8 samples is 0.965 (4:1 after 6 is 0.89)
    assert samples_needed(pool, batch=4, min_samples=2) == 8
    assert samples_needed(pool, batch=3, min_samples=2, confidence=0.99) == 10  # never settles: the whole pool
    assert samples_needed(["5"] * 16, batch=2, min_samples=4) == 4
    with pytest.raises(SteerscaleError, match="stopping criterion"):
        settled(["1"], criterion="vote")


def test_adaptive_sc_stops_where_the_replayed_rule_says(backend):
    from steerscale.scale.strategies.adaptive import samples_needed

    r = run_strategy("adaptive_sc", "ab", backend, None, Budget(), n=8, batch=2, min_samples=2, confidence=0.6,
                     max_tokens=3, temperature=1.5, seed=3)
    answers = [c.answer for c in r.candidates]
    assert r.info["samples_used"] == len(answers) == samples_needed(answers, batch=2, min_samples=2, confidence=0.6)
    with pytest.raises(SteerscaleError, match="stopping criterion"):
        run_strategy("adaptive_sc", "ab", backend, None, Budget(), n=8, criterion="bogus")


def test_cli_solve_parser_rejects_bad_budget_before_loading():
    import argparse

    from steerscale.commands import scale_cmds

    p = argparse.ArgumentParser()
    scale_cmds.register(p.add_subparsers())
    args = p.parse_args(["solve", "-p", "hi", "--budget", "tokens=-5", "-m", "does-not-exist"])
    with pytest.raises(SteerscaleError, match="positive"):
        args.func(args)


# -- integration: SmolLM2 -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    from steerscale import load_model

    try:
        lm = load_model("smollm2-135m-instruct")
    except SteerscaleError as exc:
        pytest.skip(str(exc))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # decode steps are tiny; extra threads only contend on a shared CPU
    yield lm
    torch.set_num_threads(threads)


@pytest.mark.integration
def test_smollm2_greedy_matches_generate_and_majority_runs(smol):
    from steerscale import generate
    from steerscale.measure.tasks.arith import make_problems

    model, tok, layout = smol
    be = LocalBackend(model, tok, layout)
    prob = make_problems(1, 0, 1)[0]
    r = run_strategy("greedy", prob.question, be, None, Budget(), max_tokens=12)
    ref = generate(model, tok, layout, [prob.question], max_new_tokens=12)[0]
    assert r.best.token_ids[: ref.n_tokens] == ref.token_ids
    m = run_strategy("particle_filter", prob.question, be, get_verifier("arith_prm"), Budget.of(tokens=200), n=4,
                     max_tokens=16, step="\n", seed=0)
    assert m.candidates and m.budget["spent"]["generated_tokens"] <= 200 + 4


@pytest.mark.integration
def test_smollm2_cli_solve_json(smol, capsys):
    import json

    from steerscale.cli import build_parser

    parser = build_parser()
    if "solve" not in parser.format_help():
        import argparse

        from steerscale.commands import scale_cmds

        parser = argparse.ArgumentParser()
        scale_cmds.register(parser.add_subparsers())
    args = parser.parse_args(["solve", "-p", "What is 2 + 3?", "--strategy", "majority", "-n", "2",
                              "--max-tokens", "8", "--budget", "tokens=100", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["strategy"] == "majority" and len(out["candidates"]) == 2
    assert out["budget"]["spent"]["generated_tokens"] <= 100


def test_gym_arithmetic_problems_are_seeded_and_answered():
    pytest.importorskip("reasoning_gym")
    from steerscale.measure.tasks.arith import gym_problems

    a, b = gym_problems(12, 3, terms=3, digits=2), gym_problems(12, 3, terms=3, digits=2)
    assert a == b and a != gym_problems(12, 4, terms=3, digits=2)
    for p in a:
        assert p.n_ops == 2 and "(" not in p.expression
        assert int(p.answer) == eval(p.expression, {"__builtins__": {}})
        assert p.question.endswith(f"Calculate {p.expression}.")
    with pytest.raises(SteerscaleError):
        gym_problems(0)


def test_few_shot_arithmetic_prompt_has_worked_examples_distinct_from_the_test_problems():
    from steerscale.measure.tasks.arith import make_problems, worked_solution

    assert worked_solution("3 * 12 + 40") == "3 * 12 = 36\n36 + 40 = 76\nAnswer: 76"
    assert worked_solution("0 - 4 - 8") == "0 - 4 = -4\n-4 - 8 = -12\nAnswer: -12"
    plain = make_problems(30, 2, difficulty=1)
    shot = make_problems(30, 2, difficulty=1, shots=3)
    assert [(p.expression, p.answer) for p in shot] == [(p.expression, p.answer) for p in plain]
    examples = shot[0].examples
    assert len(examples) == 3 and all(p.examples == examples for p in shot)
    assert not set(examples) & {p.expression for p in plain}
    q = shot[0].question
    assert q.count("Question: Calculate") == 4 and q.endswith(f"Question: Calculate {shot[0].expression}.\n")
    for e in examples:  # every worked example is right
        assert f"Answer: {eval(e, {'__builtins__': {}})}\n" in q
    assert make_problems(30, 2, difficulty=1, shots=3) == shot
    for bad in (-1, 1.5):
        with pytest.raises(SteerscaleError, match="shots"):
            make_problems(3, 0, 1, shots=bad)


def test_step_end_skips_leading_whitespace_delimiters():
    from steerscale.scale.backend import step_end

    assert step_end("12 + 3 = 15\nAns", "\n") == len("12 + 3 = 15\n")
    # a step that opens with the delimiter ends at the next one (it used to run to max_step_tokens)
    assert step_end("\n12 + 3 = 15\nAns", "\n") == len("\n12 + 3 = 15\n")
    assert step_end("\n \n", "\n") == -1 and step_end("no delimiter", "\n") == -1 and step_end("", "\n") == -1
    assert step_end("Step 1: a. Step 2", "Step") == len("Step 1: a. Step")


def test_stop_string_split_across_steps_is_found():
    from steerscale.scale.backend import find_stop

    assert find_stop("1 + 5 = 6\n", "\nSo the answer", ["\n\n"]) == 0  # "\n" ended the step, "\n" opens the next
    assert find_stop("", "6\n\nSo", ["\n\n"]) == 1
    assert find_stop("6\n", "So", ["\n\n"]) == -1 and find_stop("anything", "text", []) == -1
    assert find_stop("a", "bQuestion:", ["Question:", "b"]) == 0


def test_particle_filter_temperature_is_the_sampling_temperature(backend):
    # the weights have their own knob; temperature 0 samples greedily (it used to be taken as the weight
    # temperature and rejected)
    r = run_strategy("particle_filter", "Calculate 2 + 2.", backend, get_verifier("logprob"), Budget(), n=3,
                     temperature=0.0, step="\n", max_tokens=6, seed=0)
    assert len({c.text for c in r.candidates}) == 1
    with pytest.raises(SteerscaleError, match="weight_temperature"):
        run_strategy("particle_filter", "Calculate 2 + 2.", backend, None, Budget(), n=2, weight_temperature=0.0)
