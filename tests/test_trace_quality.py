"""Trace-quality ranking: step segmentation, abandoned branches, the failed-step fraction (``fsf`` verifier) and
the review ratio; the verifier ranks candidates in a strategy, from Python, the server's spec and the CLI."""

import pytest

from steerscale import SteerscaleError
from steerscale.scale import Budget, Candidate, get_verifier, run_strategy
from steerscale.scale.spec import StrategySpec
from steerscale.scale.verifiers import score_candidates
from steerscale.scale.verifiers.trace_quality import segment, split_steps, trace_features

BACKTRACKING = """We need 3 + 4. 3 + 4 = 8.
Wait, that is wrong. Let me redo it.
3 + 4 = 7. Let me check: 7 - 4 = 3.
The answer is 7."""
STRAIGHT = "We need 3 + 4.\n3 + 4 = 7.\nThe answer is 7."


def test_split_steps_cuts_lines_and_sentences():
    assert split_steps("a = 1. b = 2!\n\nc?  d") == ["a = 1.", "b = 2!", "c?", "d"]
    assert split_steps("") == [] and split_steps("  \n ") == []
    assert split_steps("x = 3.5 and y = 2.") == ["x = 3.5 and y = 2."]  # a decimal point is no sentence end


def test_segment_opens_branches_at_leading_markers_only():
    steps = ["Try 2.", "Hmm, wait, no.", "Let me try again.", "It is actually 3.", "Alternatively use 4.", "Done."]
    # "wait" (after the filler "Hmm,") opens branch 1, "Let me try again" continues that run of markers, "actually"
    # in mid-sentence is no marker, "Alternatively" opens branch 2
    assert segment(steps) == [0, 1, 1, 1, 2, 2]
    assert segment(["Wait, first step."]) == [0]  # nothing before it to abandon
    assert segment(["ok", "Waiting is fine."]) == [0, 0]  # a whole word, not a prefix


def test_trace_features_fsf_and_review_ratio():
    f = trace_features(BACKTRACKING)
    assert f.n_steps == 7 and f.n_branches == 2 and f.abandoned_steps == 2 and f.review_steps == 1
    assert f.fsf == pytest.approx(2 / 7) and f.review_ratio == pytest.approx(1 / 7)
    s = trace_features(STRAIGHT)
    assert s.fsf == 0.0 and s.n_branches == 1 and s.review_ratio == 0.0
    empty = trace_features("")
    assert empty.n_steps == 0 and empty.fsf == 0.0 and empty.n_branches == 0
    # every restart abandons all that came before it
    assert trace_features("A.\nB.\nWait.\nC.\nActually.\nD.").fsf == pytest.approx(4 / 6)


def test_fsf_verifier_ranks_low_fsf_first_and_records_features():
    v = get_verifier("fsf")
    cands = [Candidate(text=BACKTRACKING), Candidate(text=STRAIGHT)]
    budget = Budget()
    assert score_candidates(v, "3 + 4?", cands, budget) == []
    assert cands[1].score == 1.0 > cands[0].score == pytest.approx(1 - 2 / 7)
    assert cands[0].meta["trace"]["fsf"] == pytest.approx(2 / 7, abs=1e-6)
    assert budget.spent()["generated_tokens"] == 0 and budget.spent()["verifier_passes"] == 0  # free
    custom = get_verifier("fsf", markers="redo", review="verify")
    c = [Candidate(text="A.\nWait.\nB.\nRedo.\nC.")]
    score_candidates(custom, "q", c, budget)
    assert c[0].meta["trace"]["abandoned_steps"] == 3  # only "Redo." opens a branch
    with pytest.raises(SteerscaleError, match="markers"):
        get_verifier("fsf", markers=" , ")
    with pytest.raises(SteerscaleError, match="no candidates"):
        v.score_batch("q", [], budget)


def test_fsf_guides_strategies_on_a_tiny_model(backend):
    for name in ("best_of_n", "weighted_vote", "beam_search"):
        knobs = {"n": 4, "max_tokens": 6, "seed": 0}
        if name == "beam_search":
            knobs.update(width=2, step="\n")
        r = run_strategy(name, "1+1=", backend, get_verifier("fsf"), Budget.of(tokens=200), **knobs)
        assert r.candidates and all(c.score is not None and 0.0 <= c.score <= 1.0 for c in r.candidates
                                    if not c.failed)
    spec = StrategySpec.from_json({"name": "best_of_n", "n": 2, "max_tokens": 5, "verifier": "fsf",
                                   "verifier_opts": {"markers": "wait,actually"}})
    result = spec.run("2+2=", backend)
    assert result.best is not None and "trace" in result.best.meta
