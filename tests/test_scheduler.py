"""The batching scheduler: requests with different steering share forward passes, and each gets the tokens it gets
when it runs alone (greedy, float32; where batch shapes change rounding, the margin rule of issue 15)."""

import threading

import pytest
import torch

from steerscale import Site, SiteKind, SteerscaleError
from steerscale.scale import Budget, LocalBackend, SamplingParams
from steerscale.serve.scheduler import Job, Scheduler
from steerscale.steer.vector import SteeringVector
from tiny import CharTokenizer, hook_count, record_registrations, tiny_model

MARGIN = 1e-4  # a greedy token may differ only where the top-2 logits are this close


@pytest.fixture(scope="module")
def setup():
    model, layout = tiny_model("llama")
    tok = CharTokenizer()
    g = torch.Generator().manual_seed(3)
    vecs = {name: SteeringVector({Site(layer, SiteKind.RESID_POST): torch.randn(layout.site_dim(
        Site(layer, SiteKind.RESID_POST)), generator=g) * 3}) for name, layer in (("a", 0), ("b", 1))}
    return model, layout, tok, vecs


def jobs(tok, vecs, stop=("e",)):
    """Plain, steered (+/-, two vectors), generated-only and prompt-only scopes, stop strings, sampled + seeded."""
    greedy = dict(temperature=0.0, step=None)
    specs = [
        ("Hello world", dict(max_tokens=12, **greedy), None, (), "all"),
        ("The cat sat", dict(max_tokens=9, **greedy), None, ((vecs["a"], 1.0),), "all"),
        ("The cat sat", dict(max_tokens=9, **greedy), None, ((vecs["a"], -1.0),), "all"),
        ("A much longer prompt than the others", dict(max_tokens=7, **greedy), None,
         ((vecs["a"], 0.5), (vecs["b"], -2.0)), "all"),
        ("abc", dict(max_tokens=10, **greedy), None, ((vecs["b"], 1.5),), "generated"),
        ("abc", dict(max_tokens=10, **greedy), None, ((vecs["b"], 1.5),), "prompt"),
        ("xyz", dict(max_tokens=14, stop=stop, **greedy), None, ((vecs["a"], 1.0),), "all"),
        ("qrs", dict(max_tokens=10, temperature=1.0, step=None), 7, ((vecs["b"], 1.0),), "all"),
    ]
    return [Job(tok.encode(p), SamplingParams(**kw), seed=seed, steer=steer, scope=scope)
            for p, kw, seed, steer, scope in specs]


def alone(model, tok, layout, job):
    s = Scheduler(model, tok, layout, max_batch=1)
    fut = s.submit(job)
    while not fut.done():
        s.step()
    return fut.result()[0], s


def logits_alone(model, tok, layout, job, prefix):
    """Top-2 margin of the next-token logits after ``prefix`` generated tokens, by a fresh alone run."""
    s = Scheduler(model, tok, layout, max_batch=1)
    j = Job(job.prompt_ids, job.params.with_(max_tokens=len(prefix) + 1), steer=job.steer, scope=job.scope)
    s.submit(j)
    s._admit()
    for t in prefix:
        s.rows[0].job.cands[0].token_ids.append(t)
        s._select([0])
        inp = torch.tensor([[t]])
        pos = s._mask.sum(-1, keepdim=True)
        mask = torch.cat([s._mask, torch.ones_like(s._mask[:, :1])], 1)
        from steerscale.engine.kvcache import cache_of

        generated = torch.tensor([[len(j.prompt_ids)]])
        with s.hooks.running(s._plan([s.rows[0].job], generated, generated[:, 0])):
            out = model(input_ids=inp, attention_mask=mask, position_ids=pos, cache=s._cache, use_cache=True)
        s._cache, s._mask, s._logits = cache_of(out), mask, out.logits[:, -1].float()
    top = s._logits[0].topk(2).values
    return float(top[0] - top[1])


def assert_as_alone(model, tok, layout, batch, futs, ref):
    """Each job's tokens are the ones it got alone, but where the alone run's top-2 logits were a tie."""
    for job, f, r in zip(batch, futs, ref):
        got = f.result()[0]
        if got.token_ids != r.token_ids:
            k = next(i for i, (a, b) in enumerate(zip(got.token_ids, r.token_ids)) if a != b)
            margin = logits_alone(model, tok, layout, job, r.token_ids[:k])
            assert margin < MARGIN, f"token {k} differs with a top-2 margin of {margin}"
        assert got.finish_reason == r.finish_reason and got.text == r.text


def test_requests_arriving_together_share_one_prefill_and_get_what_they_get_alone(setup):
    model, layout, tok, vecs = setup
    ref = [alone(model, tok, layout, j)[0] for j in jobs(tok, vecs)]
    sched = Scheduler(model, tok, layout, max_batch=8)
    batch = jobs(tok, vecs)
    futs = [sched.submit(j) for j in batch]
    calls = []
    handle = model.register_forward_pre_hook(lambda mod, args, kw: calls.append(kw["input_ids"].shape),
                                             with_kwargs=True)
    try:
        sched.step()
    finally:
        handle.remove()
    assert calls[0] == (len(batch), max(len(j.prompt_ids) for j in batch))  # one left-padded prefill for all
    while not all(f.done() for f in futs):
        sched.step()
    assert_as_alone(model, tok, layout, batch, futs, ref)


def test_mixed_batch_equals_each_request_alone(setup):
    model, layout, tok, vecs = setup
    free = alone(model, tok, layout, jobs(tok, vecs, stop=())[6])[0].text
    stop = (free[4:6],)  # a stop string the steered request reaches (two characters, maybe across two tokens)
    ref = [alone(model, tok, layout, j)[0] for j in jobs(tok, vecs, stop)]
    sched = Scheduler(model, tok, layout, max_batch=8)
    batch = jobs(tok, vecs, stop)
    futs = [sched.submit(j) for j in batch[:4]]
    sched.step()
    sched.step()  # the first four are decoding; the rest join mid-flight
    futs += [sched.submit(j) for j in batch[4:]]
    peak = 0
    while not all(f.done() for f in futs):
        sched.step()
        peak = max(peak, len(sched.rows))
    assert peak >= 5  # requests really shared forward passes
    longest = max(len(r.token_ids) for r in ref)
    assert sched.steps < sum(len(r.token_ids) for r in ref) and sched.steps <= longest + 2
    assert_as_alone(model, tok, layout, batch, futs, ref)
    # served alone, the scheduler decodes as the scaling engine does (plain and steered)
    for i, scale in ((0, None), (1, 1.0)):
        steering = vecs["a"].interventions(scale) if scale is not None else []
        local = LocalBackend(model, tok, layout, steering, chat=False)
        want = local.sample(tok.decode(batch[i].prompt_ids), 1, batch[i].params, Budget())[0]
        assert want.token_ids == ref[i].token_ids and want.finish_reason == ref[i].finish_reason
    # the steering really acted: +1 and -1 of one vector, and the plain request, give three different texts
    assert len({ref[1].text, ref[2].text}) == 2
    assert ref[4].text != ref[5].text  # generated-only vs prompt-only scope
    assert ref[6].finish_reason == "stop" and ref[6].text == free[: free.find(stop[0])]


def test_background_loop_serves_concurrent_submitters_and_cancellation(setup):
    model, layout, tok, vecs = setup
    sched = Scheduler(model, tok, layout, max_batch=4).start()
    try:
        results = {}

        def client(i):
            job = Job(tok.encode(f"client {i}"), SamplingParams(max_tokens=6, temperature=0.0, step=None),
                      steer=((vecs["a"], float(i % 3 - 1)),))
            results[i] = sched.submit(job).result(timeout=60)[0]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(results) == list(range(6)) and all(len(r.token_ids) >= 1 for r in results.values())
        long = Job(tok.encode("cancel me"), SamplingParams(max_tokens=10_000, temperature=0.0, step=None))
        fut = sched.submit(long)
        while sched.steps < 3 or not any(r.job is long for r in sched.rows):  # decoding now
            threading.Event().wait(0.01)
        long.cancel()
        out = fut.result(timeout=30)[0]
        assert out.finish_reason == "cancelled" and 1 <= len(out.token_ids) < 10_000
        early = Job(tok.encode("never ran"), SamplingParams(max_tokens=5, temperature=0.0, step=None))
        early.cancel()
        assert isinstance(sched.submit(early).exception(timeout=30), SteerscaleError)
        quick = sched.submit(Job(tok.encode("next"), SamplingParams(max_tokens=3, temperature=0.0, step=None)))
        assert quick.result(timeout=30)[0].finished
    finally:
        sched.stop()


def test_bad_jobs_are_refused(setup):
    model, layout, tok, vecs = setup
    sched = Scheduler(model, tok, layout)
    with pytest.raises(SteerscaleError, match="scope"):
        Job(tok.encode("x"), SamplingParams(), scope="last:2")
    with pytest.raises(SteerscaleError, match="finite"):
        sched.submit(Job(tok.encode("x"), SamplingParams(), steer=((vecs["a"], float("nan")),)))
    with pytest.raises(SteerscaleError, match="context window"):
        sched.submit(Job(tok.encode("x" * 500), SamplingParams()))


def test_a_seeded_job_of_n_rows_samples_what_the_scaling_engine_samples(setup):
    model, layout, tok, vecs = setup
    params = SamplingParams(max_tokens=8, temperature=1.0, step=None)
    want = LocalBackend(model, tok, layout, chat=False).sample("ab", 3, params, Budget(), seed=7)
    sched = Scheduler(model, tok, layout, max_batch=8)
    other = sched.submit(Job(tok.encode("zzz"), SamplingParams(max_tokens=5, temperature=0.0, step=None),
                             steer=((vecs["a"], 1.0),)))
    sched.step()
    mine = sched.submit(Job(tok.encode("ab"), params, seed=7, n=3))
    while not (mine.done() and other.done()):
        sched.step()
    assert [c.token_ids for c in mine.result()] == [c.token_ids for c in want]
    assert [c.finish_reason for c in mine.result()] == [c.finish_reason for c in want]
    assert sched.call(lambda: 41 + 1).done() is False  # queued until the next step
    sched.step()


def test_a_failed_prefill_fails_only_its_request_and_padding_does_not_pile_up(setup):
    model, layout, tok, vecs = setup
    sched = Scheduler(model, tok, layout, max_batch=8)
    greedy = dict(temperature=0.0, step=None)
    short = sched.submit(Job(tok.encode("hi"), SamplingParams(max_tokens=12, **greedy)))
    sched.step()
    broken = sched.submit(Job([10**6], SamplingParams(max_tokens=3, **greedy)))  # no such token: the forward fails
    long = sched.submit(Job(tok.encode("a much longer prompt " * 3), SamplingParams(max_tokens=2, **greedy)))
    while not (short.done() and long.done()):
        sched.step()
        if long.done() and not short.done():  # the long prompt left: its padding columns went with it
            assert sched._mask.shape[1] <= len(tok.encode("hi")) + 12
    assert broken.exception() is not None and short.result()[0].finished and long.result()[0].finished
    sched.stop()
    with pytest.raises(SteerscaleError, match="shutting down"):
        sched.submit(Job(tok.encode("late"), SamplingParams(max_tokens=2, **greedy)))


def test_ablate_and_set_entries_run_per_row_as_the_scaling_engine_runs_them(setup):
    # the steering grammar's ops beyond add (steer/grammar.py), batched with plain and added rows
    model, layout, tok, vecs = setup
    greedy = SamplingParams(max_tokens=8, temperature=0.0, step=None)
    specs = [("The cat sat", ((vecs["a"], ("set", 0.0)),), "all"),
             ("The cat sat", ((vecs["a"], ("set", 3.0)),), "all"),
             ("Hello world", ((vecs["b"], 1.0), (vecs["a"], ("set", -2.0))), "generated"),
             ("Hello world", (), "all"), ("abc", ((vecs["a"], 1.0),), "all")]
    sched = Scheduler(model, tok, layout, max_batch=8)
    futs = [sched.submit(Job(tok.encode(p), greedy, steer=steer, scope=scope)) for p, steer, scope in specs]
    while not all(f.done() for f in futs):
        sched.step()
    got = [f.result()[0] for f in futs]
    for (prompt, steer, scope), g in zip(specs, got):
        edits = [iv for vec, op in steer for iv in vec.interventions(op, scope)]
        want = LocalBackend(model, tok, layout, edits, chat=False).sample(prompt, 1, greedy, Budget())[0]
        assert g.token_ids == want.token_ids, (prompt, steer)
    assert got[0].token_ids != got[1].token_ids  # ablation and a set value differ: the ops acted


def test_decoding_steps_register_no_hooks_and_stop_removes_them(setup, monkeypatch):
    # issue 24: hooks are attached once per engine, not per step; each step runs its rows' edits on them
    model, layout, tok, vecs = setup
    before = hook_count(model)
    sites = [site for v in vecs.values() for site in v.directions]
    s = Scheduler(model, tok, layout, max_batch=8, sites=sites)
    greedy = dict(temperature=0.0, step=None, max_tokens=60)
    steer = [(), ((vecs["a"], 2.0),), ((vecs["b"], -1.0), (vecs["a"], ("set", 0.5))), ((vecs["a"], ("set", 0.0)),),
             ((vecs["b"], 1.0),)]
    futures = [s.submit(Job(tok.encode(f"prompt {i}"), SamplingParams(**greedy), steer=e, scope=scope))
               for i, (e, scope) in enumerate(zip(steer, ["all", "all", "generated", "all", "prompt"]))]
    registered = record_registrations(monkeypatch)
    while s.steps < 50:
        s.step()
    monkeypatch.undo()
    assert s.steps == 50 and s.running == 5
    assert registered == [], f"hooks registered during decoding: {registered}"
    assert s.hooks.registrations == 1 + len(sites)  # the decoder stack's position hook, one per steered site
    s.stop()
    assert all(f.exception() is not None for f in futures)  # stopped mid-generation: they end with an error
    assert hook_count(model) == before


def test_a_dropped_loop_leaves_no_hooks(setup):
    model, layout, tok, vecs = setup
    before = hook_count(model)
    s = Scheduler(model, tok, layout, max_batch=2, sites=list(vecs["a"].directions))
    fut = s.submit(Job(tok.encode("hi"), SamplingParams(max_tokens=3, temperature=0.0, step=None),
                       steer=((vecs["a"], 1.0),)))
    while not fut.done():
        s.step()
    assert hook_count(model) > before
    del s
    import gc

    gc.collect()
    assert hook_count(model) == before
