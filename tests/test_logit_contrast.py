"""Early-layer logit contrast (DoLa / VISTA): the arithmetic, and one behaviour in every place that decodes or scores
(generate, multiple-choice scoring, the cost measurement, LocalBackend, the batching scheduler, the HTTP server)."""

import pytest
import torch

from steerscale import Site, SteerscaleError
from steerscale.engine.capture import tokenize
from steerscale.engine.choices import build_items, choice_logprob_sums, padded_logprob_sums
from steerscale.engine.generation import generate
from steerscale.engine.logit_contrast import (MASKED, ContrastMode, EarlyReader, LogitContrast, contrast,
                                              contrast_hidden, head_logits)
from steerscale.engine.ops import Add
from steerscale.engine.runtime import Intervention, intervene
from steerscale.measure.cost import steering_cost
from steerscale.scale import Budget, LocalBackend, SamplingParams
from steerscale.serve.scheduler import Job, Scheduler
from tiny import ChatCharTokenizer, CharTokenizer, tiny_lm, tiny_model

GREEDY = dict(temperature=0.0, step=None)


# -- the spec ---------------------------------------------------------------------------------------------------
def test_specs_parse_round_trip_and_resolve():
    lc = LogitContrast.parse("dola:high")
    assert lc.mode is ContrastMode.CONTRAST and lc.layers == "high" and lc.alpha == 0.1
    assert LogitContrast.parse("dola:14-16,alpha=0").layers == (14, 15, 16)
    assert LogitContrast.parse("vista:3+1,weight=0.5") == LogitContrast((1, 3), "add", 0.1, 0.5)
    for spec in ("dola:high", "dola:2+4,alpha=0.2", "vista:low,weight=0.5"):
        lc = LogitContrast.parse(spec)
        assert LogitContrast.parse(lc.text()) == lc == LogitContrast.parse(lc.to_dict())
    assert LogitContrast("high").resolve(30) == (15, 17, 19, 21, 23, 25, 27)
    assert LogitContrast("low").resolve(30) == (0, 2, 4, 6, 8, 10, 12, 14)
    assert LogitContrast("high").resolve(3) == (1,)


@pytest.mark.parametrize("spec, match", [
    ("beam:high", "unknown mode"), ("dola:x", "bad logit contrast layers"), ("dola:high,alpha=1", "alpha"),
    ("dola:high,weight=0", "weight"), ("dola:high,beta=1", "knob"), ("dola:high,alpha=x", "not a number"),
    ({"layers": "high", "temperature": 1}, "unknown logit contrast field")])
def test_bad_specs_name_the_problem(spec, match):
    with pytest.raises(SteerscaleError, match=match):
        LogitContrast.parse(spec)


def test_layers_out_of_range_and_the_final_layer_are_refused():
    with pytest.raises(SteerscaleError, match="out of range"):
        LogitContrast(2).resolve(3)  # block 2 of 3 is the final layer itself
    lm = tiny_lm("llama")
    with pytest.raises(SteerscaleError, match="out of range"):
        generate(lm.model, lm.tokenizer, lm.layout, ["hi"], max_new_tokens=2, chat=False, logit_contrast="dola:7")


# -- the arithmetic -----------------------------------------------------------------------------------------------
def test_contrast_is_dolas_formula_with_its_plausibility_mask():
    g = torch.Generator().manual_seed(0)
    final, early = torch.randn(4, 50, generator=g) * 3, torch.randn(1, 4, 50, generator=g) * 3
    scores, _ = contrast(final, early, LogitContrast((0,), alpha=0.0))
    want = (final.log_softmax(-1) - early[0].log_softmax(-1)).log_softmax(-1)
    assert torch.allclose(scores, want, atol=1e-5)
    masked, _ = contrast(final, early, LogitContrast((0,), alpha=0.1))
    p = final.softmax(-1)
    implausible = p < 0.1 * p.max(-1, keepdim=True).values
    assert implausible.any() and (~implausible).any()
    assert (masked[implausible] < MASKED / 2).all() and (masked[~implausible] > MASKED / 2).all()
    # the plausible tokens keep their contrast ordering
    for r in range(4):
        keep = ~implausible[r]
        assert torch.equal(masked[r][keep].argsort(), want[r][keep].argsort())


def test_the_dynamic_layer_is_the_one_furthest_from_the_final_distribution():
    final = torch.randn(3, 20)
    near, far = final.clone(), -final * 4  # JS(final, near) = 0
    _, chosen = contrast(final, torch.stack([near, far]), LogitContrast((0, 1), alpha=0.0))
    assert chosen.tolist() == [1, 1, 1]
    _, chosen = contrast(final, torch.stack([far, near]), LogitContrast((0, 1), alpha=0.0))
    assert chosen.tolist() == [0, 0, 0]


def test_add_mode_adds_the_mean_early_logits():
    final, early = torch.randn(2, 10), torch.randn(3, 2, 10)
    scores, _ = contrast(final, early, LogitContrast((0, 1, 2), "add", weight=0.5))
    assert torch.allclose(scores, (final + 0.5 * early.mean(0)).log_softmax(-1), atol=1e-6)


def test_an_eos_masked_to_minus_inf_stays_impossible():
    final = torch.randn(2, 10)
    final[:, 3] = float("-inf")
    early = torch.randn(1, 2, 10)
    early[:, :, 3] = float("-inf")
    for spec in (LogitContrast((0,), alpha=0.0), LogitContrast((0,), alpha=0.1)):
        scores, _ = contrast(final, early, spec)
        assert torch.isneginf(scores[:, 3]).all() and torch.isfinite(scores[:, :3]).all()


# -- scoring ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_mc_scoring_packed_equals_padded_and_a_hand_computed_reference(family):
    lm = tiny_lm(family)
    items = build_items(lm.tokenizer, ["hello there", "what is it"], [["a b", "cde", "fg"], ["x", "yy z"]], chat=False)
    spec = LogitContrast((0, 1), alpha=0.1)
    packed = choice_logprob_sums(lm.model, items, 0, spec, lm.layout)
    padded = padded_logprob_sums(lm.model, items, 0, spec, lm.layout)
    assert torch.allclose(packed, padded, atol=1e-4)
    assert not torch.allclose(packed, choice_logprob_sums(lm.model, items, 0), atol=1e-3)
    # by hand: question 0, choice 1, a plain forward of prompt + choice
    it = items[0]
    ids = torch.tensor([it.prompt + it.choices[1]])
    reader = EarlyReader(lm.layout, spec, model=lm.model)
    with torch.no_grad(), reader.reading():
        logits = lm.model(input_ids=ids).logits[0]
    n = len(it.prompt)
    hidden = [h[0] for h in reader.at()]
    with torch.no_grad():
        scores = contrast_hidden(lm.model, lm.layout, spec, logits, hidden)
    want = sum(float(scores[n - 1 + j, t]) for j, t in enumerate(it.choices[1]))
    assert packed[0, 1].item() == pytest.approx(want, abs=1e-4)


def test_head_logits_of_the_last_block_are_the_models_logits():
    lm = tiny_lm("gemma3")  # final logit soft-capping and a scaled embedding
    ids = torch.tensor([[3, 5, 7, 9]])
    seen = {}
    from steerscale.engine.runtime import Observer, observe

    last = Observer(Site(lm.layout.n_layers - 1), lambda h: seen.setdefault("h", h))
    with torch.no_grad(), observe(lm.layout, [last]):
        logits = lm.model(input_ids=ids).logits
    assert torch.allclose(head_logits(lm.model, lm.layout, seen["h"]), logits, atol=1e-5)


def test_the_cost_of_a_contrast_is_measured_against_the_plain_model():
    lm = tiny_lm("llama")
    texts = ["the cat sat on the mat", "one two three four"]
    plain = steering_cost(lm.model, lm.tokenizer, lm.layout, [], texts)
    assert plain["kl"]["mean"] == pytest.approx(0.0, abs=1e-6)
    cost = steering_cost(lm.model, lm.tokenizer, lm.layout, [], texts, logit_contrast="dola:0+1,alpha=0")
    assert cost["kl"]["mean"] > 1e-4 and cost["n_tokens"] == plain["n_tokens"]  # a random model: flat logits


def test_the_cost_of_a_masking_contrast_is_finite_in_reverse_and_reports_the_masked_share():
    """DoLa's mask gives dropped tokens a log-prob near -1e4: the forward KL and the perplexity blow up (no crash),
    the reverse KL stays finite."""
    import copy

    lm = tiny_lm("llama")
    model = copy.deepcopy(lm.model)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40)  # peaked next-token distributions, as a trained model has
    texts = ["the cat sat on the mat", "one two three four five"]
    from steerscale.models.layout import find_layout

    cost = steering_cost(model, lm.tokenizer, find_layout(model), [], texts, logit_contrast="dola:0+1,alpha=0.1")
    assert 0 < cost["masked_share"] <= 1 and cost["kl"]["mean"] > 100
    assert 0 < cost["kl_reverse"]["mean"] < 100 and cost["ppl_ratio"] > 1


# -- decoding -----------------------------------------------------------------------------------------------------
def greedy_by_hand(lm, prompt: str, spec, n: int, interventions=()) -> list[int]:
    ids = tokenize(lm.tokenizer, [prompt], "cpu").input_ids
    out = []
    for _ in range(n):
        reader = EarlyReader(lm.layout, LogitContrast.parse(spec), model=lm.model, last_only=True)
        with torch.no_grad(), intervene(lm.layout, list(interventions)), reader.reading():
            logits = lm.model(input_ids=ids).logits[:, -1]
        t = contrast_hidden(lm.model, lm.layout, reader.spec, logits, reader.at()).argmax(-1)
        out.append(int(t))
        ids = torch.cat([ids, t[:, None]], 1)
    return out


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_generate_decodes_greedily_from_the_contrast_cached_or_not_batched_or_alone(family):
    lm = tiny_lm(family)
    spec = "dola:0+1,alpha=0.05"
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())
    prompts = ["hello there", "a"]
    kw = dict(max_new_tokens=6, chat=False, logit_contrast=spec)
    cached = generate(lm.model, lm.tokenizer, lm.layout, prompts, **kw)
    uncached = generate(lm.model, lm.tokenizer, lm.layout, prompts, use_cache=False, **kw)
    assert [g.token_ids for g in cached] == [g.token_ids for g in uncached]
    for g, p in zip(cached, prompts):
        assert g.token_ids == generate(lm.model, lm.tokenizer, lm.layout, [p], **kw)[0].token_ids
    assert cached[0].token_ids == greedy_by_hand(lm, "hello there", spec, 6)
    plain = generate(lm.model, lm.tokenizer, lm.layout, prompts, max_new_tokens=6, chat=False)
    assert [g.token_ids for g in plain] != [g.token_ids for g in cached]
    assert hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())


def test_the_contrast_reads_the_steered_states():
    lm = tiny_lm("llama")
    vec = torch.randn(lm.layout.site_dim(Site(0)), generator=torch.Generator().manual_seed(1)) * 4
    ivs = [Intervention(Site(0), Add(vec, 1.0))]
    spec = "dola:0,alpha=0"
    got = generate(lm.model, lm.tokenizer, lm.layout, ["hello there"], ivs, max_new_tokens=5, chat=False,
                   logit_contrast=spec)[0].token_ids
    assert got == greedy_by_hand(lm, "hello there", spec, 5, ivs)


def test_local_backend_samples_what_generate_decodes_and_scores_with_it():
    lm = tiny_lm("llama")
    spec = "dola:0+1,alpha=0.05"
    backend = LocalBackend(lm.model, lm.tokenizer, lm.layout, chat=False, logit_contrast=spec)
    cand = backend.sample("hello there", 1, SamplingParams(max_tokens=6, **GREEDY), Budget())[0]
    want = generate(lm.model, lm.tokenizer, lm.layout, ["hello there"], max_new_tokens=6, chat=False,
                    logit_contrast=spec)[0]
    assert cand.token_ids == want.token_ids
    ids = backend.prompt_ids("hello there") + cand.token_ids
    chosen, _ = backend.token_logprobs(ids, 0, len(ids) - len(cand.token_ids))
    assert chosen[-len(cand.token_ids):] == pytest.approx(cand.logprobs, abs=1e-4)
    with pytest.raises(SteerscaleError, match="layout"):
        LocalBackend(lm.model, lm.tokenizer, None, logit_contrast=spec)


def test_scheduler_rows_with_and_without_a_contrast_share_a_batch_and_decode_as_alone():
    model, layout = tiny_model("llama")
    tok = CharTokenizer()
    specs = [None, LogitContrast((0, 1), alpha=0.05), LogitContrast((1,), "add", weight=0.5), None]
    prompts = ["Hello world", "The cat sat", "abc", "A much longer prompt"]

    def jobs():
        return [Job(tok.encode(p), SamplingParams(max_tokens=8, **GREEDY), logit_contrast=s)
                for p, s in zip(prompts, specs)]

    def run(batch, max_batch):
        sched = Scheduler(model, tok, layout, max_batch=max_batch)
        futs = [sched.submit(j) for j in batch]
        while not all(f.done() for f in futs):
            sched.step()
        return [f.result()[0].token_ids for f in futs]

    alone = [run([j], 1)[0] for j in jobs()]
    assert run(jobs(), 8) == alone
    for p, s, want in zip(prompts, specs, alone):
        local = LocalBackend(model, tok, layout, chat=False, logit_contrast=s)
        assert local.sample(p, 1, SamplingParams(max_tokens=8, **GREEDY), Budget())[0].token_ids == want
    assert alone[1] != LocalBackend(model, tok, layout, chat=False).sample(
        prompts[1], 1, SamplingParams(max_tokens=8, **GREEDY), Budget())[0].token_ids


def test_the_server_takes_a_contrast_per_request():
    openai = pytest.importorskip("openai")
    from steerscale.serve import App, start_server

    model, layout = tiny_model("llama")
    tok = ChatCharTokenizer()
    server = start_server(App(model, tok, layout, model_id="tiny", max_n=4))
    try:
        c = openai.OpenAI(base_url=server.url, api_key="none", timeout=60, max_retries=0)

        def ask(**extra):
            return c.completions.create(model="tiny", prompt="The cat", max_tokens=8, temperature=0,
                                        extra_body=extra).choices[0].text

        spec = {"layers": [0, 1], "alpha": 0.05}
        want = LocalBackend(model, tok, layout, chat=False, add_special_tokens=True, logit_contrast=spec).sample(
            "The cat", 1, SamplingParams(max_tokens=8, **GREEDY), Budget())[0].text
        assert ask(logit_contrast=spec) == want != ask()
        for bad, match in (({"layers": [2]}, "out of range"), ({"layers": "middle"}, "logit_contrast"),
                           ({"alpha": 2}, "logit_contrast")):
            with pytest.raises(openai.BadRequestError, match=match):
                ask(logit_contrast=bad)
    finally:
        server.close()
