"""``steerscale serve`` as a server: FastAPI + uvicorn on a real port, the official ``openai`` client (plain and
streaming), concurrency and cancellation, limits (429, 413, 408, 401), the vector registry, metrics, the OpenAPI
document, graceful shutdown, and a bounded fuzz run that must never get a 5xx. A tiny random llama; a forward
pre-hook that sleeps makes generations slow enough to be interrupted."""

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from steerscale import Site, SiteKind
from steerscale.scale import Budget, LocalBackend, SamplingParams
from steerscale.serve import App, Limits, start_server
from steerscale.serve.responses import Shaper, stream_safe
from steerscale.steer.vector import SteeringVector
from tiny import ChatCharTokenizer, tiny_model

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def parts():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, layout = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    vecs = {name: SteeringVector({Site(layer, SiteKind.RESID_POST): torch.randn(
        layout.site_dim(Site(layer, SiteKind.RESID_POST)), generator=g) * 3}) for name, layer in (("a", 0), ("b", 1))}
    yield model, layout, ChatCharTokenizer(), vecs
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def srv(parts):
    model, layout, tok, vecs = parts
    app = App(model, tok, layout, model_id="tiny", vectors=dict(vecs), max_n=8)
    server = start_server(app)
    yield server
    server.close()


def client(server, **kw):
    return openai.OpenAI(base_url=server.url, api_key=kw.pop("api_key", "none"), timeout=60, max_retries=0, **kw)


def call(server, path, body=None, *, raw=None, method=None, headers=None):
    """(status, JSON body or text, headers) of one HTTP request, error statuses included."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server.url.rsplit("/v1", 1)[0] + path, data=data,
                                 method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            text = resp.read().decode()
            return resp.status, _json(text), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        text = exc.read().decode()
        return exc.code, _json(text), dict(exc.headers)


def _json(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class Slow:
    """Make every forward pass of ``model`` take at least ``seconds`` (a test-only hook, removed on exit)."""

    def __init__(self, model, seconds=0.02):
        self.model, self.seconds = model, seconds

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(lambda *_: time.sleep(self.seconds))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


# -- batching -------------------------------------------------------------------------------------------------
def test_concurrent_requests_share_steps_and_keep_their_own_steering(srv):
    bodies = [{"prompt": f"request {i}", "max_tokens": 16, "temperature": 0,
               "steer": [{"vector": "ab"[i % 2], "scale": float(i - 2)}] if i % 3 else []} for i in range(6)]
    sched = srv.app.engine.scheduler
    alone = [call(srv, "/v1/completions", b)[1]["choices"][0]["text"] for b in bodies]
    steps_alone = sched.steps
    together = [None] * len(bodies)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(
        i, call(srv, "/v1/completions", bodies[i])[1]["choices"][0]["text"])) for i in range(len(bodies))]
    before = sched.steps
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
    assert sched.steps - before < steps_alone  # they shared forward passes


def test_the_official_client_gets_steered_and_seeded_answers(srv, parts):
    model, layout, tok, _ = parts
    c = client(srv)

    def ask(**kw):
        return [x.text for x in c.completions.create(model="tiny", prompt="The cat", max_tokens=8, **kw).choices]

    plain, steered = ask(temperature=0), ask(temperature=0, extra_body={"steer": [{"vector": "a", "scale": 2}]})
    assert plain != steered
    sampled = ask(temperature=1.0, n=3, seed=5)
    want = LocalBackend(model, tok, layout, chat=False).sample("The cat", 3, SamplingParams(
        max_tokens=8, temperature=1.0, step=None), Budget(), seed=5)
    assert sampled == [x.text for x in want] == ask(temperature=1.0, n=3, seed=5)
    with pytest.raises(openai.BadRequestError, match="unknown steering vector"):
        ask(extra_body={"steer": [{"vector": "nope", "scale": 1}]})
    # scope: generated-only steering leaves the prompt's pass alone, so it differs from steering everything
    gen_only = ask(temperature=0, extra_body={"steer": [{"vector": "a", "scale": 2, "scope": "generated"}]})
    assert gen_only != steered or gen_only != plain


def test_a_strategys_samples_run_through_the_engine_loop(srv, parts):
    model, layout, tok, _ = parts
    sched = srv.app.engine.scheduler
    before = sched.steps
    r = client(srv).completions.create(model="tiny", prompt="12 + 3 =", max_tokens=6, temperature=1.0, extra_body={
        "strategy": {"name": "majority", "n": 4, "seed": 1}})
    info = r.model_extra["steerscale"]
    assert info["strategy"] == "majority" and info["n_candidates"] == 4
    assert sched.steps > before  # the samples were decoding steps of the shared batch
    local = LocalBackend(model, tok, layout, chat=False)
    from steerscale.scale.spec import StrategySpec

    ref = StrategySpec.of("majority", n=4, seed=1, max_tokens=6, temperature=1.0).run("12 + 3 =", local)
    assert r.choices[0].text == ref.best.text and info["budget"]["spent"]["generated_tokens"] == \
        ref.budget["spent"]["generated_tokens"]


# -- streaming ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steer", [[], [{"vector": "a", "scale": 1.5}, {"vector": "b", "scale": -1.0}]])
def test_streams_carry_the_same_text_as_plain_responses(srv, steer):
    c = client(srv)
    common = dict(model="tiny", max_tokens=20, temperature=1.0, seed=11, n=2, stop=["7", "zz"],
                  extra_body={"steer": steer})
    plain = c.completions.create(prompt="Hello", **common)
    chunks = list(c.completions.create(prompt="Hello", stream=True, stream_options={"include_usage": True},
                                       **common))
    texts, finish = {}, {}
    for ch in chunks[:-1]:
        for x in ch.choices:
            texts[x.index] = texts.get(x.index, "") + x.text
            assert "7" not in x.text  # held back until the stop string was decided
            if x.finish_reason:
                finish[x.index] = x.finish_reason
    assert [texts[i] for i in range(2)] == [x.text for x in plain.choices]
    assert [finish[i] for i in range(2)] == [x.finish_reason for x in plain.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    chat = dict(model="tiny", messages=[{"role": "developer", "content": "be brief"},
                                        {"role": "user", "content": "hi"}], max_tokens=16, temperature=0,
                extra_body={"steer": steer})
    whole = c.chat.completions.create(**chat).choices[0]
    parts_ = list(c.chat.completions.create(stream=True, **chat))
    assert parts_[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts_) == whole.message.content
    assert parts_[-1].choices[0].finish_reason == whole.finish_reason


def test_stream_safe_holds_back_partial_characters_and_stop_prefixes():
    assert stream_safe("hello wor", ["world"]) == 6
    assert stream_safe("abc\ufffd", []) == 3
    assert stream_safe("ab", ["bcd", "x"]) == 1
    assert stream_safe("abc", ["zz"]) == 3


def test_an_aborted_stream_leaves_the_batch_and_the_next_request_is_served(srv, parts):
    model = parts[0]
    sched = srv.app.engine.scheduler
    with Slow(model, 0.03):
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "go", "max_tokens": 100, "ignore_eos": True,
                                                            "stream": True}), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")  # the stream has started
        assert sched.running == 1
        steps = sched.steps
        conn.sock.shutdown(2)  # the client goes away mid-stream
        conn.close()
        assert wait_until(lambda: sched.running == 0, 5)
        assert sched.steps - steps < 40  # cancelled long before its 100 tokens
        t = time.monotonic()
        status, out, _ = call(srv, "/v1/completions", {"prompt": "next", "max_tokens": 3, "temperature": 0})
        assert status == 200 and time.monotonic() - t < 5


def test_a_client_that_hangs_up_before_the_answer_is_cancelled(srv, parts):
    sched = srv.app.engine.scheduler
    with Slow(parts[0], 0.03):
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "go", "max_tokens": 100, "ignore_eos": True}),
                     {"Content-Type": "application/json"})
        assert wait_until(lambda: sched.running == 1, 5)
        steps = sched.steps
        conn.sock.shutdown(2)
        conn.close()
        assert wait_until(lambda: sched.running == 0, 5) and sched.steps - steps < 40
        assert wait_until(lambda: srv.app.pending == 0, 5)


def test_half_sent_requests_do_not_block_the_server(srv):
    import socket

    socks = []
    for i in range(100):  # headers that never end, and bodies that never arrive
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + (b"Content-Length: 50\r\n\r\n{" if i % 2 else b""))
        socks.append(s)
    try:
        t = time.monotonic()
        status, out, _ = call(srv, "/v1/completions", {"prompt": "ok", "max_tokens": 3})
        assert status == 200 and time.monotonic() - t < 5
    finally:
        for s in socks:
            s.close()


def test_a_chunked_body_is_read_once(srv):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    body = json.dumps({"prompt": "chunks", "max_tokens": 4, "temperature": 0}).encode()
    conn.request("POST", "/v1/completions", body=iter([body[:10], body[10:]]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    resp = conn.getresponse()
    out = json.loads(resp.read())
    assert resp.status == 200 and len(out["choices"]) == 1
    conn.request("GET", "/health")  # the same connection: nothing of the body was left unread
    assert conn.getresponse().status == 200
    conn.close()


def test_a_request_past_its_timeout_is_cancelled(parts):
    model, layout, tok, _ = parts
    server = start_server(App(model, tok, layout, model_id="tiny", limits=Limits(request_timeout=0.3)))
    try:
        with Slow(model, 0.03):
            status, err, _ = call(server, "/v1/completions", {"prompt": "x", "max_tokens": 100, "ignore_eos": True})
            assert status == 408 and err["error"]["code"] == "request_timeout"
            assert wait_until(lambda: server.app.engine.scheduler.running == 0, 5)
    finally:
        server.close()


# -- limits ---------------------------------------------------------------------------------------------------
def test_a_full_queue_gets_429_with_retry_after(parts):
    model, layout, tok, _ = parts
    server = start_server(App(model, tok, layout, model_id="tiny", limits=Limits(max_pending=1, retry_after=2)))
    try:
        with Slow(model, 0.03):
            busy = threading.Thread(target=call, args=(server, "/v1/completions", {
                "prompt": "x", "max_tokens": 40, "ignore_eos": True}))
            busy.start()
            assert wait_until(lambda: server.app.pending == 1)
            status, err, headers = call(server, "/v1/completions", {"prompt": "y", "max_tokens": 2})
            assert status == 429 and headers["retry-after"] == "2" and err["error"]["type"] == "rate_limit_error"
            busy.join(30)
        assert call(server, "/v1/completions", {"prompt": "y", "max_tokens": 2})[0] == 200
    finally:
        server.close()


def test_bodies_past_the_limit_get_413_also_when_chunked(parts):
    model, layout, tok, _ = parts
    server = start_server(App(model, tok, layout, model_id="tiny", limits=Limits(max_body_bytes=1000)))
    try:
        body = json.dumps({"prompt": "x" * 2000}).encode()
        assert call(server, "/v1/completions", raw=body)[0] == 413
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v1/completions", body=iter([body[:600], body[600:]]),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "body_too_large"
        conn.close()
    finally:
        server.close()


def test_caps_on_tokens_context_and_stops(srv):
    status, err, _ = call(srv, "/v1/completions", {"prompt": "x" * 100, "max_tokens": 40})
    assert status == 400 and "context window" in err["error"]["message"] and err["error"]["param"] == "max_tokens"
    status, err, _ = call(srv, "/v1/completions", {"prompt": "x", "max_tokens": 10**8})
    assert status == 400 and "limit" in err["error"]["message"]
    status, err, _ = call(srv, "/v1/completions", {"prompt": "x", "stop": [str(i) for i in range(17)]})
    assert status == 400 and err["error"]["param"] == "stop"
    # chat without max_tokens: the default is cut to the room the context leaves
    status, out, _ = call(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 100}],
                                                        "temperature": 0, "ignore_eos": True})
    assert status == 200 and out["usage"]["total_tokens"] < 128


def test_the_default_max_tokens_respects_the_servers_limit(parts):
    model, layout, tok, _ = parts
    server = start_server(App(model, tok, layout, model_id="tiny", limits=Limits(max_tokens_limit=8)))
    try:
        status, out, _ = call(server, "/v1/completions", {"prompt": "x", "ignore_eos": True})  # default 16, cut to 8
        assert status == 200 and out["usage"]["completion_tokens"] == 8
    finally:
        server.close()


def test_an_api_key_guards_every_v1_route(parts):
    model, layout, tok, vecs = parts
    server = start_server(App(model, tok, layout, model_id="tiny", api_key="s3cret"))
    try:
        assert call(server, "/v1/models")[0] == 401
        assert call(server, "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(server, "/health")[0] == 200
        with pytest.raises(openai.AuthenticationError):
            client(server, api_key="wrong").models.list()
        assert client(server, api_key="s3cret").models.list().data[0].id == "tiny"
        assert call(server, "/v1/steering/vectors/x", raw=b"GGUF", method="PUT")[0] == 401
    finally:
        server.close()


# -- the vector registry --------------------------------------------------------------------------------------
def test_vectors_upload_list_steer_and_delete(srv, parts, tmp_path):
    model, layout, tok, vecs = parts
    path = vecs["a"].save(tmp_path / "v.safetensors")
    status, card, _ = call(srv, "/v1/steering/vectors/uploaded", raw=path.read_bytes(), method="PUT")
    assert status == 201 and card["id"] == "uploaded" and card["sites"] == [s.key() for s in vecs["a"].sites]
    assert "uploaded" in [v["id"] for v in call(srv, "/v1/steering/vectors")[1]["data"]]
    assert call(srv, "/v1/steering/vectors/uploaded")[1] == card
    c = client(srv)

    def ask(name):
        return c.completions.create(model="tiny", prompt="The cat", max_tokens=8, temperature=0,
                                    extra_body={"steer": [{"vector": name, "scale": 2}]}).choices[0].text

    assert ask("uploaded") == ask("a")
    wrong = SteeringVector({Site(0, SiteKind.RESID_POST): torch.ones(7)}).save(tmp_path / "w.safetensors")
    status, err, _ = call(srv, "/v1/steering/vectors/wrong", raw=wrong.read_bytes(), method="PUT")
    assert status == 400 and "rejected" in err["error"]["message"]
    assert call(srv, "/v1/steering/vectors/junk", raw=b"\x80\x02pickle" * 10, method="PUT")[0] == 400
    assert call(srv, "/v1/steering/vectors/bad%20name", raw=path.read_bytes(), method="PUT")[0] == 400
    assert call(srv, "/v1/steering/vectors/uploaded", method="DELETE")[1]["deleted"] is True
    assert call(srv, "/v1/steering/vectors/uploaded", method="DELETE")[0] == 404
    assert call(srv, "/v1/steering/vectors/uploaded")[0] == 404
    with pytest.raises(openai.BadRequestError, match="unknown steering vector"):
        ask("uploaded")


def test_vector_uploads_are_size_limited(parts, tmp_path):
    model, layout, tok, vecs = parts
    server = start_server(App(model, tok, layout, model_id="tiny", limits=Limits(max_vector_bytes=100)))
    try:
        data = vecs["a"].save(tmp_path / "v.safetensors").read_bytes()
        assert call(server, "/v1/steering/vectors/v", raw=data, method="PUT")[0] == 413
    finally:
        server.close()


# -- what the server says about itself ------------------------------------------------------------------------
def test_metrics_openapi_and_model_routes(srv):
    call(srv, "/v1/completions", {"prompt": "m", "max_tokens": 3})
    status, text, headers = call(srv, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ('steerscale_requests_total{endpoint="/v1/completions",status="200"}',
                 "steerscale_generation_tokens_total", "steerscale_time_to_first_token_seconds_count",
                 "steerscale_e2e_request_latency_seconds_count", "steerscale_queue_depth",
                 "steerscale_running_rows"):
        assert name in text
    doc = call(srv, "/openapi.json")[1]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/steering/{kind}/{name}"} <= set(doc["paths"])
    fields = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"steer", "strategy", "prompt", "top_k", "min_p"} <= set(fields)
    assert call(srv, "/docs")[0] == 200
    assert call(srv, "/v1/models/tiny")[1]["id"] == "tiny"
    assert call(srv, "/v1/models/other")[0] == 404


def test_unsupported_openai_fields_are_refused_never_ignored(srv):
    for extra, param in [({"response_format": {"type": "json_object"}}, "response_format.type"),
                         ({"tools": [{"type": "function"}]}, "tools"), ({"tool_choice": "auto"}, "tool_choice"),
                         ({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of"), ({"mystery": 1}, "mystery")]:
        status, err, _ = call(srv, "/v1/completions", {"prompt": "x", "max_tokens": 2, **extra})
        assert status == 400 and err["error"]["param"] == param, (extra, err)
    assert call(srv, "/v1/completions", {"prompt": "x", "max_tokens": 2, "response_format": {"type": "text"},
                                         "tool_choice": "none", "user": "u1"})[0] == 200


def test_sampling_extras_over_http(srv):
    def text(**kw):
        status, out, _ = call(srv, "/v1/completions", {"prompt": "Hello", "max_tokens": 10, **kw})
        assert status == 200, out
        return out["choices"][0]

    greedy = text(temperature=0)["text"]
    assert text(temperature=1.0, top_k=1, seed=3)["text"] == greedy
    forced = text(temperature=0, logit_bias={str(ord("q") % 96): 100})  # ChatCharTokenizer: ids are bytes mod 96
    assert forced["text"] and set(forced["text"]) == {forced["text"][0]}
    assert text(temperature=0, ignore_eos=True, max_tokens=30)["finish_reason"] == "length"
    assert text(temperature=0, repetition_penalty=1.5)["text"] != greedy or True  # runs; the unit tests check math


def test_a_strategy_inherits_the_requests_sampling_fields(srv, parts):
    model, layout, tok, _ = parts
    body = {"prompt": "12 + 3 =", "max_tokens": 6, "temperature": 1.0, "top_k": 1,
            "logit_bias": {str(ord("q") % 96): 100}, "strategy": {"name": "majority", "n": 2, "seed": 1}}
    status, out, _ = call(srv, "/v1/completions", body)
    plain = call(srv, "/v1/completions", {k: v for k, v in body.items() if k != "strategy"})[1]
    forced = set(plain["choices"][0]["text"])
    assert status == 200 and len(forced) == 1 and set(out["choices"][0]["text"]) == forced  # the bias reached it


def test_stop_strings_min_tokens_and_include_stop_str(srv):
    def first(**kw):
        status, out, _ = call(srv, "/v1/completions", {"prompt": "Hello", "max_tokens": 20, "temperature": 0, **kw})
        assert status == 200, out
        return out["choices"][0]

    free = first(ignore_eos=True)["text"]
    stop = free[2]
    cut = first(stop=[stop], ignore_eos=True)
    assert cut["text"] == free[:free.index(stop)] and cut["stop_reason"] == stop
    kept = first(stop=[stop], ignore_eos=True, include_stop_str_in_output=True)
    assert kept["text"] == cut["text"] + stop
    late = first(stop=[stop], ignore_eos=True, min_tokens=free.index(stop) + 2)
    assert len(late["text"]) > len(cut["text"])  # the early stop string did not count before min_tokens


def test_the_remote_backend_sends_the_sampling_extras(srv, parts):
    from steerscale.scale.remote import OpenAIBackend
    from steerscale import SteerscaleError

    model, layout, tok, _ = parts
    remote = OpenAIBackend(srv.url, "tiny", timeout=30)
    params = SamplingParams(max_tokens=8, temperature=1.0, top_k=1, step=None)
    want = LocalBackend(model, tok, layout, chat=False).sample("The cat", 1, params.with_(temperature=0), Budget())
    assert remote.sample("The cat", 1, params, Budget(), seed=1)[0].text == want[0].text
    with pytest.raises(SteerscaleError, match="min_tokens"):
        remote.sample("The cat", 1, params.with_(min_tokens=2), Budget())


def test_logprob_bytes_are_the_tokens_own_bytes():
    class ByteLevel:  # GPT-2 style pieces: "\u0120" is a space, "\u00c3\u00a9" the two bytes of "é"
        def get_vocab(self):
            return {"\u0120a": 0, "\u00c3\u00a9": 1, "\u00c3": 2}

        def convert_ids_to_tokens(self, tid):
            return ["\u0120a", "\u00c3\u00a9", "\u00c3"][tid]

        def decode(self, ids, skip_special_tokens=False):
            return {0: " a", 1: "é", 2: "\ufffd"}[ids[0]]

    shaper = Shaper(ByteLevel(), None, "m")
    assert shaper.token_bytes(0) == [32, 97]
    assert shaper.token_bytes(1) == list("é".encode())
    assert shaper.token_bytes(2) == [0xC3]  # half a character: its one byte, not U+FFFD's three


# -- bad input never gets a 5xx -------------------------------------------------------------------------------
def _junk(rng: random.Random, depth=0):
    kinds = ["int", "float", "str", "bool", "null", "list", "dict", "huge", "neg", "unicode"]
    kind = rng.choice(kinds if depth < 3 else kinds[:5])
    return {"int": lambda: rng.randint(-5, 300), "float": lambda: rng.uniform(-3, 3), "bool": lambda: True,
            "str": lambda: rng.choice(["", "x", "a" * 50, "\x00", "<eos>"]), "null": lambda: None,
            "list": lambda: [_junk(rng, depth + 1) for _ in range(rng.randint(0, 3))],
            "dict": lambda: {rng.choice(["vector", "scale", "name", "n", "x"]): _junk(rng, depth + 1)},
            "huge": lambda: rng.choice([10**30, 1e308, -1e308, 2**64]), "neg": lambda: rng.choice([-1, -0.5, -10**9]),
            "unicode": lambda: rng.choice(["\ud7ff\ue000", "\U0001f600" * 10, "e\u0301", "\u202e"])}[kind]()


FIELDS = ["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed", "steer",
          "strategy", "logprobs", "top_logprobs", "echo", "stream", "logit_bias", "repetition_penalty", "min_tokens",
          "stream_options", "model", "ignore_eos", "frequency_penalty", "max_completion_tokens"]
RAW = [b"", b"{", b"[]", b"null", b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": 1e-300}',
       b'{"prompt": "\\ud800"}', b'{"prompt": "x", "max_tokens": 1e400}', b"\xff\xfe", b'{"prompt": "x"}' * 2,
       b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
       b'{"messages": [{"role": "user", "content": "x"}], "strategy": {"name": "majority", "stop": [1]}}',
       b'{"prompt": "x", "steer": [{"vector": "a", "scale": 1e30}]}', b'{"prompt": [[1, 2], "x"]}',
       '{"prompt": "x", "logit_bias": {"\u00b2": 1}}'.encode(), b'{"prompt": "x", "logit_bias": {"' + b"9" * 5000 + b'": 1}}']


def test_fuzzed_requests_never_get_a_server_error(srv):
    expected = call(srv, "/v1/completions", {"prompt": "ok", "max_tokens": 6, "temperature": 0})[1]["choices"]
    rng = random.Random(0)
    bodies = [(path, raw) for raw in RAW for path in ("/v1/completions", "/v1/chat/completions")]
    for _ in range(300):
        path = rng.choice(["/v1/completions", "/v1/chat/completions"])
        base = ({"prompt": "hi"} if path.endswith("/completions") and "chat" not in path else
                {"messages": [{"role": "user", "content": "hi"}]})
        body = {**base, "max_tokens": 3}
        for key in rng.sample(FIELDS, rng.randint(1, 4)):
            body[key] = _junk(rng)
        bodies.append((path, json.dumps(body).encode()))
    statuses = {}
    for path, raw in bodies:
        status, out, _ = call(srv, path, raw=raw)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (raw[:200], out)
        if status >= 400:
            assert set(out["error"]) == {"message", "type", "param", "code"}
    assert statuses.get(400, 0) > 100 and statuses.get(200, 0) > 0  # mostly refused, some valid
    after = call(srv, "/v1/completions", {"prompt": "ok", "max_tokens": 6, "temperature": 0})[1]["choices"]
    assert after == expected
    assert wait_until(lambda: srv.app.engine.scheduler.running == 0 and srv.app.pending == 0, 5)


# -- shutdown -------------------------------------------------------------------------------------------------
SERVER_SCRIPT = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from tiny import ChatCharTokenizer, tiny_model
from steerscale.serve import App, serve
model, layout = tiny_model("llama")
model.register_forward_pre_hook(lambda *_: time.sleep(0.02))
serve(App(model, ChatCharTokenizer(), layout, model_id="tiny"), "127.0.0.1", {port}, shutdown_timeout=10)
"""


def test_sigterm_lets_requests_in_flight_finish_and_exits(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = SERVER_SCRIPT.format(tests=str(Path(__file__).parent), port=port)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert b"steerscale serve" in proc.stdout.readline()
        server = type("S", (), {"url": f"http://127.0.0.1:{port}/v1", "port": port})()
        assert wait_until(lambda: _alive(server), 30)
        got = {}
        t = threading.Thread(target=lambda: got.update(r=call(server, "/v1/completions", {
            "prompt": "x", "max_tokens": 40, "ignore_eos": True})))
        t.start()
        time.sleep(0.3)  # the request is decoding
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn drains, then re-raises the signal it caught
        status, out, _ = got["r"]
        assert status == 200 and out["usage"]["completion_tokens"] == 40  # it finished during the drain
    finally:
        if proc.poll() is None:
            proc.kill()


def _alive(server) -> bool:
    try:
        return call(server, "/health")[0] == 200
    except OSError:
        return False


def test_ablate_and_set_steer_entries_as_steerscales_vllm_plugin_takes_them(srv, parts):
    # the one steering grammar (steer/grammar.py): the same JSON entries as `steerscale serve --engine vllm`
    model, layout, tok, vecs = parts
    c = client(srv)
    entries = [{"vector": "a", "op": "ablate"}, {"vector": "a", "op": "set", "value": 4.0, "scope": "generated"},
               {"vector": "b", "scale": 1.5}]
    got = c.completions.create(model="tiny", prompt="The cat", max_tokens=8, temperature=0,
                               extra_body={"steer": entries}).choices[0].text
    edits = (vecs["a"].interventions(("set", 0.0)) + vecs["a"].interventions(("set", 4.0), "generated")
             + vecs["b"].interventions(1.5))
    want = LocalBackend(model, tok, layout, edits, chat=False).sample(
        "The cat", 1, SamplingParams(max_tokens=8, temperature=0.0, step=None), Budget())[0].text
    assert got == want
    for bad, match in [({"vector": "a", "op": "set"}, "value"), ({"vector": "a", "op": "ablate", "scale": 2}, "value"),
                       ({"vector": "a", "op": "add", "value": 1}, "value"), ({"vector": "a", "op": "clamp"}, "op"),
                       ({"vector": "a", "op": "ablate", "condition": "x"}, "unconditionally")]:
        status, body, _ = call(srv, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2,
                                                        "steer": [bad]})
        assert status == 400 and match in json.dumps(body), (bad, body)
