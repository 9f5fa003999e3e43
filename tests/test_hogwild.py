"""Hogwild! shared-cache workers (``engine.shared_cache``, the ``hogwild`` strategy): workers on one KV cache decode
exactly as plain generation when they cannot see each other; one worker is plain generation; seeing each other
changes what they write; one budget caps them all; remote and steered backends are refused; the strategy runs
from Python, the CLI and the server; SmolLM2 integration."""

import functools
import json

import pytest
import torch

from steerscale.engine.decoding import seeded_generator
from steerscale.engine.shared_cache import common_prefix, shared_decode
from steerscale.errors import SteerscaleError
from steerscale.scale import Budget, LocalBackend, SamplingParams
from steerscale.scale.spec import StrategySpec, run_strategy
from steerscale.scale.strategies.hogwild import worker_prompt
from tiny import COMMON, ChatCharTokenizer, CharTokenizer, tiny_model

FAMILIES = ("llama", "qwen2", "gemma3")  # gemma3: mixed sliding-window (16) and full layers
PROMPTS = ["Compute 2+3 now. You are worker A", "Compute 2+3 now. You are worker Bx", "Compute 2+3 now. I am C"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def local(family):
    model, layout = tiny_model(family)
    return LocalBackend(model, CharTokenizer(), layout, chat=False)


def split(be, prompts):
    ids = [be.prompt_ids(p) for p in prompts]
    k = common_prefix(ids)
    return ids[0][:k], [i[k:] for i in ids]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_worker_is_plain_generation(family):
    be = local(family)
    params = SamplingParams(max_tokens=40, temperature=0)  # 40 > gemma3's window: the sliding mask is exercised
    ref = be.sample(PROMPTS[0], 1, params, Budget())[0]
    out = shared_decode(be.model, be.tokens, be.prompt_ids(PROMPTS[0]), [[]], params, seeded_generator(0))
    assert out.calls[0].ids == ref.token_ids and out.calls[0].text == ref.text
    assert out.calls[0].logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    # and through the strategy (no protocol: the worker's prompt is the prompt)
    res = run_strategy("hogwild", PROMPTS[0], be, n=1, protocol=False, max_tokens=40, temperature=0.0)
    assert res.candidates[0].token_ids == ref.token_ids and res.info["workers"] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_isolated_workers_on_one_cache_are_independent_plain_generations(family):
    """see_others=False: three workers with different private suffixes on one cache; each decodes token for token,
    and with the same log-probs, as its own prompt alone (greedy)."""
    be = local(family)
    params = SamplingParams(max_tokens=30, temperature=0)
    shared, private = split(be, PROMPTS)
    assert len(shared) > 10 and all(private)
    out = shared_decode(be.model, be.tokens, shared, private, params, seeded_generator(0), see_others=False)
    for prompt, call in zip(PROMPTS, out.calls):
        ref = be.sample(prompt, 1, params, Budget())[0]
        assert call.ids == ref.token_ids
        assert call.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    # the cache is one sequence: the shared prompt once, every suffix, one column per generated token
    assert out.columns == len(shared) + sum(map(len, private)) + sum(len(c.ids) for c in out.calls) - 3


@pytest.mark.parametrize("family", FAMILIES)
def test_workers_that_see_each_other_write_something_else(family):
    be = local(family)
    params = SamplingParams(max_tokens=30, temperature=0)
    shared, private = split(be, PROMPTS)
    alone = shared_decode(be.model, be.tokens, shared, private, params, seeded_generator(0), see_others=False)
    seen = shared_decode(be.model, be.tokens, shared, private, params, seeded_generator(0), see_others=True)
    # a worker's first token comes from the prompt only, so it agrees; what follows reads the others' tokens
    assert [c.ids[0] for c in seen.calls] == [c.ids[0] for c in alone.calls]
    assert any(a.logprobs[1:] != pytest.approx(s.logprobs[1:], abs=1e-4) for a, s in zip(alone.calls, seen.calls))


def test_seeing_the_others_is_reading_their_tokens():
    """Worker 1's third token, recomputed by hand in one uncached pass: it reads the shared prompt, its own suffix
    and tokens, and worker 0's token of step 1 -- not worker 0's suffix, nor its token of the same step 2."""
    be = local("llama")
    shared, private = split(be, PROMPTS[:2])
    params = SamplingParams(max_tokens=3, temperature=0)
    out = shared_decode(be.model, be.tokens, shared, private, params, seeded_generator(0), see_others=True)
    S, p0, p1 = len(shared), private[0], private[1]
    (a1, a2, _), (b1, b2, b3) = out.calls[0].ids, out.calls[1].ids
    ids = shared + p0 + p1 + [a1, b1, a2, b2]
    owner = [-1] * S + [0] * len(p0) + [1] * len(p1) + [0, 1, 0, 1]
    step = [0] * (S + len(p0) + len(p1)) + [1, 1, 2, 2]
    pos = list(range(S)) + list(range(S, S + len(p0))) + list(range(S, S + len(p1))) + \
        [S + len(p0), S + len(p1), S + len(p0) + 1, S + len(p1) + 1]
    q = len(ids) - 1  # worker 1's token of step 2

    def reads(i, k):
        return bool(k <= i and (owner[k] in (-1, owner[i]) or (step[k] and step[i] and step[k] < step[i])))

    allowed = torch.tensor([[reads(i, k) for k in range(len(ids))] for i in range(len(ids))])
    assert allowed[q].sum() == S + len(p1) + 3  # shared, own suffix, b1, b2, and a1
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    with torch.no_grad():
        logits = be.model(input_ids=torch.tensor([ids]), attention_mask=mask, position_ids=torch.tensor([pos]),
                          use_cache=False).logits[0, q].float()
    assert int(logits.argmax()) == b3
    assert out.calls[1].logprobs[2] == pytest.approx(float(torch.log_softmax(logits, -1)[b3]), abs=1e-4)
    alone = shared_decode(be.model, be.tokens, shared, private, params, seeded_generator(0), see_others=False)
    assert out.calls[1].logprobs[2] != pytest.approx(alone.calls[1].logprobs[2], abs=1e-6)  # a1 changed it


def test_protocol_prompts_share_a_prefix_and_name_the_worker():
    be = LocalBackend(*_chat_parts(), chat=None)
    prompts = [worker_prompt("What is 2+3?", k, 3) for k in (1, 2, 3)]
    assert all("of 3, working together" in p for p in prompts) and prompts[1].count("Worker 2 of 3") == 1
    shared, private = split(be, prompts)
    assert be.decode(shared).startswith("user: What is 2+3?") and all(private)
    res = run_strategy("hogwild", "What is 2+3?", be, n=3, max_tokens=12, temperature=0.7, seed=4)
    assert res.info["shared_prompt_tokens"] == len(shared)
    assert res.info["private_prompt_tokens"] == [len(p) for p in private]
    assert [c.meta["worker"] for c in res.candidates] == [1, 2, 3]
    spent = res.budget["spent"]
    assert spent["prompt_tokens"] == len(shared) + sum(map(len, private))  # the shared prefix once
    assert spent["generated_tokens"] == sum(c.n_tokens for c in res.candidates)
    again = run_strategy("hogwild", "What is 2+3?", be, n=3, max_tokens=12, temperature=0.7, seed=4)
    assert [c.token_ids for c in again.candidates] == [c.token_ids for c in res.candidates]  # seeded


@functools.lru_cache(maxsize=None)
def _wide_llama():
    """The tiny llama with a context window long enough for the protocol's prompt (a character per token)."""
    import transformers

    from steerscale.models.layout import find_layout

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**dict(COMMON, num_key_value_heads=2, max_position_embeddings=1024))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return model, find_layout(model)


def _chat_parts():
    model, layout = _wide_llama()
    return model, ChatCharTokenizer(), layout


def test_one_budget_caps_all_workers():
    be = local("llama")
    res = run_strategy("hogwild", "12 + 3 =", be, budget=Budget.of(tokens=25), n=4, max_tokens=30, temperature=1.0,
                       stop=None, protocol=False)
    spent = res.budget["spent"]["generated_tokens"]
    assert spent == 25 == sum(c.n_tokens for c in res.candidates)
    assert any(c.finish_reason == "budget" for c in res.candidates)
    # a prompt the budget cannot pay for is not encoded
    res = run_strategy("hogwild", "12 + 3 =", be, budget=Budget.of(prompt=5), n=2, max_tokens=5,
                       protocol=False)
    assert all(c.finish_reason == "budget" and not c.token_ids for c in res.candidates)
    assert res.budget["spent"]["prompt_tokens"] == 0 and res.answer is None


def test_bad_input_is_a_clear_error():
    be = local("llama")
    for knobs, words in [({"n": 0}, "n must be"), ({"n": 1000}, "exceeds the cap"), ({"see_others": "yes"}, "true or false"),
                         ({"select": "coin"}, "unknown final selection"), ({"max_tokens": 0}, "max_tokens")]:
        with pytest.raises(SteerscaleError, match=words):
            StrategySpec.of("hogwild", **knobs).run("1+1=", be)
    with pytest.raises(SteerscaleError, match="at least one worker"):
        shared_decode(be.model, be.tokens, [3, 4], [], SamplingParams(), seeded_generator(0))
    with pytest.raises(SteerscaleError, match="no prompt tokens"):
        shared_decode(be.model, be.tokens, [], [[3], []], SamplingParams(), seeded_generator(0))


def test_remote_and_steered_backends_are_refused_before_any_work():
    from steerscale import Site, SiteKind
    from steerscale.scale.remote.backend import OpenAIBackend
    from steerscale.steer.vector import SteeringVector

    remote = OpenAIBackend("http://127.0.0.1:9/v1", "tiny", chat=False, retries=0, timeout=1)
    budget = Budget()
    with pytest.raises(SteerscaleError, match="shared") as exc:
        run_strategy("hogwild", "1+1=", remote, budget, n=2)
    assert exc.value.hint and budget.spent()["prompt_tokens"] == 0
    model, layout = tiny_model("llama")
    vec = SteeringVector({Site(1, SiteKind.RESID_POST): torch.ones(layout.site_dim(Site(1, SiteKind.RESID_POST)))})
    steered = LocalBackend(model, CharTokenizer(), layout, steering=vec.interventions(1.0), chat=False)
    with pytest.raises(SteerscaleError, match="steered"):
        run_strategy("hogwild", "1+1=", steered, n=2)


def test_selection_knobs():
    be = local("llama")
    vote = run_strategy("hogwild", "7 + 5 =", be, n=3, max_tokens=8, temperature=1.0, seed=2, protocol=False)
    best = run_strategy("hogwild", "7 + 5 =", be, n=3, max_tokens=8, temperature=1.0, seed=2, protocol=False,
                        select="best")
    assert [c.token_ids for c in vote.candidates] == [c.token_ids for c in best.candidates]
    assert best.info["verifier"] == "logprob" and all(c.score is not None for c in best.candidates)
    assert best.best is max(best.candidates, key=lambda c: c.score)


def test_the_server_runs_hogwild_as_a_strategy():
    pytest.importorskip("openai")
    import urllib.request

    from steerscale.serve import App, start_server

    model, tok, layout = _chat_parts()
    app = App(model, tok, layout, model_id="tiny", max_n=8)
    server = start_server(app)
    try:
        body = {"model": "tiny", "prompt": "12 + 3 =", "max_tokens": 8, "temperature": 0.8,
                "strategy": {"name": "hogwild", "n": 3, "seed": 5}}
        req = urllib.request.Request(server.url + "/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            out = json.loads(resp.read())
        info = out["steerscale"]
        assert info["strategy"] == "hogwild" and info["n_candidates"] == 3 and info["info"]["workers"] == 3
        ref = StrategySpec.of("hogwild", n=3, seed=5, max_tokens=8, temperature=0.8).run(
            "12 + 3 =", LocalBackend(model, tok, layout, chat=False))
        assert out["choices"][0]["text"] == ref.best.text
        assert info["budget"]["spent"]["generated_tokens"] == ref.budget["spent"]["generated_tokens"]
        bad = dict(body, strategy={"name": "hogwild", "n": 3, "see_others": 2})
        req = urllib.request.Request(server.url + "/completions", data=json.dumps(bad).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=60)
        assert exc.value.code == 400 and b"see_others" in exc.value.read()
    finally:
        server.close()


# -- integration: SmolLM2 -------------------------------------------------------------------------------------
@pytest.mark.integration
def test_smollm2_cli_and_one_worker_equivalence(capsys):
    from steerscale import load_model
    from steerscale.cli import main

    try:
        lm = load_model("smollm2-135m-instruct", dtype="float32")
    except SteerscaleError as exc:
        pytest.skip(str(exc))
    be = LocalBackend(lm.model, lm.tokenizer, lm.layout)
    q = "What is 17 + 25?"
    params = SamplingParams(max_tokens=24, temperature=0)
    ref = be.sample(q, 1, params, Budget())[0]
    one = run_strategy("hogwild", q, be, n=1, protocol=False, max_tokens=24, temperature=0.0)
    assert one.candidates[0].token_ids == ref.token_ids
    # the CLI: two collaborating workers, one budget
    rc = main(["solve", "-m", "smollm2-135m-instruct", "-p", q, "--strategy", "hogwild", "-n", "2",
               "--max-tokens", "24", "--budget", "tokens=40", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["strategy"] == "hogwild" and len(out["candidates"]) == 2
    assert out["budget"]["spent"]["generated_tokens"] <= 40 and out["info"]["shared_prompt_tokens"] > 20
