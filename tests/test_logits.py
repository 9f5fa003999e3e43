"""Sampling extras (``scale.logits`` and ``LocalBackend.choose``): logit bias, EOS masks, penalties, top-k, min-p."""

from __future__ import annotations

import math

import pytest
import torch

from steerscale import SteerscaleError
from steerscale.scale import Budget, LocalBackend, SamplingParams
from steerscale.scale.backend import FinishReason
from steerscale.engine.decoding import process_logits
from steerscale.scale.strategies.base import sampling_params

A = 68  # CharTokenizer's id of "a"
EOS = 1


def old_choose(logits, params, gen):
    """``LocalBackend.choose`` as it was before the extras: default params must sample exactly like this."""
    logp = torch.log_softmax(logits, dim=-1)
    if params.temperature == 0:
        tok = logits.argmax(-1)
    else:
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1:
            sp, si = probs.sort(-1, descending=True)
            keep = (sp.cumsum(-1) - sp) < params.top_p
            sp = sp * keep
            probs = torch.zeros_like(probs).scatter(-1, si, sp)
        tok = torch.multinomial(probs.cpu(), 1, generator=gen)[:, 0].to(logits.device)
    return tok, logp.gather(-1, tok[:, None])[:, 0]


def rand_logits(rows=8, vocab=96, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- defaults: nothing changes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=1.3, top_p=0.8), SamplingParams(temperature=0.0)])
def test_default_params_sample_exactly_as_before(params):
    logits = rand_logits()
    assert not params.has_processors
    assert process_logits(logits, params, eos_ids=[EOS], prompt_ids=[[3]] * 8, output_ids=[[4]] * 8) is logits
    for _ in range(3):
        want = old_choose(logits, params, gen(7))
        for kwargs in ({}, {"eos_ids": {EOS, 2}, "prompt_ids": [[5, 6]] * 8, "output_ids": [[A, A]] * 8}):
            got = LocalBackend.choose(logits, params, gen(7), **kwargs)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_inactive_processor_leaves_a_seeded_sample_unchanged(backend):
    """A zero logit bias turns the history path on without changing any logit: the seeded draw is the same."""
    base = SamplingParams(max_tokens=10, temperature=1.0, step=None)
    plain = backend.sample("Hello", 4, base, Budget(), seed=3)
    biased = backend.sample("Hello", 4, base.with_(logit_bias={5: 0.0}), Budget(), seed=3)
    assert base.with_(logit_bias={5: 0.0}).has_processors
    assert [c.token_ids for c in plain] == [c.token_ids for c in biased]
    assert [c.logprobs for c in plain] == [c.logprobs for c in biased]


# -- process_logits on hand-made tensors -------------------------------------------------------------------------
def test_logit_bias_adds_to_the_listed_tokens_and_leaves_the_input_alone():
    logits = rand_logits(2, 10)
    before = logits.clone()
    out = process_logits(logits, SamplingParams(logit_bias={3: 2.5, "7": -1}), eos_ids=[EOS])
    want = before.clone()
    want[:, 3] += 2.5
    want[:, 7] -= 1
    assert torch.equal(logits, before) and torch.allclose(out, want)
    with pytest.raises(SteerscaleError, match="vocabulary"):
        process_logits(logits, SamplingParams(logit_bias={10: 1.0}))


def test_repetition_penalty_matches_the_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0], [2.0, -1.0, 0.5, -3.0, 1.0]])
    params = SamplingParams(repetition_penalty=2.0)
    out = process_logits(logits, params, prompt_ids=[[0], [1, 4]], output_ids=[[3, 3], []])
    # row 0 saw 0 (prompt) and 3 (output); row 1 saw 1 and 4 (prompt): positive / 2, negative * 2
    assert torch.allclose(out, torch.tensor([[1.0, -1.0, 0.5, -6.0, 1.0], [2.0, -2.0, 0.5, -3.0, 0.5]]))
    only_output = process_logits(logits, params, output_ids=[[0], []])
    assert torch.allclose(only_output[0], torch.tensor([1.0, -1.0, 0.5, -3.0, 1.0]))
    assert torch.equal(only_output[1], logits[1])


def test_frequency_and_presence_penalties_match_the_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    out = process_logits(logits, params, prompt_ids=[[0, 0, 3], [3]], output_ids=[[1, 1, 2], [3]])
    # output counts only (the prompt is not penalised): logit -= 0.5 * count + 0.25 * (count > 0)
    want = torch.tensor([[1.0, 2.0 - 1.0 - 0.25, 3.0 - 0.5 - 0.25, 4.0], [1.0, 2.0, 3.0, 4.0 - 0.5 - 0.25]])
    assert torch.allclose(out, want)
    negative = process_logits(logits, SamplingParams(presence_penalty=-1.0), output_ids=[[0], []])
    assert torch.allclose(negative[0], torch.tensor([2.0, 2.0, 3.0, 4.0])) and torch.equal(negative[1], logits[1])


def test_eos_masks():
    logits = torch.zeros(3, 6)
    out = process_logits(logits, SamplingParams(min_tokens=2), eos_ids=[1, 2],
                         output_ids=[[], [4], [4, 5]])
    assert out[:2, 1:3].eq(-math.inf).all() and out[2].eq(0).all() and out[:, [0, 3, 4, 5]].eq(0).all()
    out = process_logits(logits, SamplingParams(ignore_eos=True), eos_ids=[1], output_ids=[[], [4], [4, 5]])
    assert out[:, 1].eq(-math.inf).all() and out[:, [0, 2, 3, 4, 5]].eq(0).all()
    # bias first, then the mask: a +100 bias cannot bring EOS back
    out = process_logits(logits, SamplingParams(ignore_eos=True, logit_bias={1: 100}), eos_ids=[1])
    assert out[:, 1].eq(-math.inf).all()


# -- choose: truncations, greedy, log-probs ------------------------------------------------------------------------
def test_top_k_1_and_min_p_1_are_greedy():
    logits = rand_logits(16)
    greedy = logits.argmax(-1)
    for params in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, min_p=1.0),
                   SamplingParams(temperature=1.5, top_k=3, min_p=1.0, top_p=0.5)):
        for seed in range(3):
            tok, _ = LocalBackend.choose(logits, params, gen(seed))
            assert torch.equal(tok, greedy)


def test_top_k_and_min_p_only_sample_kept_tokens():
    logits = rand_logits(64, seed=1)
    topk = set()
    for r, idx in enumerate(logits.topk(5, -1).indices.tolist()):
        topk |= {(r, i) for i in idx}
    probs = torch.softmax(logits / 0.8, -1)
    for seed in range(5):
        tok, _ = LocalBackend.choose(logits, SamplingParams(temperature=0.8, top_k=5), gen(seed))
        assert all((r, t) in topk for r, t in enumerate(tok.tolist()))
        tok, _ = LocalBackend.choose(logits, SamplingParams(temperature=0.8, min_p=0.3), gen(seed))
        chosen = probs.gather(-1, tok[:, None])[:, 0]
        assert bool((chosen >= 0.3 * probs.amax(-1)).all())


def test_greedy_takes_the_processed_argmax_and_logprobs_stay_raw():
    logits = rand_logits(4)
    params = SamplingParams(temperature=0.0, logit_bias={A: 100})
    tok, lp = LocalBackend.choose(logits, params, gen())
    assert tok.tolist() == [A] * 4
    assert torch.allclose(lp, torch.log_softmax(logits, -1)[:, A])
    tok, lp = LocalBackend.choose(logits, SamplingParams(temperature=1.0, repetition_penalty=1.5, top_k=4), gen(),
                                  output_ids=[[1, 2]] * 4)
    assert torch.allclose(lp, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0])


# -- LocalBackend end to end ---------------------------------------------------------------------------------------
def test_logit_bias_steers_greedy_decoding(backend):
    params = SamplingParams(max_tokens=5, temperature=0.0, step=None, logit_bias={A: 100})
    rows = backend.sample("Hello", 2, params, Budget(), seed=0)
    assert all(c.text == "aaaaa" and c.token_ids == [A] * 5 for c in rows)


def test_ignore_eos_runs_to_max_tokens(backend):
    params = SamplingParams(max_tokens=7, temperature=1.0, step=None, logit_bias={EOS: 100})
    ended = backend.sample("Hello", 3, params, Budget(), seed=0)
    assert all(c.finish_reason == FinishReason.EOS and c.n_tokens == 1 for c in ended)
    rows = backend.sample("Hello", 3, params.with_(ignore_eos=True), Budget(), seed=0)
    assert all(c.finish_reason == FinishReason.LENGTH and c.n_tokens == 7 for c in rows)
    assert not any(t in backend.eos_ids for c in rows for t in c.token_ids)


def test_min_tokens_prevents_early_eos(backend):
    params = SamplingParams(max_tokens=10, temperature=1.0, step=None, logit_bias={EOS: 100}, min_tokens=5)
    rows = backend.sample("Hello", 3, params, Budget(), seed=0)
    for c in rows:
        assert c.finish_reason == FinishReason.EOS and c.n_tokens == 6 and c.token_ids[-1] == EOS
        assert not any(t in backend.eos_ids for t in c.token_ids[:5])


def test_min_tokens_counts_tokens_over_every_step(backend):
    params = SamplingParams(max_tokens=10, temperature=1.0, step=None, max_step_tokens=2, logit_bias={EOS: 100},
                            min_tokens=5)
    br = backend.start("Hello", 2, Budget(), seed=0)
    for _ in range(4):
        backend.extend(br, params, Budget())
    assert all(c.finish_reason == FinishReason.EOS and c.n_tokens == 6 for c in br.rows)


def test_stop_strings_wait_for_min_tokens(backend):
    params = SamplingParams(max_tokens=10, temperature=0.0, step=None, logit_bias={A: 100}, stop=("a",))
    (c,) = backend.sample("Hello", 1, params, Budget())
    assert (c.text, c.n_tokens, c.finish_reason) == ("", 1, FinishReason.STOP)
    (c,) = backend.sample("Hello", 1, params.with_(min_tokens=3), Budget())
    assert (c.text, c.n_tokens, c.finish_reason) == ("aa", 3, FinishReason.STOP)
    # "aa" was there after 2 tokens; the first one that ends at token 3 or later starts at index 1
    (c,) = backend.sample("Hello", 1, params.with_(min_tokens=3, stop=("aa",)), Budget())
    assert (c.text, c.n_tokens, c.finish_reason) == ("a", 3, FinishReason.STOP)


def test_penalties_stop_greedy_repeats(backend):
    base = SamplingParams(max_tokens=12, temperature=0.0, step=None, ignore_eos=True)
    plain = backend.sample("aaaa", 1, base, Budget())[0].token_ids
    assert len(set(plain)) < len(plain)  # this tiny model repeats itself greedily
    for extra in ({"repetition_penalty": 50.0}, {"frequency_penalty": 2.0, "presence_penalty": 2.0}):
        ids = backend.sample("aaaa", 1, base.with_(**extra), Budget())[0].token_ids
        assert len(ids) == 12 and len(set(ids)) == len(ids), extra  # a large penalty: no token twice
    assert A not in backend.sample("aaaa", 1, base.with_(repetition_penalty=50.0), Budget())[0].token_ids  # prompt


# -- validation --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    {"top_k": -1}, {"top_k": 1.5}, {"top_k": True}, {"min_p": 1.5}, {"min_p": -0.1}, {"min_p": math.nan},
    {"repetition_penalty": 0}, {"repetition_penalty": -1.0}, {"repetition_penalty": math.inf},
    {"presence_penalty": 2.5}, {"presence_penalty": math.nan}, {"frequency_penalty": -3},
    {"frequency_penalty": "1"}, {"min_tokens": -1}, {"min_tokens": 1.0}, {"min_tokens": 20, "max_tokens": 10},
    {"ignore_eos": "yes"}, {"logit_bias": {-1: 1.0}}, {"logit_bias": {5: 101}}, {"logit_bias": {"x": 1}},
    {"logit_bias": {5: math.nan}}, {"logit_bias": {5: "1"}}, {"logit_bias": [(1, 2, 3)]}, {"logit_bias": 5},
    {"logit_bias": {2.0: 1}},
])
def test_bad_values_raise(bad):
    with pytest.raises(SteerscaleError) as exc:
        SamplingParams(**bad)
    assert next(iter(bad)) in str(exc.value)


def test_logit_bias_is_normalised_and_params_stay_hashable():
    p = SamplingParams(logit_bias={"5": 1, 3: -2.5})
    assert p.logit_bias == ((3, -2.5), (5, 1.0))
    assert p == SamplingParams(logit_bias=[(5, 1.0), (3, -2.5)]) == SamplingParams(logit_bias=p.logit_bias)
    assert hash(p) == hash(SamplingParams(logit_bias=((3, -2.5), (5, 1))))
    assert sampling_params(logit_bias={"5": 1, "3": -2.5}, top_k=4).logit_bias == p.logit_bias


def test_has_processors():
    assert not SamplingParams().has_processors
    assert not SamplingParams(top_k=5, min_p=0.1, top_p=0.9).has_processors  # truncations act in choose()
    for change in ({"logit_bias": {1: 1}}, {"min_tokens": 1}, {"ignore_eos": True}, {"repetition_penalty": 1.1},
                   {"presence_penalty": 0.1}, {"frequency_penalty": -0.1}):
        assert SamplingParams(**change).has_processors, change
