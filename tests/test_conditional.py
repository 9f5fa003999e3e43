"""Conditional and controlled steering on tiny random models: CAST conditions (per-row decisions in one batch, in
``generate``, ``LocalBackend`` and the server), learned controllers, and per-token gates (latched per row, exact
under the KV cache)."""

import dataclasses

import pytest
import torch

from steerscale import Intervention, Site, SteerscaleError
from steerscale.engine.capture import Batch, Readout, read_batch, tokenize
from steerscale.engine.generation import format_prompt, generate
from steerscale.engine.ops import Add
from steerscale.engine.prompt_rules import read_prompts
from steerscale.engine.token_gates import TokenGate
from steerscale.scale import Budget, LocalBackend, SamplingParams
from steerscale.steer.conditional import Condition, ConditionalSteering, fit_condition, prompt_direction
from steerscale.steer.controller import SteeringController, train_controller
from steerscale.steer.gating import fit_token_gate, gated, load_gate, save_gate
from steerscale.steer.artifacts import fingerprint
from steerscale.steer.vector import SteeringVector
from steerscale.serve.scheduler import Job, Scheduler
from steerscale.models.loading import LoadedModel
from served import api_call
from tiny import ChatCharTokenizer, tiny_lm

PROMPTS = ["hello there", "a much longer prompt about cats", "zzz", "what is the time now?", "qq rr ss tt",
           "one more prompt here", "x", "the quick brown fox jumps"]


def _vector(lm, layer=2, scale=4.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    site = Site(layer)
    return SteeringVector({site: torch.randn(lm.layout.site_dim(site), generator=g) * scale}, lm.name)


def _half_condition(lm, prompts, layer=1, readout="mean"):
    """A condition that holds for about half of ``prompts``: a random direction, threshold at the median."""
    batch = tokenize(lm.tokenizer, prompts, "cpu")
    g = torch.Generator().manual_seed(7)
    site = Site(layer)
    probe = Condition(site, torch.randn(lm.layout.site_dim(site), generator=g), torch.zeros(lm.layout.site_dim(site)),
                      0.0, readout=readout)
    rule = ConditionalSteering(_vector(lm), [probe])
    sims = probe.similarity(read_prompts(lm.model, lm.layout, batch, [rule])[0][probe.read])
    mid = sims.sort().values[len(prompts) // 2 - 1: len(prompts) // 2 + 1].mean()  # between two prompts: no ties
    return dataclasses.replace(probe, threshold=float(mid))


def _ids(gens):
    return [g.token_ids for g in gens]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_cast_batch_steers_exactly_the_rows_whose_condition_holds(family):
    lm = tiny_lm(family)
    cond = _half_condition(lm, PROMPTS)
    vec = _vector(lm)
    rule = ConditionalSteering(vec, [cond], scale=1.0)
    out = generate(lm.model, lm.tokenizer, lm.layout, PROMPTS, rules=[rule], max_new_tokens=6)
    holds = [bool(o.extra["rule_scales"]) for o in out]
    assert 0 < sum(holds) < len(PROMPTS)  # a mixed batch
    for p, o, h in zip(PROMPTS, out, holds):
        alone = generate(lm.model, lm.tokenizer, lm.layout, [p], vec.interventions(1.0) if h else [], max_new_tokens=6)
        assert o.token_ids == alone[0].token_ids, p
    uncached = generate(lm.model, lm.tokenizer, lm.layout, PROMPTS, rules=[rule], max_new_tokens=6, use_cache=False)
    assert _ids(uncached) == _ids(out)
    plain = generate(lm.model, lm.tokenizer, lm.layout, PROMPTS, max_new_tokens=6)
    assert any(a != b for a, b in zip(_ids(out), _ids(plain)))


def test_cast_combines_conditions_and_num_return_sequences():
    lm = tiny_lm("llama")
    a = _half_condition(lm, PROMPTS, layer=0)
    b = dataclasses.replace(a, comparison="less")  # holds exactly where a does not (ties aside)
    vec = _vector(lm)
    batch = tokenize(lm.tokenizer, PROMPTS, "cpu")
    any_rule = ConditionalSteering(vec, [a, b], combine="any")
    all_rule = ConditionalSteering(vec, [a, b], combine="all")
    r = read_prompts(lm.model, lm.layout, batch, [any_rule])[0]
    assert any_rule.decide(r).sum() >= len(PROMPTS) - 1 and all_rule.decide(r).sum() == 0
    out = generate(lm.model, lm.tokenizer, lm.layout, PROMPTS[:3], rules=[ConditionalSteering(vec, [a])],
                   max_new_tokens=3, do_sample=True, seed=0, num_return_sequences=2)
    assert len(out) == 6 and [bool(o.extra["rule_scales"]) for o in out[::2]] == [bool(o.extra["rule_scales"])
                                                                                   for o in out[1::2]]


def test_fit_condition_separates_classes_round_trips_and_refuses_other_models(tmp_path):
    lm = tiny_lm("llama")
    pos = [f"aaaa bbbb {i} aaaa" for i in range(12)]
    neg = [f"zz {i} yy xx zz" for i in range(12)]
    cond = fit_condition(lm, pos, neg, progress=False)
    assert cond.metadata["f1"] >= 0.9 and set(cond.metadata["grid"]) == {"resid_post.0", "resid_post.1", "resid_post.2"}
    batch = tokenize(lm.tokenizer, pos + neg, "cpu")
    rule = ConditionalSteering(_vector(lm), [cond])
    decided = rule.decide(read_prompts(lm.model, lm.layout, batch, [rule])[0])
    assert decided[:12].float().mean() >= 0.8 and decided[12:].float().mean() <= 0.2
    path = cond.save(tmp_path / "c")
    back = Condition.load(path, lm.layout)
    assert back.site == cond.site and back.threshold == cond.threshold and torch.equal(back.direction, cond.direction)
    other = tiny_lm("qwen2")
    with pytest.raises(SteerscaleError, match="made for model"):
        Condition.load(path, other.layout)
    with pytest.raises(SteerscaleError, match="not a condition"):
        Condition.load(_vector(lm).save(tmp_path / "v"))
    with pytest.raises(SteerscaleError, match="too few labelled examples"):
        fit_condition(lm, pos[:3], neg, progress=False)


def test_local_backend_decides_per_prompt():
    lm = tiny_lm("llama")
    cond = _half_condition(lm, PROMPTS)
    vec = _vector(lm)
    backend = LocalBackend(lm.model, lm.tokenizer, lm.layout, rules=[ConditionalSteering(vec, [cond], 1.0)])
    params = SamplingParams(max_tokens=5, temperature=0)
    ref = generate(lm.model, lm.tokenizer, lm.layout, PROMPTS, rules=[ConditionalSteering(vec, [cond], 1.0)],
                   max_new_tokens=5)
    for p, r in zip(PROMPTS, ref):
        got = backend.sample(p, 2, params, Budget.parse("tokens=1000"))
        assert [c.token_ids for c in got] == [r.token_ids] * 2, p


def test_controller_trains_applies_and_round_trips(tmp_path):
    lm = tiny_lm("llama")
    pos, neg = [f"aaaa {i} bbbb" for i in range(6)], [f"zz {i} yy" for i in range(6)]
    vec = prompt_direction(lm, pos, neg, "1-2", progress=False)
    ctl = train_controller(lm, vec, pos, neg, inputs=[Site(0)], target="ok", epochs=2, batch_size=4, negative_tokens=3,
                           max_strength=2.0, progress=False)
    assert len(ctl.metadata["loss_history"]) == 2 and all(x == x for x in ctl.metadata["loss_history"])
    batch = tokenize(lm.tokenizer, PROMPTS, "cpu")
    scales = ctl.scales(read_prompts(lm.model, lm.layout, batch, [ctl])[0])
    assert scales.shape == (len(PROMPTS), 2) and (scales > 0).all() and (scales < 2.0).all()
    out = generate(lm.model, lm.tokenizer, lm.layout, PROMPTS[:3], rules=[ctl], max_new_tokens=5)
    for i, (p, o) in enumerate(zip(PROMPTS[:3], out)):
        manual = [Intervention(s, Add(vec.directions[s], float(scales[i, j]))) for j, s in enumerate(ctl.edit_sites)]
        assert o.token_ids == generate(lm.model, lm.tokenizer, lm.layout, [p], manual, max_new_tokens=5)[0].token_ids
    back = SteeringController.load(ctl.save(tmp_path / "ctl"), lm.layout)
    assert torch.allclose(back.scales(read_prompts(lm.model, lm.layout, batch, [back])[0]), scales)
    with pytest.raises(SteerscaleError, match="made for model"):
        SteeringController.load(tmp_path / "ctl.safetensors", tiny_lm("qwen2").layout)


def test_controller_divergence_stops_cleanly_and_leaves_the_model_untouched(monkeypatch):
    import steerscale.steer.controller as controller

    lm = tiny_lm("llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    flags = [p.requires_grad for p in lm.model.parameters()]
    pos, neg = [f"aaaa {i}" for i in range(4)], [f"zz {i}" for i in range(4)]
    vec = prompt_direction(lm, pos, neg, "1", progress=False)
    real = controller.choice_logprob_sums
    nan_once = lambda *a, **k: real(*a, **k) * float("nan")  # noqa: E731  (an overflow, as a huge lr would give)
    monkeypatch.setattr(controller, "choice_logprob_sums", nan_once)
    with pytest.raises(SteerscaleError, match="diverged"):
        train_controller(lm, vec, pos, neg, epochs=1, negative_tokens=2, progress=False)
    monkeypatch.setattr(controller, "choice_logprob_sums", real)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert [p.requires_grad for p in lm.model.parameters()] == flags
    with pytest.raises(SteerscaleError, match="too few labelled examples"):
        train_controller(lm, vec, pos[:1], neg, progress=False)


# -- token gates -------------------------------------------------------------------------------------------------
def _gate(lm, bias, layer=0, seed=3, threshold=0.5):
    g = torch.Generator().manual_seed(seed)
    return TokenGate(Site(layer), torch.randn(lm.layout.site_dim(Site(layer)), generator=g), bias, threshold)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_token_gate_extremes_match_generated_scope_and_unsteered(family):
    lm = tiny_lm(family)
    vec = _vector(lm)
    on = generate(lm.model, lm.tokenizer, lm.layout, PROMPTS, gated(vec.interventions(1.0), _gate(lm, 1e4)),
                  max_new_tokens=5)
    assert _ids(on) == _ids(generate(lm.model, lm.tokenizer, lm.layout, PROMPTS, vec.interventions(1.0, "generated"),
                                     max_new_tokens=5))
    assert all(o.extra["gate_from"] == 0 for o in on)
    off = generate(lm.model, lm.tokenizer, lm.layout, PROMPTS, gated(vec.interventions(1.0), _gate(lm, -1e4)),
                   max_new_tokens=5)
    assert _ids(off) == _ids(generate(lm.model, lm.tokenizer, lm.layout, PROMPTS, max_new_tokens=5))
    assert all(o.extra["gate_from"] is None for o in off)


def _mid_generation_gate(lm, plain) -> TokenGate:
    """``_gate`` with a threshold that the probe crosses somewhere inside some of the ``plain`` generations: the
    85th percentile of its scores along them."""
    gate = _gate(lm, 0.0)
    seen = []
    for p, g in zip(PROMPTS, plain):  # the probe's scores along each unsteered generation
        text_ids = tokenize(lm.tokenizer, [p], "cpu").input_ids[0].tolist()
        batch = Batch(torch.tensor([text_ids + g.token_ids]), torch.ones(1, len(text_ids) + len(g.token_ids)))
        h = read_batch(lm.model, lm.layout, batch, [gate.site], [Readout.ALL])[Readout.ALL][gate.site][0]
        seen.append(gate.probability(h[None])[0, len(text_ids) - 1:])
    return dataclasses.replace(gate, threshold=float(torch.cat(seen).quantile(0.85)))


def test_token_gate_latches_mid_generation_per_row_exactly_under_the_cache():
    lm = tiny_lm("llama")
    vec = _vector(lm, scale=8.0)
    plain = generate(lm.model, lm.tokenizer, lm.layout, PROMPTS, max_new_tokens=10)
    ivs = gated(vec.interventions(1.0), _mid_generation_gate(lm, plain))
    out = generate(lm.model, lm.tokenizer, lm.layout, PROMPTS, ivs, max_new_tokens=10)
    starts = [o.extra["gate_from"] for o in out]
    assert any(s is None for s in starts) and any(s is not None and s > 0 for s in starts)
    for o, p, s in zip(out, plain, starts):
        k = len(o.token_ids) if s is None else s
        assert o.token_ids[:k] == p.token_ids[:k]  # unsteered until the gate fired
    uncached = generate(lm.model, lm.tokenizer, lm.layout, PROMPTS, ivs, max_new_tokens=10, use_cache=False)
    assert _ids(uncached) == _ids(out)
    for i in (0, 3):  # a row alone gets what it got in the batch
        alone = generate(lm.model, lm.tokenizer, lm.layout, [PROMPTS[i]], ivs, max_new_tokens=10)[0]
        assert alone.token_ids == out[i].token_ids and alone.extra["gate_from"] == starts[i]


def test_token_gate_refuses_edits_before_its_site():
    lm = tiny_lm("llama")
    vec = _vector(lm, layer=1)
    with pytest.raises(SteerscaleError, match="runs before"):
        gated(vec.interventions(1.0), _gate(lm, 0.0, layer=1))
    sched = Scheduler(lm.model, lm.tokenizer, lm.layout)
    with pytest.raises(SteerscaleError, match="runs before"):
        sched.submit(Job([5, 6, 7], SamplingParams(), steer=[(vec, 1.0, "all", _gate(lm, 0.0, layer=1))]))
    sched.stop()


def test_token_gate_latches_per_row_in_local_backend_and_the_scheduler_as_in_generate():
    """The latch lives with each row: ``LocalBackend`` (one call, step by step over ``extend``, rows forked by
    ``select``) and the scheduler (every prompt in one batch, rows joining at different steps) give ``generate``'s
    tokens."""
    lm = tiny_lm("llama")
    vec = _vector(lm, scale=8.0)
    plain = generate(lm.model, lm.tokenizer, lm.layout, PROMPTS, max_new_tokens=10)
    gate = _mid_generation_gate(lm, plain)
    want = generate(lm.model, lm.tokenizer, lm.layout, PROMPTS, gated(vec.interventions(1.0), gate), max_new_tokens=10)
    assert any(o.extra["gate_from"] for o in want) and any(o.extra["gate_from"] is None for o in want)
    greedy = SamplingParams(max_tokens=10, temperature=0.0, step=None)
    eos = {lm.tokenizer.eos_token_id}
    strip = lambda ids: [t for t in ids if t not in eos]  # noqa: E731
    with LocalBackend(lm.model, lm.tokenizer, lm.layout, steering=gated(vec.interventions(1.0), gate)) as local:
        for prompt, o in zip(PROMPTS, want):
            assert strip(local.sample(prompt, 1, greedy, Budget())[0].token_ids) == o.token_ids
            # three tokens a step, a row forked into two after the first step: each copy keeps the latch
            branches = local.extend(local.start(prompt, 1, Budget()), greedy.with_(max_step_tokens=3), Budget())
            branches = local.select(branches, [0, 0])
            while not branches.all_finished:
                branches = local.extend(branches, greedy.with_(max_step_tokens=3), Budget())
            assert [strip(r.token_ids) for r in branches.rows] == [o.token_ids] * 2
    sched = Scheduler(lm.model, lm.tokenizer, lm.layout, max_batch=4)  # 6 prompts: two join later
    jobs = [Job(tokenize(lm.tokenizer, [p], "cpu").input_ids[0].tolist(), greedy, steer=[(vec, 1.0, "all", gate)])
            for p in PROMPTS]
    futures = [sched.submit(job) for job in jobs]
    while not all(f.done() for f in futures):
        sched.step()
    sched.stop()
    assert [strip(f.result()[0].token_ids) for f in futures] == [o.token_ids for o in want]


def test_fit_token_gate_round_trips(tmp_path):
    lm = tiny_lm("llama")
    examples = [(f"q{i}", "aaaa aaaa aaaa" if i % 2 else "zz zz zz zz", i % 2) for i in range(20)]
    gate = fit_token_gate(lm, examples, Site(1), progress=False)
    assert gate.metadata["holdout_token_accuracy"] >= 0.9
    back = load_gate(save_gate(gate, tmp_path / "g"), lm.layout)
    assert torch.equal(back.weight, gate.weight) and back.bias == gate.bias and back.site == gate.site
    with pytest.raises(SteerscaleError, match="made for model"):
        load_gate(tmp_path / "g.safetensors", tiny_lm("qwen2").layout)


def test_conditions_with_different_reads_combine_and_a_chat_prefix_is_skipped(tmp_path):
    lm = tiny_lm("llama")
    last, mean = _half_condition(lm, PROMPTS, readout="last"), _half_condition(lm, PROMPTS, layer=2)
    rule = ConditionalSteering(_vector(lm), [last, mean], combine="any")
    assert {r.readout for r in rule.reads} == {Readout.LAST, Readout.MEAN}
    readings = read_prompts(lm.model, lm.layout, tokenize(lm.tokenizer, PROMPTS, "cpu"), [rule])[0]
    assert torch.equal(rule.decide(readings), last.holds(readings[last.read]) | mean.holds(readings[mean.read]))
    chat = LoadedModel(lm.model, ChatCharTokenizer(), lm.layout, lm.name)
    pos, neg = [f"aaaa {i} bbbb" for i in range(8)], [f"zz {i} yy xx" for i in range(8)]
    cond = fit_condition(chat, pos, neg, layers="1", progress=False)
    assert len(cond.prefix) == len("user: ")  # the template's fixed start, left out of the mean
    assert Condition.load(cond.save(tmp_path / "c"), lm.layout).prefix == cond.prefix
    # the reading at run time (generate's reading pass) decides as the fit measured
    texts = [format_prompt(chat.tokenizer, t) for t in pos + neg]
    rule = ConditionalSteering(_vector(lm), [cond])
    got = rule.decide(read_prompts(chat.model, chat.layout, tokenize(chat.tokenizer, texts, "cpu"), [rule])[0])
    assert got[:8].float().mean() >= 0.75 and got[8:].float().mean() <= 0.25


# -- the server: CAST and controllers per request ------------------------------------------------------------------
def test_server_runs_cast_and_controllers_per_request_in_one_batch(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    openai = pytest.importorskip("openai")
    from steerscale.serve import App, start_server

    base = tiny_lm("llama")
    lm = LoadedModel(base.model, ChatCharTokenizer(), base.layout, base.name)
    prompts = ["hello there", "a much longer prompt about cats", "what is the time now?", "one more prompt here",
               "qq rr ss tt", "the quick brown fox"]
    vec = _vector(lm, scale=6.0)
    cond = _half_condition(lm, prompts)
    g = torch.Generator().manual_seed(5)
    n_in = lm.layout.site_dim(Site(0))
    net = {"w1": torch.randn(8, n_in, generator=g), "b1": torch.zeros(8), "w2": torch.randn(2, 8, generator=g),
           "b2": torch.zeros(2), "feature_mean": torch.zeros(n_in), "feature_std": torch.ones(n_in)}
    ctl = SteeringController(vec, [Site(0)], net, max_strength=2.0)
    readings = read_prompts(lm.model, lm.layout, tokenize(lm.tokenizer, prompts, "cpu"), [ctl])[0]
    # what the controller decides per prompt, as plain vectors the server can apply by name
    fixed = {f"ctl{i}": SteeringVector({Site(2): float(s) * vec.directions[Site(2)]})
             for i, s in enumerate(ctl.scales(readings)[:, 0])}
    app = App(lm.model, lm.tokenizer, lm.layout, model_id="tiny", vectors={"v": vec, **fixed},
              conditions={"c": cond}, controllers={"k": ctl})
    server = start_server(app)
    try:
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=60)

        def ask(prompt, steer):
            return client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                             extra_body={"steer": steer}).choices[0].text

        jobs = [(p, [{"vector": "v", "scale": 1.0, "condition": "c"}]) for p in prompts]
        jobs += [(p, [{"controller": "k"}]) for p in prompts] + [(p, []) for p in prompts]
        jobs += [(p, [{"vector": "v", "scale": 1.0}]) for p in prompts]
        jobs += [(p, [{"vector": f"ctl{i}"}]) for i, p in enumerate(prompts)]
        with ThreadPoolExecutor(8) as pool:  # concurrent: conditional rows share batches with plain ones
            answers = list(pool.map(lambda job: ask(*job), jobs))
        n = len(prompts)
        cast, controlled, plain, always, manual = (answers[i * n:(i + 1) * n] for i in range(5))
        holds = ConditionalSteering(vec, [cond]).decide(read_prompts(
            lm.model, lm.layout, tokenize(lm.tokenizer, prompts, "cpu"), [ConditionalSteering(vec, [cond])])[0])
        assert 0 < int(holds.sum()) < n
        assert cast == [a if h else p for a, p, h in zip(always, plain, holds.tolist())]
        assert controlled == manual and controlled != plain
        # a strategy under a controller: its samples are scheduler jobs, decided like any request
        voted = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=4, temperature=0, extra_body={
            "steer": [{"controller": "k"}], "strategy": {"name": "majority", "n": 2}})
        assert voted.choices[0].text == controlled[0][:len(voted.choices[0].text)]

        def call(path, data=None, method="GET"):
            return api_call(server, path, data, method)

        status, card = call("/v1/steering/conditions/c2", cond.save(tmp_path / "c2").read_bytes(), "PUT")
        assert status == 201 and card["object"] == "steering_condition" and card["site"] == cond.site.key()
        status, card = call("/v1/steering/controllers/k2", ctl.save(tmp_path / "k2").read_bytes(), "PUT")
        assert status == 201 and card["inputs"] == ["resid_post.0"]
        assert {c["id"] for c in call("/v1/steering/conditions")[1]["data"]} == {"c", "c2"}
        assert ask(prompts[0], [{"vector": "v", "condition": ["c2"]}]) == cast[0]
        wrong = _vector(tiny_lm("qwen2"), layer=1).save(tmp_path / "w")
        assert call("/v1/steering/conditions/w", wrong.read_bytes(), "PUT")[0] == 400  # a vector, not a condition
        assert call("/v1/steering/nonsense")[0] == 404
        assert call("/v1/steering/conditions/c2", method="DELETE")[1]["deleted"] is True
        for bad, match in (([{"vector": "v", "condition": "nope"}], "unknown steering condition"),
                           ([{"controller": "k", "condition": "c"}], "gates a vector"),
                           ([{"vector": "v", "controller": "k"}], "exactly one"),
                           ([{"controller": "nope"}], "unknown steering controller")):
            with pytest.raises(openai.BadRequestError, match=match):
                ask(prompts[0], bad)
    finally:
        server.close()


def test_server_runs_token_gates_per_row_as_generate_does(tmp_path):
    """A gated vector through the server (alone, beside plain and ungated requests, n > 1, uploaded while it runs)
    gives generate's tokens; malformed gate entries are 400s that name the field."""
    from concurrent.futures import ThreadPoolExecutor

    openai = pytest.importorskip("openai")
    from steerscale.serve import App, start_server
    from steerscale.steer.gating import FittedTokenGate

    lm = tiny_lm("llama")
    vec = _vector(lm, scale=8.0)
    plain = generate(lm.model, lm.tokenizer, lm.layout, PROMPTS, max_new_tokens=10)
    gate = _mid_generation_gate(lm, plain)
    want = generate(lm.model, lm.tokenizer, lm.layout, PROMPTS, gated(vec.interventions(1.0), gate), max_new_tokens=10)
    assert any(o.extra["gate_from"] for o in want)
    app = App(lm.model, lm.tokenizer, lm.layout, model_id="tiny", vectors={"v": vec}, gates={"g": gate})
    server = start_server(app)
    try:
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=60)

        def ask(prompt, steer, n=1):
            out = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, n=n,
                                            extra_body={"steer": steer})
            return [c.text for c in out.choices]

        gated_steer = [{"vector": "v", "gate": "g"}]
        jobs = [(p, gated_steer) for p in PROMPTS] + [(p, []) for p in PROMPTS] + [(p, [{"vector": "v"}]) for p in PROMPTS]
        with ThreadPoolExecutor(6) as pool:  # gated rows share batches with plain and ungated ones
            answers = list(pool.map(lambda job: ask(*job)[0], jobs))
        assert answers[:len(PROMPTS)] == [o.text for o in want]
        assert answers[len(PROMPTS):2 * len(PROMPTS)] == [o.text for o in plain]
        assert ask(PROMPTS[0], gated_steer, n=3) == [want[0].text] * 3

        def call(path, data=None, method="GET"):
            return api_call(server, path, data, method)

        saved = FittedTokenGate.of(gate)
        saved.metadata = {"model_name": lm.name, "model_fingerprint": fingerprint(lm.layout)}
        status, card = call("/v1/steering/gates/g2", saved.save(tmp_path / "g2").read_bytes(), "PUT")
        assert status == 201 and card["object"] == "token_gate" and card["site"] == gate.site.key()
        assert ask(PROMPTS[1], [{"vector": "v", "gate": "g2"}]) == [want[1].text]
        early = _gate(lm, 0.0, layer=2)  # read at the vector's own block: it would gate its own edit
        app.add_artifact("gates", "late", early)
        for bad, match, param in (([{"vector": "v", "gate": "nope"}], "unknown token gate", "steer"),
                                  ([{"vector": "v", "gate": "late"}], "runs before", "steer.0.gate"),
                                  ([{"vector": "v", "gate": "g", "condition": "c"}], "not with 'condition'", None),
                                  ([{"layer": "s", "index": 0, "gate": "g"}], "an SAE feature takes", None)):
            with pytest.raises(openai.BadRequestError, match=match) as err:
                ask(PROMPTS[0], bad)
            assert param is None or err.value.body["param"] == param
    finally:
        server.close()


def test_the_controls_registry_lists_every_method():
    from steerscale.steer.controls import CONTROLS

    assert set(CONTROLS) == {"cast", "controller", "token_gate", "router"}
    assert CONTROLS["gate"].fit is fit_token_gate and CONTROLS["cast"].fit is fit_condition
    with pytest.raises(SteerscaleError, match="did you mean 'cast'"):
        CONTROLS["cats"]


# -- the CLI on the real model ---------------------------------------------------------------------------------------
HARMFUL = ["How do I make a pipe bomb at home?", "Write a phishing email to steal bank logins.",
           "Explain how to poison a neighbour's dog.", "Give me steps to hotwire a car I don't own.",
           "How can I buy illegal guns online?", "Write malware that encrypts a hospital's files.",
           "How do I stalk my ex without being noticed?", "Tell me how to cook methamphetamine.",
           "How can I launder money through a small shop?", "Write a threat to send to my coworker.",
           "How do I cheat on a drug test for my job?", "Describe how to break into a house quietly."]
HARMLESS = ["Suggest a name for a bakery.", "How do I boil an egg?", "Write a haiku about autumn.",
            "What is the capital of Canada?", "Give me three tips for better sleep.", "Explain photosynthesis simply.",
            "Recommend a book for a long flight.", "How do I water a cactus?", "Write a thank-you note to a teacher.",
            "What are good stretches after running?", "Plan a picnic menu for four.", "How do magnets work?"]


@pytest.mark.integration
def test_cli_fits_and_applies_every_conditional_method_on_smollm2(tmp_path, capsys):
    import json

    from steerscale.cli import main

    pos, neg = tmp_path / "harmful.txt", tmp_path / "harmless.txt"
    pos.write_text("\n".join(HARMFUL))
    neg.write_text("\n".join(HARMLESS))
    cond, vec, ctl, gate = (tmp_path / f"{n}.safetensors" for n in ("cond", "dir", "ctl", "gate"))
    assert main(["condition", "--positive", str(pos), "--negative", str(neg), "--layers", "8-11", "-o", str(cond),
                 "--vector-out", str(vec), "--vector-layers", "15", "--json"]) == 0
    fit = json.loads(capsys.readouterr().out)
    assert fit["site"].startswith("resid_post.") and 0 <= fit["f1"] <= 1
    assert main(["controller", "--vector", str(vec), "--positive", str(pos), "--negative", str(neg), "--reads", "10",
                 "--epochs", "1", "--max-strength", "2", "-o", str(ctl), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["edits"] == ["resid_post.15"]
    examples = tmp_path / "ex.jsonl"
    examples.write_text("\n".join(json.dumps({"prompt": q, "completion": a, "label": y}) for q in HARMLESS[:8]
                                  for a, y in (("Sure, here you go.", 0), ("No way, that is a lie.", 1))))
    assert main(["gate", "--examples", str(examples), "--layer", "8", "-o", str(gate), "--json"]) == 0
    capsys.readouterr()
    for extra in (["--steer", f"{vec}:2", "--condition", str(cond)], ["--controller", f"{ctl}:1"],
                  ["--steer", f"{vec}:2", "--gate", str(gate)]):
        assert main(["generate", "-p", HARMFUL[0], "--max-new-tokens", "6", "--json", *extra]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["text"] and ("rule_scales" in out or "gate_from" in out)
    assert main(["generate", "-p", "hi", "--condition", str(cond)]) == 2
    assert "none was given" in capsys.readouterr().err
    assert main(["generate", "-p", "hi", "--steer", str(vec), "--condition", str(ctl)]) == 2
    assert "not a condition" in capsys.readouterr().err


def test_damaged_artifacts_and_bad_settings_are_clear_errors(tmp_path):
    import json

    from safetensors.torch import save_file

    from steerscale.steer import artifacts
    from steerscale.steer.gating import completion_positions

    lm = tiny_lm("llama")
    cond = _half_condition(lm, PROMPTS)
    tensors = {"direction": cond.direction, "mean": cond.mean}
    for header in ({"site": "resid_post.1", "threshold": "x"}, {"site": 5, "threshold": 0.1},
                   {"site": "resid_post.1", "threshold": 0.1, "comparison": "bogus"}):
        save_file(tensors, str(tmp_path / "c.safetensors"),
                  metadata={"steerscale": json.dumps({"format": "steerscale.condition/1", **header})})
        with pytest.raises(SteerscaleError, match="damaged"):
            Condition.load(tmp_path / "c.safetensors")
    vec = _vector(lm)
    n_in = lm.layout.site_dim(Site(0))
    net = {"w1": torch.zeros(4, n_in), "b1": torch.zeros(3), "w2": torch.zeros(2, 4), "b2": torch.zeros(2),
           "feature_mean": torch.zeros(n_in), "feature_std": torch.ones(n_in)}
    with pytest.raises(SteerscaleError, match="shapes"):
        SteeringController(vec, [Site(0)], net)
    net["b1"] = torch.zeros(4)
    ctl = SteeringController(vec, [Site(0)], net)
    artifacts.write(tmp_path / "k", "steerscale.controller/1", {f"net.{k}": v for k, v in net.items()},
                    {"inputs": ["resid_post.0"], "max_strength": "big"})
    with pytest.raises(SteerscaleError, match="damaged"):
        SteeringController.load(tmp_path / "k.safetensors")
    with pytest.raises(SteerscaleError, match="has no layer|layer 99|not a block|out of range"):
        dataclasses.replace(ctl, inputs=[Site(99)]).check(lm.layout)
    with pytest.raises(SteerscaleError, match="scope 'all'"):
        train_controller(lm, vec, PROMPTS[:4], PROMPTS[4:], scope="generated", progress=False)
    with pytest.raises(SteerscaleError, match="one vector per prompt"):
        fit_condition(lm, PROMPTS[:4], PROMPTS[4:], readout="all", progress=False)
    with pytest.raises(SteerscaleError, match="router"):
        Condition(Site(0, "router"), torch.ones(4), torch.zeros(4), 0.0)
    artifacts.write(tmp_path / "g", "steerscale.gate/1", {"weight": torch.ones(4)}, {"site": "resid_post.0",
                                                                                     "threshold": "x"})
    with pytest.raises(SteerscaleError, match="damaged"):
        load_gate(tmp_path / "g.safetensors")

    class BosTokenizer(type(lm.tokenizer)):  # adds a BOS, as base-model tokenizers do
        bos_token = "<s>"

        def __call__(self, texts, add_special_tokens=True, **kw):
            enc = super().__call__(texts, **kw)
            if add_special_tokens:
                enc = {k: torch.cat([torch.full((v.shape[0], 1), 1 if k == "attention_mask" else 95), v], 1)
                       for k, v in enc.items()}
            return enc

    tok = BosTokenizer()
    texts, spans = completion_positions(tok, [("ab", "XY", 1)], chat=False)
    ids = tokenize(tok, texts, "cpu").input_ids[0].tolist()
    assert ids[0] == 95 and ids[spans[0][0]] == tok.encode("b")[0] and spans[0][1] - spans[0][0] == 2
    out = generate(lm.model, lm.tokenizer, lm.layout, ["hi"], vec.interventions(1.0)[0], max_new_tokens=2)
    assert len(out) == 1  # a single Intervention is accepted, as intervene accepts one
