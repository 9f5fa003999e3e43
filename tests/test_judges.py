"""Generative judges (``genjudge``, ``pairwise_consistent``): score parsing, voting, the meta-probe filter, the
unscored fallback, budget charging, swapped-order consistency; on a tiny random model and on scripted judges
whose replies are known, plus one SmolLM2 integration run."""

import math

import pytest
import torch

from steerscale import SteerscaleError
from steerscale.scale import Budget, Candidate, get_verifier
from steerscale.scale.backend import Backend
from steerscale.scale.spec import StrategySpec
from steerscale.scale.verifiers import VERIFIERS, score_candidates
from steerscale.scale.verifiers.judges import (MetaProbe, judge_sample_features, parse_score, train_meta_probe,
                                               vote_scores)


class ScriptedJudge(Backend):
    """A judge whose samples are given: ``replies`` cycles through texts; ``embed`` gives a 2-d feature per text
    (1 in the first coordinate when the text contains "careful", else in the second), charged as verifier passes.
    Pairwise prompts ("...Answer A: x...Answer B: y...") get ``pick(a, b, shown_first)`` -> "A"/"B" text."""

    name = "scripted"

    def __init__(self, replies=(), pick=None):
        self.replies, self.pick, self.prompts = list(replies), pick, []

    def sample(self, prompt, n, params, budget, *, seed=None):
        self.prompts.append(prompt)
        budget.charge(generated_tokens=n * params.max_tokens)
        if self.pick is not None:
            a = prompt.split("Answer A: ", 1)[1].split("\n\nAnswer B: ", 1)[0]
            b = prompt.split("Answer B: ", 1)[1].split("\n\n", 1)[0]
            return [Candidate(text=self.pick(a, b)) for _ in range(n)]
        return [Candidate(text=self.replies[i % len(self.replies)]) for i in range(n)]

    def embed(self, texts, budget, *, layer=-1):
        budget.charge(verifier_passes=len(texts))
        return torch.tensor([[1.0, 0.0] if "careful" in t else [0.0, 1.0] for t in texts])

    def choice_logprobs(self, contexts, options, budget):
        raise NotImplementedError

    def start(self, *a, **k):
        raise NotImplementedError

    extend = select = merge = start


def test_parse_score_and_vote():
    assert parse_score("Principles: be right.\nCritique: fine.\nScore: 7") == 7.0
    assert parse_score("score = 4/10 ... final Score: 9 out of 10") == 9.0  # the last one counts
    assert parse_score("**Score:** 8") == 8.0
    for bad in ("Score: 0", "Score: 11", "it is a 7", ""):
        assert parse_score(bad) is None
    assert vote_scores([2, 8, 8]) == 6.0 and vote_scores([2, 8, 8], "majority") == 8.0
    assert vote_scores([3, 9], "majority") == 3.0  # a tie goes to the lower score
    assert math.isnan(vote_scores([]))


def test_registered_and_checked(backend):
    assert {"genjudge", "pairwise_consistent"} <= set(VERIFIERS)
    with pytest.raises(SteerscaleError, match="backend"):
        get_verifier("genjudge")
    for bad, match in (({"aggregate": "median"}, "aggregate"), ({"votes": 0}, "votes"), ({"meta_keep": 0}, "meta_keep"),
                       ({"template": "no fields"}, "template"),
                       ({"template": "{question} {solution} {oops}"}, "bad genjudge template"),
                       ({"meta_probe": "/nonexistent.safetensors"}, "not found")):
        with pytest.raises(SteerscaleError, match=match):
            get_verifier("genjudge", backend=backend, **bad)
    with pytest.raises(SteerscaleError, match="critique"):
        get_verifier("pairwise_consistent", backend=backend, critique="yes")


def test_genjudge_votes_scripted_samples_and_charges_judge_calls():
    be = ScriptedJudge(["Principles: x\nCritique: y\nScore: 9", "Critique: no score at all", "Score: 3"])
    v = get_verifier("genjudge", backend=be, votes=3, max_tokens=20)
    budget = Budget()
    cands = [Candidate(text="The answer is 4.")]
    assert score_candidates(v, "2+2?", cands, budget) == []
    assert cands[0].score == pytest.approx(0.6)  # the unparsable sample is dropped: (9 + 3) / 2 / 10
    assert cands[0].meta["judge"]["parsed"] == 2 and cands[0].meta["judge"]["samples"] == 3
    assert budget.spent()["judge_calls"] == 3 and budget.spent()["generated_tokens"] == 60
    assert "2+2?" in be.prompts[0] and "The answer is 4." in be.prompts[0] and "Principles" in be.prompts[0]
    # a judge-call cap: only the first sample is affordable, and the second candidate gets none (unscored)
    capped = Budget.of(judge=1)
    two = [Candidate(text="a"), Candidate(text="b")]
    failures = score_candidates(v, "q", two, capped)
    assert two[0].score == pytest.approx(0.9) and two[1].failed and len(failures) == 1
    assert capped.spent()["judge_calls"] == 1


def test_genjudge_that_never_scores_falls_back_to_unscored_on_a_real_model(backend):
    """A tiny random model never writes "Score: N": every candidate is unscored (failed, NaN), generation stops
    at max_tokens, and the cost is charged."""
    v = get_verifier("genjudge", backend=backend, votes=2, max_tokens=6, seed=1, template="{question} {solution} S:")
    cands = [Candidate(text="12"), Candidate(text="13")]
    budget = Budget()
    failures = score_candidates(v, "1+11?", cands, budget)
    assert all(c.failed and c.score is None for c in cands) and len(failures) == 2
    spent = budget.spent()
    assert spent["judge_calls"] == 4 and 0 < spent["generated_tokens"] <= 4 * 6 and spent["prompt_tokens"] > 0


def test_meta_probe_trains_saves_loads_and_filters_votes(tmp_path):
    feats = torch.tensor([[1.0, 0.0]] * 6 + [[0.0, 1.0]] * 6)
    labels = [1] * 6 + [0] * 6
    probe = train_meta_probe(feats, labels, layer=-2)
    path = probe.save(tmp_path / "meta.safetensors")
    back = MetaProbe.load(path)
    assert back.layer == -2 and back.info["n"] == 12
    p = back.predict(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert p[0] > 0.8 > 0.2 > p[1]
    with pytest.raises(SteerscaleError, match="both"):
        train_meta_probe(feats, [1] * 12)
    with pytest.raises(SteerscaleError, match="3-dim|2-dim"):
        back.predict(torch.zeros(1, 3))
    (tmp_path / "bad.safetensors").write_bytes(b"not a probe")
    with pytest.raises(SteerscaleError, match="cannot read"):
        MetaProbe.load(tmp_path / "bad.safetensors")

    # two careful samples say 9, two careless ones say 1: unfiltered the vote is 5, the probe keeps the careful half
    replies = ["careful check. Score: 9", "Score: 1", "careful again. Score: 9", "Score: 1"]
    plain = get_verifier("genjudge", backend=ScriptedJudge(replies), votes=4)
    meta = get_verifier("genjudge", backend=ScriptedJudge(replies), votes=4, meta_probe=str(path), meta_keep=0.5)
    c1, c2 = [Candidate(text="x")], [Candidate(text="x")]
    b1, b2 = Budget(), Budget()
    score_candidates(plain, "q", c1, b1)
    score_candidates(meta, "q", c2, b2)
    assert c1[0].score == pytest.approx(0.5) and c2[0].score == pytest.approx(0.9)
    assert c2[0].meta["judge"]["kept"] == 2 and len(c2[0].meta["judge"]["meta"]) == 4
    assert b2.spent()["verifier_passes"] == 4 and b1.spent()["verifier_passes"] == 0  # the probe's reads are paid


def test_judge_sample_features_on_a_real_model(backend):
    budget = Budget()
    x = judge_sample_features(backend, "Grade: 1+1=2", [" Score: 9", " Score: 2 because"], budget, layer=-1)
    assert x.shape == (2, backend.model.config.hidden_size) and bool(torch.isfinite(x).all())
    assert budget.spent()["verifier_passes"] == 2


def test_pairwise_consistent_ties_order_flips_that_plain_pairwise_counts():
    """A judge swayed by position on one pair (good vs meh: whichever is shown first wins): the consistent judge
    counts that pair as a tie and reports 2 of 3 pairs consistent. With hard single votes a flip averages to 0.5
    in plain pairwise too; with soft decisions (log-probs, several votes) plain pairwise lets the stronger
    position preference pick a winner, the consistent judge does not."""

    def pick(a, b):  # "good" beats "meh" only when shown first; "good" always beats "bad"
        if {a, b} == {"good", "meh"}:
            return "A"  # position decides
        return "A" if a == "good" or (a == "meh" and b == "bad") else "B"

    texts = ["good", "meh", "bad"]
    plain = get_verifier("pairwise", backend=ScriptedJudge(pick=pick), mode="sample", votes=1,
                         template="Q {question}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\nend")
    cons = get_verifier("pairwise_consistent", backend=ScriptedJudge(pick=pick), mode="sample", votes=1,
                        template="Q {question}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\nend")
    cp, cc = [Candidate(text=t) for t in texts], [Candidate(text=t) for t in texts]
    score_candidates(plain, "q", cp, Budget())
    budget = Budget()
    score_candidates(cons, "q", cc, budget)
    assert [c.score for c in cp] == pytest.approx([0.75, 0.75, 0.0])
    assert [c.score for c in cc] == pytest.approx([0.75, 0.75, 0.0])
    assert cons.last_info["consistency"] == pytest.approx(2 / 3) and cc[0].meta["pair_consistency"] == 0.6667
    assert budget.spent()["judge_calls"] == 6  # 3 pairs x 2 orders x 1 vote

    # soft (log-prob) decisions: 0.95 shown first, 0.40 shown second -> plain says a wins (0.675), consistent ties
    assert cons.pair_probability(0.95, 0.40) == 0.5 and plain.pair_probability(0.95, 0.40) == pytest.approx(0.675)
    assert cons.pair_probability(0.9, 0.7) == pytest.approx(0.8)
    assert cons.pair_probability(math.nan, 0.7) == pytest.approx(0.7)  # one order undecided: no check possible


def test_pairwise_consistent_critique_reads_the_last_verdict():
    def pick(a, b):
        return f"Answer A is sloppy; B checks out.\nVerdict: {'A' if a == 'right' else 'B'}"

    v = get_verifier("pairwise_consistent", backend=ScriptedJudge(pick=pick), critique=True, votes=2)
    assert v.mode == "sample" and v.verdict_tokens == 160 and "Verdict" in v.template
    assert v.parse_pick("A is bad. Verdict: B") == "B" and v.parse_pick("A is fine") is None
    cands = [Candidate(text="right"), Candidate(text="wrong")]
    score_candidates(v, "q", cands, Budget())
    assert cands[0].score == 1.0 and cands[1].score == 0.0 and v.last_info["consistency"] == 1.0


def test_genjudge_through_a_strategy_spec_as_the_server_builds_it(backend):
    spec = StrategySpec.from_json({"name": "best_of_n", "n": 2, "max_tokens": 4, "verifier": "genjudge",
                                   "verifier_opts": {"votes": 1, "max_tokens": 4, "template": "{question}{solution}"},
                                   "budget": "judge=10"})
    result = spec.run("1+1?", backend)
    assert len(result.candidates) == 2 and result.budget["spent"]["judge_calls"] == 2


@pytest.mark.integration
def test_smollm2_genjudge_runs_and_charges(smol_backend):
    v = get_verifier("genjudge", backend=smol_backend, votes=2, max_tokens=24)
    cands = [Candidate(text="2 + 3 = 5. The answer is 5.")]
    budget = Budget()
    score_candidates(v, "What is 2 + 3?", cands, budget)
    info = cands[0].meta["judge"]
    assert info["samples"] == 2 and budget.spent()["judge_calls"] == 2
    assert cands[0].failed == (info["parsed"] == 0)
    assert cands[0].failed or 0.1 <= cands[0].score <= 1.0


@pytest.fixture(scope="module")
def smol_backend():
    from steerscale import load_model
    from steerscale.scale import LocalBackend

    try:
        model, tok, layout = load_model("smollm2-135m-instruct")
    except SteerscaleError as exc:
        pytest.skip(str(exc))
    return LocalBackend(model, tok, layout)


def test_meta_filter_keeps_the_top_share():
    from steerscale.scale.verifiers.judges import meta_filter

    assert meta_filter([1, 9, 5, 7], [0.1, 0.9, math.nan, 0.8], 0.5) == [9, 7]
    assert meta_filter([1, 9], [0.3, 0.2], 0.1) == [1]  # at least one
    assert meta_filter([1, 9], [], 0.5) == [1, 9]  # no probe: everything


def test_logprob_fallback_scores_what_the_format_ignoring_model_wrote(backend):
    """fallback=logprob: the tiny model never writes "Score: N", so each sample's score is read from its digit
    probabilities after the judgement (one charged verifier pass per sample), in 1..10."""
    v = get_verifier("genjudge", backend=backend, votes=2, max_tokens=4, template="{question}{solution}",
                     fallback="logprob")
    cands = [Candidate(text="12")]
    budget = Budget()
    assert score_candidates(v, "1+11?", cands, budget) == []
    assert 0.1 <= cands[0].score <= 1.0 and cands[0].meta["judge"]["parsed"] == 2
    assert budget.spent()["verifier_passes"] == 2 and budget.spent()["judge_calls"] == 2
    with pytest.raises(SteerscaleError, match="fallback"):
        get_verifier("genjudge", backend=backend, fallback="guess")
