"""Verifiers and scorers added for inference-time scaling: pairwise judge, answer features, reasoning-gym,
the representation-diversity bonus (``backend.embed``) and entropic particle filtering's look-ahead modulation."""

import json
import math

import numpy as np
import pytest
import torch

from steerscale import SteerscaleError
from steerscale.scale import Budget, Candidate, get_verifier, run_strategy
from steerscale.scale.backend import Backend
from steerscale.scale.strategies.extra import modulate
from steerscale.scale.strategies.search import run_particle_filter
from steerscale.scale.verifiers import VERIFIERS, parse_options, parse_value, score_candidates
from steerscale.scale.verifiers.base import Verifier


def cands(*texts, logprobs=None):
    out = [Candidate(text=t) for t in texts]
    for c, lp in zip(out, logprobs or []):
        c.logprobs = [lp]
    return out


class FakeJudge(Backend):
    """A judge with a known preference and a strong position bias: it likes answers containing "good"
    (+3 logits) and, everything else equal, always prefers the answer shown first (+1.5 logits for A).
    Prompts use the template ``"{question}|A:{a}|B:{b}"``. It cannot embed (the Backend default)."""

    name = "fake"

    def __init__(self, unparseable_every: int = 0):
        self.calls = 0
        self.unparseable_every = unparseable_every

    @staticmethod
    def logits(context):
        a = context.split("|A:", 1)[1].split("|B:", 1)[0]
        b = context.split("|B:", 1)[1]
        return 1.5 + 3.0 * ("good" in a), 3.0 * ("good" in b)

    def choice_logprobs(self, contexts, options, budget):
        out = []
        for c in contexts:
            la, lb = self.logits(c)
            z = math.log(math.exp(la) + math.exp(lb))
            out.append([la - z, lb - z])
        budget.charge(verifier_passes=len(contexts))
        return out

    def sample(self, prompt, n, params, budget, *, seed=None, steer_scales=None):
        la, lb = self.logits(prompt)
        rows = []
        for _ in range(n):
            self.calls += 1
            unparseable = self.unparseable_every and self.calls % self.unparseable_every == 0
            rows.append(Candidate(text="??" if unparseable else ("A" if la > lb else "B.")))
        budget.charge(generated_tokens=n)
        return rows

    def start(self, *a, **k):
        raise NotImplementedError

    extend = select = merge = start


TEMPLATE = "{question}|A:{a}|B:{b}"


# -- option parsing and the registry -----------------------------------------------------------------------------
def test_option_parsing_and_strict_get_verifier(backend):
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("none") is None and parse_value("arith_prm") == "arith_prm"
    assert parse_options("length=0.3; hedging=1") == {"length": 0.3, "hedging": 1}
    with pytest.raises(SteerscaleError, match="bad"):
        parse_options("length")
    for name in ("pairwise", "length", "hedging", "features", "gym", "diverse"):
        assert name in VERIFIERS
    # reference/backend are context: dropped where not accepted; anything else unknown is an error
    assert get_verifier("length", reference="x", backend=backend).name == "length"
    with pytest.raises(SteerscaleError, match="no option 'bogus'"):
        get_verifier("judge", backend=backend, bogus=1)
    with pytest.raises(SteerscaleError, match="no option"):
        get_verifier("hedging", target=3)
    with pytest.raises(SteerscaleError, match="no option 'kwargs'"):  # object.__init__'s *args/**kwargs are not options
        get_verifier("exact", kwargs=1)


# -- answer features ---------------------------------------------------------------------------------------------
def test_length_scorer():
    b = Budget()
    short = get_verifier("length", scale=10)
    assert short.score("q", Candidate(text="one two three"), b) == pytest.approx(math.exp(-3 / 10))
    assert short.score("q", Candidate(text=""), b) == 1.0
    near = get_verifier("length", target=4, scale=2)
    s = near.score_batch("q", cands("a b c d", "a b", "a b c d e f g h"), b)
    assert s == pytest.approx([1.0, math.exp(-1), math.exp(-2)])
    chars = get_verifier("length", unit="chars", scale=5)
    assert chars.score("q", Candidate(text=" abcde "), b) == pytest.approx(math.exp(-1))
    tok = get_verifier("length", unit="tokens", scale=4)
    assert tok.score("q", Candidate(text="xy", token_ids=[5, 6, 7, 8]), b) == pytest.approx(math.exp(-1))
    text_only = cands("no token ids here", "x")
    text_only[1].token_ids = [3]
    failures = score_candidates(tok, "q", text_only, b)  # tokens unit without token ids: that candidate fails
    assert text_only[0].failed and not text_only[1].failed and len(failures) == 1
    for bad in ({"scale": float("nan")}, {"scale": 0}, {"target": -1}, {"unit": "bytes"}, {"target": "x"}):
        with pytest.raises(SteerscaleError):
            get_verifier("length", **bad)
    with pytest.raises(SteerscaleError, match="no candidates"):
        short.score_batch("q", [], b)


def test_hedging_scorer():
    h = get_verifier("hedging")
    assert h.hits("The answer is 12.") == 0
    assert h.hits("I think it might be 4, but I\u2019m not sure. Maybe.") == 4  # "I'm not sure" counts once
    assert h.hits("Maybelline mighty thinking") == 0  # whole words only
    b = Budget()
    assert h.score("q", Candidate(text="Perhaps 3. Probably."), b) == pytest.approx(0.75 ** 2)
    custom = get_verifier("hedging", phrases="so to speak, kinda", penalty=0.5)
    assert custom.score("q", Candidate(text="It is kinda 5, so to speak; maybe."), b) == pytest.approx(0.25)
    assert get_verifier("hedging", penalty=1.0).score("q", Candidate(text="maybe"), b) == 0.0
    for bad in ({"penalty": 1.5}, {"penalty": float("nan")}, {"phrases": " , "}):
        with pytest.raises(SteerscaleError):
            get_verifier("hedging", **bad)


def test_features_combines_length_and_hedging():
    b = Budget()
    f = get_verifier("features", weights="length=1,hedging=3", scale=10, penalty=0.5)
    c = Candidate(text="maybe 7")
    assert f.score("q", c, b) == pytest.approx(0.25 * math.exp(-0.2) + 0.75 * 0.5)
    only = get_verifier("features", weights={"hedging": 2, "length": 0})
    assert only.score("q", Candidate(text="a b c d e f g h i j maybe"), b) == pytest.approx(0.75)
    for bad in ("length=0,hedging=0", "length=-1,hedging=2", "speed=1", "length=nan"):
        with pytest.raises(SteerscaleError):
            get_verifier("features", weights=bad)


# -- pairwise judge ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["logprob", "sample"])
def test_pairwise_cancels_position_bias_and_finds_the_preferred_answer(mode):
    judge = FakeJudge()
    v = get_verifier("pairwise", backend=judge, template=TEMPLATE, mode=mode, votes=3)
    b = Budget()
    plain = v.score_batch("q", cands("x1", "x2", "x3"), b)
    assert plain == pytest.approx([0.5, 0.5, 0.5])  # the judge only prefers position A: both orders cancel it
    s = v.score_batch("q", cands("bad", "good one", "worse", "good one"), b)
    assert s[1] == s[3] > s[0] == s[2]  # duplicates merged and scored alike
    if mode == "logprob":
        pa = 1 / (1 + math.exp(-(1.5 + 3.0)))  # good shown as A
        pb = 1 - 1 / (1 + math.exp(-(1.5 - 3.0)))  # good shown as B
        win = (pa + pb) / 2
        assert s[1] == pytest.approx(win) and s[0] == pytest.approx((1 - win + 0.5) / 2)
        assert b.spent()["judge_calls"] == 2 * 3 + 2 * 3  # 3 pairs x 2 orders, twice
        assert b.spent()["verifier_passes"] == 12
    else:
        assert s[1] == pytest.approx(1.0) and s[0] == pytest.approx(0.25)
        assert b.spent()["judge_calls"] == 3 * 12 and b.spent()["generated_tokens"] == 36


def test_pairwise_sample_mode_drops_unparseable_votes():
    v = get_verifier("pairwise", backend=FakeJudge(unparseable_every=2), template=TEMPLATE, mode="sample", votes=2)
    s = v.score_batch("q", cands("good", "bad"), Budget())
    assert s == pytest.approx([1.0, 0.0])  # one of each prompt's two votes is "??": the other decides
    allbad = get_verifier("pairwise", backend=FakeJudge(unparseable_every=1), template=TEMPLATE, mode="sample")
    scored = cands("good", "bad")
    failures = score_candidates(allbad, "q", scored, Budget())
    assert all(c.failed for c in scored) and len(failures) == 2  # no parseable vote at all: NaN -> failed


def test_pairwise_pivot_above_the_round_robin_cap():
    judge = FakeJudge()
    v = get_verifier("pairwise", backend=judge, template=TEMPLATE, round_robin_max=3)
    b = Budget()
    texts = ["a", "b", "good", "c", "d"]
    s = v.score_batch("q", cands(*texts, logprobs=[-2.0, -0.1, -3.0, -1.0, -5.0]), b)
    assert v.last_info["pivot"] == 1 and v.last_info["judged_pairs"] == 4  # most confident answer is the pivot
    assert b.spent()["judge_calls"] == 8  # 2 (k - 1) prompts instead of k (k - 1)
    assert s[2] > 0.5 and s[0] == s[3] == s[4] == pytest.approx(0.5)
    assert s[1] == pytest.approx((3 * 0.5 + (1 - s[2])) / 4)  # the pivot: mean win rate over its 4 games
    small = get_verifier("pairwise", backend=judge, template=TEMPLATE)
    small.score_batch("q", cands(*texts), Budget())
    assert small.last_info["pivot"] is None and small.last_info["judged_pairs"] == 10


def test_pairwise_on_a_tiny_model(backend):
    v = get_verifier("pairwise", backend=backend, template="{question}|{a}|{b}|")
    b = Budget()
    group = cands("12", "15", "12", "7 + 5")
    s = v.score_batch("7+5?", group, b)
    assert all(0 <= x <= 1 for x in s) and s[0] == s[2]
    distinct = [s[0], s[1], s[3]]
    assert sum(distinct) / 3 == pytest.approx(0.5)  # round-robin win rates of complementary probabilities
    assert b.spent()["judge_calls"] == 6 and b.spent()["verifier_passes"] == 6 and b.spent()["flops"] > 0
    assert v.score_batch("7+5?", group, Budget()) == s  # deterministic
    assert v.score_batch("7+5?", cands("only"), Budget()) == [0.5]
    sampled = get_verifier("pairwise", backend=backend, template="{question}|{a}|{b}|", mode="sample", votes=2)
    b2 = Budget()
    s2 = sampled.score_batch("7+5?", cands("12", "15"), b2)
    assert all(math.isnan(x) or 0 <= x <= 1 for x in s2)
    assert b2.spent()["judge_calls"] == 4 and b2.spent()["generated_tokens"] > 0
    r = run_strategy("best_of_n", "7+5=", backend, v, Budget(), n=3, max_tokens=4, temperature=1.0, step=None)
    assert r.budget["spent"]["judge_calls"] > 0 and all(c.score is not None for c in r.candidates)


def test_pairwise_bad_input(backend):
    for bad in ({"mode": "duel"}, {"votes": 0}, {"round_robin_max": 1}, {"template": "{question} {a}"},
                {"template": "{question}{a}{b}{c}"}, {"temperature": float("nan")}, {"batch": 0}):
        with pytest.raises(SteerscaleError):
            get_verifier("pairwise", backend=backend, **bad)
    with pytest.raises(SteerscaleError, match="backend"):
        get_verifier("pairwise")
    with pytest.raises(SteerscaleError, match="no candidates"):
        get_verifier("pairwise", backend=backend).score_batch("q", [], Budget())


# -- embeddings and the diversity bonus ------------------------------------------------------------------------
def test_local_embed_mean_pools_hidden_states(backend):
    b = Budget()
    texts = ["abc", "hello world", "abc"]
    e = backend.embed(texts, b)
    assert e.shape == (3, backend.model.config.hidden_size) and e.dtype == torch.float32
    assert torch.allclose(e[0], e[2])
    ids = torch.tensor([backend.tokenizer.encode("hello world")])
    with torch.no_grad():
        h = backend.model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states[-1][0]
    assert torch.allclose(e[1], h.float().mean(0), atol=1e-5)  # left padding in the batch changes nothing
    assert torch.allclose(backend.embed(["abc"], Budget())[0], e[0], atol=1e-5)
    assert b.spent()["verifier_tokens"] == 3 + 11 + 3 and b.spent()["verifier_passes"] == 3
    assert b.spent()["flops"] == pytest.approx(2 * backend.n_params * 17)
    first = backend.embed(texts, Budget(), layer=0)
    assert not torch.allclose(first, e)
    for bad, match in (([], "at least one"), (["a", ""], "no tokens")):
        with pytest.raises(SteerscaleError, match=match):
            backend.embed(bad, Budget())
    with pytest.raises(SteerscaleError, match="layer"):
        backend.embed(["a"], Budget(), layer=9)


def test_backend_without_embed_raises():
    with pytest.raises(SteerscaleError, match="cannot embed"):
        FakeJudge().embed(["x"], Budget())
    with pytest.raises(SteerscaleError, match="embed"):
        get_verifier("diverse", backend=FakeJudge())


def test_diverse_adds_bonus_for_distinct_candidates(backend):
    b = Budget()
    v = get_verifier("diverse", backend=backend, base="length", weight=0.5, base_options="scale=4")
    group = cands("same text", "same text", "zq 9")
    s = v.score_batch("q", group, b)
    base = [math.exp(-2 / 4), math.exp(-2 / 4), math.exp(-2 / 4)]
    e = torch.nn.functional.normalize(backend.embed([c.text for c in group], Budget()), dim=-1)
    bonus_far = 1 - max(float(e[2] @ e[0]), float(e[2] @ e[1]))
    assert s[0] == pytest.approx(base[0]) and s[1] == pytest.approx(base[1])  # copies: no bonus
    assert bonus_far > 0 and s[2] == pytest.approx(min(1.0, base[2] + 0.5 * bonus_far))
    assert group[2].meta["diversity"] == pytest.approx(bonus_far, abs=1e-6)
    assert b.spent()["verifier_passes"] == 3  # one embed pass over the batch
    big = get_verifier("diverse", backend=backend, base="length", weight=100.0)
    assert big.score_batch("q", group, Budget())[2] == 1.0  # clipped
    off = get_verifier("diverse", backend=backend, base="length", weight=0)
    b0 = Budget()
    assert off.score_batch("q", group, b0) == pytest.approx(get_verifier("length").score_batch("q", group, b0))
    assert b0.spent()["verifier_passes"] == 0
    assert v.score_batch("q", cands("alone"), Budget()) == pytest.approx([math.exp(-1 / 4)])


def test_diverse_keeps_base_failures_process_flag_and_reference(backend):
    tok = get_verifier("diverse", backend=backend, base="length", base_options={"unit": "tokens"})
    group = cands("no ids", "with ids")
    group[1].token_ids = [4, 5]
    failures = score_candidates(tok, "q", group, Budget())
    assert group[0].failed and not group[1].failed and failures
    prm = get_verifier("diverse", backend=backend, base="arith_prm")
    assert prm.process
    c = cands("2 + 2 = 4\nAnswer: 4", "2 + 2 = 5")
    prm.score_batch("q", c, Budget())
    assert c[0].step_scores == [1.0, 1.0] and c[1].step_scores == [0.05]
    ex = get_verifier("diverse", backend=backend, base="exact", weight=0.0, reference="4")
    assert ex.needs_reference and ex.score_batch("q", cands("Answer: 4"), Budget()) == [1.0]
    assert ex.with_reference("5").score_batch("q", cands("Answer: 4"), Budget()) == [0.0]
    for bad in ({"base": "diverse"}, {"base": "nope"}, {"weight": -0.1}, {"weight": float("nan")},
                {"layer": "last"}, {"base_options": "bogus=1"}):
        with pytest.raises(SteerscaleError):
            get_verifier("diverse", backend=backend, **bad)
    with pytest.raises(SteerscaleError, match="backend"):
        get_verifier("diverse")


def test_diverse_inside_particle_filtering_is_reproducible(backend):
    def go(seed):
        v = get_verifier("diverse", backend=backend, base="logprob", weight=0.3)
        b = Budget()
        r = run_strategy("particle_filter", "12 + 3 =", backend, v, b, n=4, seed=seed, max_tokens=8, step=" ",
                         max_step_tokens=4, temperature=1.0)
        return [c.token_ids for c in r.candidates], [c.score for c in r.candidates], b.spent()["verifier_passes"]

    t1, s1, passes = go(2)
    assert (t1, s1, passes) == go(2) and passes > 0


# -- reasoning-gym ------------------------------------------------------------------------------------------------
def test_gym_verifier_uses_reasoning_gym_scoring():
    from steerscale.measure.tasks import GymTask

    task = GymTask("basic_arithmetic", size=3)
    ex = task.load(limit=1, seed=0)[0]
    entry = task._data(0)[ex.meta["index"]]
    v = get_verifier("gym", reference=entry)
    b = Budget()
    right, wrong = f"Work.\nAnswer: {entry['answer']}", "Answer: 123456789"
    assert v.score("q", Candidate(text=right), b) == 1.0 and v.score("q", Candidate(text=wrong), b) == 0.0
    for text in (right, wrong, "no answer line"):  # same answer extraction and scorer as the gym:NAME task
        assert v.score("q", Candidate(text=text), b) == task.check(ex, text)["acc"]
    as_json = get_verifier("gym", reference=json.dumps(entry))
    assert as_json.score_batch("q", cands(right, wrong), b) == [1.0, 0.0]
    bare = {k: entry[k] for k in ("question", "answer")}
    assert get_verifier("gym", reference=("basic_arithmetic", bare)).score("q", Candidate(text=right), b) == 1.0
    assert get_verifier("gym", reference=bare, dataset="basic_arithmetic").score("q", Candidate(text=right), b) == 1.0
    with pytest.raises(SteerscaleError, match="which reasoning-gym dataset"):
        get_verifier("gym", reference=bare).score("q", Candidate(text=right), b)
    with pytest.raises(SteerscaleError, match="unknown reasoning-gym dataset"):
        get_verifier("gym", dataset="no_such_dataset")
    with pytest.raises(SteerscaleError, match="reference"):
        get_verifier("gym").score("q", Candidate(text=right), b)
    with pytest.raises(SteerscaleError, match="JSON"):
        get_verifier("gym", reference="not json").score("q", Candidate(text=right), b)
    with pytest.raises(SteerscaleError, match="entry dict"):
        get_verifier("gym", reference="42").score("q", Candidate(text=right), b)
    with pytest.raises(SteerscaleError, match="no candidates"):
        v.score_batch("q", [], b)


# -- entropic particle filtering: look-ahead modulation ---------------------------------------------------------
class TextHash(Verifier):
    """A deterministic process scorer whose value jumps around with the text (so resampling has work to do)."""

    name = "text_hash"
    process = True

    def score(self, question, candidate, budget, partial=False):
        return ((sum(map(ord, candidate.text)) * 37) % 101 + 1) / 102


def test_modulate_weights():
    w = modulate([1.0, 1.0, 0.5], [0.5, 0.5, 0.2], [0.9, 0.1, float("nan")], 2.0)
    assert w == pytest.approx([math.exp(0.8), math.exp(-0.8), 0.5])


def test_entropic_pf_without_lookahead_or_annealing_is_particle_filtering(backend):
    kw = dict(n=4, seed=3, max_tokens=12, step=" ", max_step_tokens=3, temperature=1.0)
    # target_ess so low that the weights are never flattened: plain particle filtering, token for token.
    r = run_strategy("entropic_pf", "ab cd", backend, TextHash(), Budget(), target_ess=1e-9, **kw)
    ref = run_particle_filter("ab cd", backend, TextHash(), Budget(), **kw)
    assert [c.token_ids for c in r.candidates] == [c.token_ids for c in ref.candidates]
    assert r.answer == ref.answer and r.strategy == "entropic_pf" and r.info["lookahead_tokens"] == 0
    assert r.info["betas"] == [1.0] * r.info["resamples"]
    # A demanding target flattens the weights (beta < 1) at least once on this verifier.
    hot = run_strategy("entropic_pf", "ab cd", backend, TextHash(), Budget(), target_ess=0.99, **kw)
    assert len(hot.info["betas"]) == hot.info["resamples"] and all(0 < x <= 1 for x in hot.info["betas"])
    assert min(hot.info["betas"]) < 1.0


def test_entropic_pf_lookahead_changes_the_search_and_is_seed_reproducible(backend, monkeypatch):
    import steerscale.scale.strategies.extra as extra_mod

    def go(lookahead, seed=1, **extra):
        b = Budget()
        r = run_strategy("entropic_pf", "ab cd", backend, TextHash(), b, n=6, seed=seed, max_tokens=16, step=" ",
                         max_step_tokens=3, temperature=1.0, lookahead=lookahead, lookahead_weight=4.0, **extra)
        return r, [c.token_ids for c in r.candidates], b.spent()

    r0, t0, spent0 = go(0)
    r1, t1, spent1 = go(1)
    assert r1.info["lookahead_tokens"] > 0 and r1.info["lookahead"] == 1
    # probe tokens are charged on top of the particles' own
    assert spent1["generated_tokens"] >= r1.info["lookahead_tokens"] + max(c.n_tokens for c in r1.candidates)
    assert spent1["verifier_passes"] == 0  # a programmatic scorer: only tokens are charged
    assert t1 != t0  # the modulated weights resample differently
    with monkeypatch.context() as m:  # the probes themselves leave the particles untouched
        m.setattr(extra_mod, "modulate", lambda w, *_: np.asarray(w, dtype=float))
        assert go(1)[1] == t0
    assert any("lookahead_score" in c.meta for c in r1.candidates)
    again, t1b, _ = go(1)
    assert t1b == t1 and again.answer == r1.answer and again.info["betas"] == r1.info["betas"]
    _, t2, _ = go(2, lookahead_temperature=0.8)
    _, t2b, _ = go(2, lookahead_temperature=0.8)
    assert t2 == t2b
    for bad in ({"lookahead": -1}, {"lookahead": 1.5}, {"lookahead_weight": float("nan")},
                {"lookahead_weight": -1.0}, {"target_ess": 0}):
        with pytest.raises(SteerscaleError):
            run_strategy("entropic_pf", "ab", backend, TextHash(), Budget(), **{"n": 2, **bad})


def test_entropic_pf_lookahead_respects_the_budget(backend):
    b = Budget.of(tokens=30)
    r = run_strategy("entropic_pf", "ab cd", backend, TextHash(), b, n=4, seed=0, max_tokens=40, step=" ",
                     max_step_tokens=3, temperature=1.0, lookahead=2)
    assert r.budget["exhausted"] and r.budget["spent"]["generated_tokens"] <= 30 + 4 and r.candidates


# -- CLI ------------------------------------------------------------------------------------------------------------
def _solve_args(*extra):
    import argparse

    from steerscale.commands import scale_cmds

    p = argparse.ArgumentParser()
    scale_cmds.register(p.add_subparsers())
    return p.parse_args(["solve", "-p", "hi", "-m", "does-not-exist", *extra])


@pytest.mark.parametrize("extra, match", [
    (["--verifier", "length", "--verifier-opt", "bogus=1"], "no option 'bogus'"),
    (["--verifier", "pairwise", "--verifier-opt", "mode"], "KEY=VALUE"),
    (["--verifier-opt", "weight=0.2"], "without --verifier"),
])
def test_cli_solve_checks_verifier_options_before_loading(extra, match):
    args = _solve_args(*extra)
    with pytest.raises(SteerscaleError, match=match):
        args.func(args)


def test_cli_solve_accepts_every_registered_verifier():
    for name in VERIFIERS:
        assert _solve_args("--verifier", name).verifier == name
    args = _solve_args("--verifier", "diverse", "--verifier-opt", "base=arith_prm", "--verifier-opt", "weight=0.2")
    assert args.verifier_opt == ["base=arith_prm", "weight=0.2"]
