"""``steerscale serve`` (OpenAI-compatible server) and ``OpenAIBackend`` (its client as a scaling backend), tested
against each other and against ``LocalBackend`` on a tiny random llama: a real server on a real port."""

import json
import math
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from steerscale import Site, SiteKind, SteerscaleError
from steerscale.scale import Budget, LocalBackend, SamplingParams, get_verifier, run_strategy
from steerscale.scale.remote import OpenAIBackend
from steerscale.scale.remote.readers import MISSING, Piece
from steerscale.scale.remote.replay import advance, plan_requests
from steerscale.serve import ApiError, App, start_server
from steerscale.steer.vector import SteeringVector
from tiny import ChatCharTokenizer, tiny_model

PROMPT = "12 + 3 ="


class BareApp(App):
    """The same server answering like llama.cpp's /v1/completions: log-probs in the chat format, no stop_reason,
    no echo, one choice per prompt whatever n says."""

    def completion_choice(self, index, c, req):
        out = super().completion_choice(index, c, req)
        del out["stop_reason"]
        lp = out["logprobs"]
        if lp is not None:
            out["logprobs"] = {"content": [
                {"token": t, "logprob": v, "top_logprobs": [{"token": k, "logprob": x} for k, x in top.items()]}
                for t, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])]}
        return out

    async def completions(self, body, request=None):
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        return await super().completions(body.model_copy(update={"n": 1}), request)


def start(app):
    server = start_server(app)
    return server, server.url


@pytest.fixture(scope="module")
def srv():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: extra threads only spin against each other on a shared CPU
    model, layout = tiny_model("llama")
    tok = ChatCharTokenizer()
    site = Site(1, SiteKind.RESID_POST)
    vec = SteeringVector({site: torch.randn(layout.site_dim(site), generator=torch.Generator().manual_seed(1)) * 4})
    app = App(model, tok, layout, model_id="tiny", vectors={"rand": vec}, max_n=16)
    (server, url), (bare, bare_url) = start(app), start(BareApp(model, tok, layout, model_id="tiny", max_n=16))
    yield SimpleNamespace(url=url, bare_url=bare_url, app=app, model=model, layout=layout, tok=tok,
                          local=LocalBackend(model, tok, layout, chat=False, max_n=16))
    for s in (server, bare):
        s.close()
    torch.set_num_threads(threads)


@pytest.fixture
def remote(srv):
    return OpenAIBackend(srv.url, "tiny", timeout=30, max_n=16)


@pytest.fixture(params=["vllm-like", "llama.cpp-like"])
def any_remote(request, srv):
    """A client of a server that reports stop_reason and echoes, and of one that does neither."""
    return OpenAIBackend(srv.url if request.param == "vllm-like" else srv.bare_url, "tiny", timeout=30, max_n=16)


def call(srv, path, body=None, *, raw=None, method=None):
    """(status, JSON) of one HTTP request, error statuses included."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    root = srv.url.rsplit("/v1", 1)[0]
    req = urllib.request.Request(root + path, data=data, method=method or ("POST" if data else "GET"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def greedy(n_tokens, **kw):
    return SamplingParams(max_tokens=n_tokens, temperature=0, step=None, **kw)


def assert_error(status, body, want_status, param="any"):
    assert status == want_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"]
    if param != "any":
        assert body["error"]["param"] == param


# -- the server -----------------------------------------------------------------------------------------------
def test_models_and_health(srv):
    status, health = call(srv, "/health")
    assert status == 200 and health["status"] == "ok" and health["running_rows"] == 0
    status, out = call(srv, "/v1/models")
    assert status == 200 and [m["id"] for m in out["data"]] == ["tiny"]
    assert out["data"][0]["steerscale"]["vectors"] == ["rand"]


def test_completion_greedy_text_and_logprobs_match_local(srv):
    status, out = call(srv, "/v1/completions", {"model": "tiny", "prompt": "Hello wor", "max_tokens": 12,
                                                 "temperature": 0, "logprobs": 3})
    assert status == 200
    ref = srv.local.sample("Hello wor", 1, greedy(12), Budget())[0]
    ch = out["choices"][0]
    assert ch["index"] == 0 and ch["text"] == ref.text
    assert ch["finish_reason"] == ("stop" if ref.finish_reason == "eos" else "length") and ch["stop_reason"] is None
    lp = ch["logprobs"]
    assert lp["token_logprobs"] == pytest.approx(ref.logprobs, abs=1e-4)
    assert len(lp["tokens"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == ref.n_tokens
    for tok, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert 3 <= len(top) <= 4 and top[tok] == pytest.approx(value, abs=1e-4)
        assert max(top.values()) == pytest.approx(value, abs=1e-4)  # greedy picks the most likely token
    assert lp["text_offset"] == [len(ref.text[:i]) for i in range(ref.n_tokens)]  # one character per token
    assert out["usage"] == {"prompt_tokens": len("Hello wor"), "completion_tokens": ref.n_tokens,
                            "total_tokens": len("Hello wor") + ref.n_tokens}


def test_echo_returns_the_prompt_logprobs_of_a_forward_pass(srv):
    status, out = call(srv, "/v1/completions", {"prompt": "abc def", "max_tokens": 0, "echo": True, "logprobs": 1})
    assert status == 200
    ids = srv.tok.encode("abc def")
    with torch.no_grad():
        logp = torch.log_softmax(srv.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    ref = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    ch = out["choices"][0]
    assert ch["text"] == "abc def" and ch["logprobs"]["tokens"] == list("abc def")
    assert ch["logprobs"]["token_logprobs"][0] is None and ch["logprobs"]["top_logprobs"][0] is None
    assert ch["logprobs"]["token_logprobs"][1:] == pytest.approx(ref, abs=1e-4)
    assert out["usage"]["completion_tokens"] == 0 and out["usage"]["prompt_tokens"] == len(ids)
    _, out = call(srv, "/v1/completions", {"prompt": "abc", "echo": True, "max_tokens": 4, "temperature": 0})
    ref = srv.local.sample("abc", 1, greedy(4), Budget())[0]
    assert out["choices"][0]["text"] == "abc" + ref.text and out["choices"][0]["logprobs"] is None


def test_stop_strings_report_stop_reason(srv):
    free = srv.local.sample("xyz", 1, greedy(10), Budget())[0].text
    assert len(free) >= 6, free
    stop = free[3:5]
    status, out = call(srv, "/v1/completions", {"prompt": "xyz", "max_tokens": 10, "temperature": 0,
                                                 "stop": [stop, "never-zz"]})
    ch = out["choices"][0]
    assert status == 200 and ch["finish_reason"] == "stop" and ch["stop_reason"] == stop
    assert ch["text"] == free[: free.find(stop)]


def test_prompt_lists_n_and_seeds(srv):
    body = {"prompt": ["ab", "cd"], "n": 2, "temperature": 1.0, "seed": 7, "max_tokens": 6}
    (s1, a), (s2, b) = call(srv, "/v1/completions", body), call(srv, "/v1/completions", body)
    assert s1 == s2 == 200 and [c["index"] for c in a["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    ref = srv.local.sample("ab", 2, SamplingParams(max_tokens=6, temperature=1.0, step=None), Budget(), seed=7)
    assert [c["text"] for c in a["choices"][:2]] == [c.text for c in ref]


def test_chat_completion_uses_the_chat_template(srv):
    status, out = call(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                                                      "temperature": 0, "logprobs": True, "top_logprobs": 2})
    assert status == 200 and out["object"] == "chat.completion"
    ref = LocalBackend(srv.model, srv.tok, srv.layout).sample("hi", 1, greedy(8), Budget())[0]  # chat=None: template
    ch = out["choices"][0]
    assert ch["message"] == {"role": "assistant", "content": ref.text}
    content = ch["logprobs"]["content"]
    assert [c["logprob"] for c in content] == pytest.approx(ref.logprobs, abs=1e-4)
    assert all(len(c["top_logprobs"]) == 2 for c in content)


def hook_count(model) -> int:
    # transformers itself leaves dormant output-recording hooks once hidden states were asked for: count, not zero
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_per_request_steering_is_isolated(srv):
    plain = {"prompt": "steer me", "max_tokens": 10, "temperature": 0, "logprobs": 2}
    _, before = call(srv, "/v1/completions", plain)
    hooks = hook_count(srv.model)
    status, steered = call(srv, "/v1/completions", {**plain, "steer": [{"vector": "rand", "scale": 8.0}]})
    assert status == 200
    assert steered["choices"][0]["logprobs"]["token_logprobs"] != before["choices"][0]["logprobs"]["token_logprobs"]
    status, err = call(srv, "/v1/completions", {**plain, "steer": [{"vector": "nope", "scale": 1}]})
    assert_error(status, err, 400, "steer")
    assert "rand" in err["error"]["message"]
    # a steer this strong would overflow the activations: refused up front, naming the field
    for scale in (3e38, -1e308, 1e30):
        status, err = call(srv, "/v1/completions", {**plain, "temperature": 1.0, "steer": [{"vector": "rand",
                                                                                             "scale": scale}]})
        assert_error(status, err, 400, "steer.0.scale")
    assert hook_count(srv.model) == hooks  # no steering hook left behind
    _, after = call(srv, "/v1/completions", plain)
    assert json.dumps(after["choices"]) == json.dumps(before["choices"]) and after["usage"] == before["usage"]


def test_strategy_extension(srv):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0,
            "strategy": {"name": "best_of_n", "verifier": "self_eval", "n": 4, "budget": "tokens=200", "seed": 1}}
    status, out = call(srv, "/v1/completions", body)
    assert status == 200 and len(out["choices"]) == 1
    ext = out["steerscale"]
    assert ext["strategy"] == "best_of_n" and ext["n_candidates"] == 4 and isinstance(ext["failures"], list)
    assert ext["budget"]["limits"] == {"generated_tokens": 200.0} and ext["budget"]["spent"]["verifier_passes"] == 4
    assert out["usage"]["completion_tokens"] == ext["budget"]["spent"]["generated_tokens"]
    assert call(srv, "/v1/completions", body)[1]["choices"] == out["choices"]  # seeded
    status, chat = call(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}],
                                                       "max_tokens": 6, "strategy": {"name": "greedy"}})
    ref = LocalBackend(srv.model, srv.tok, srv.layout).sample(PROMPT, 1, greedy(6), Budget())[0]
    assert status == 200 and chat["choices"][0]["message"]["content"] == ref.text
    for bad, word in (({"name": "nope"}, "majority"), ({"name": "majority", "verifier": "nope"}, "self_eval"),
                      ({"name": "greedy", "n": 4}, "its knobs")):
        status, err = call(srv, "/v1/completions", {"prompt": PROMPT, "strategy": bad})
        assert_error(status, err, 400)
        assert word in err["error"]["message"]


def test_bad_requests_get_openai_errors(srv):
    assert_error(*call(srv, "/v1/completions", raw=b"{not json"), 400)
    assert_error(*call(srv, "/v1/completions", {"prompt": "x", "n": 17}), 400, "n")
    assert_error(*call(srv, "/v1/completions", raw=b'{"prompt": "x", "temperature": NaN}'), 400, "temperature")
    assert_error(*call(srv, "/v1/completions", {"prompt": "x", "max_tokens": "10"}), 400, "max_tokens")
    assert_error(*call(srv, "/v1/completions", {"prompt": "x", "stream": True, "echo": True}), 400, "stream")
    assert_error(*call(srv, "/v1/completions", {"prompt": [[]]}), 400, "prompt")
    assert_error(*call(srv, "/v1/completions", {"prompt": [-1, 2]}), 400, "prompt")
    assert_error(*call(srv, "/v1/completions", {"prompt": [10**6]}), 400, "prompt")
    status, err = call(srv, "/v1/completions", {"prompt": "x" * 200})
    assert_error(status, err, 400)
    assert "context window" in err["error"]["message"]
    status, err = call(srv, "/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert_error(status, err, 404, "model")
    assert_error(*call(srv, "/v2/nothing"), 404)
    assert_error(*call(srv, "/v1/models", {}), 405)
    assert_error(*call(srv, "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}), 400,
                 "messages.0.role")


# -- OpenAIBackend against the server -------------------------------------------------------------------------
def test_remote_sample_equals_local_sample(srv, remote):
    params = SamplingParams(max_tokens=8, temperature=1.0, step=None)
    b_remote, b_local = Budget(), Budget()
    r = remote.sample(PROMPT, 4, params, b_remote, seed=3)
    loc = srv.local.sample(PROMPT, 4, params, b_local, seed=3)
    assert [c.text for c in r] == [c.text for c in loc]
    assert [c.finish_reason for c in r] == [c.finish_reason for c in loc]
    assert [c.n_tokens for c in r] == [c.n_tokens for c in loc] and not any(c.token_ids for c in r)
    for a, b in zip(r, loc):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert b_remote.spent()["generated_tokens"] == b_local.spent()["generated_tokens"]
    assert b_remote.spent()["prompt_tokens"] == b_local.spent()["prompt_tokens"]


# greedy texts on this model: "Hello wor" -> "93,5*CT7b93,5*CT]|x6...", "abc" -> "hR7W)Y^Y^Y^YlchR'>_]..."
@pytest.mark.parametrize("name,prompt,knobs", [
    ("greedy", "Hello wor", {"stop": ["]|"]}),
    ("beam_search", "Hello wor", {"n": 4, "width": 2, "step": "b", "stop": ["]|"]}),  # steps, a stop string
    ("beam_search", "abc", {"n": 4, "width": 2, "step": "h"}),  # a delimiter with nothing before it
])
def test_remote_search_equals_local_search(srv, any_remote, name, prompt, knobs):
    def go(backend):
        return run_strategy(name, prompt, backend, None, Budget(), seed=0, max_tokens=20, max_step_tokens=6,
                            temperature=0, **knobs)

    r, loc = go(any_remote), go(srv.local)
    assert any_remote.reports_stop is (any_remote.base_url == srv.url)  # the bare server: steps cut client-side
    assert r.answer == loc.answer and r.best.text == loc.best.text and r.best.finish_reason == loc.best.finish_reason
    assert [c.text for c in r.candidates] == [c.text for c in loc.candidates]
    assert [c.steps for c in r.candidates] == [c.steps for c in loc.candidates]


# greedy texts: "1+2=" -> "H*j3,5*j3s%HHHHfs%...", "12 + 3 =" -> "HHHHHHHHHHHHHfb27b27b...". With step "H" and stop "HH"
# (the shape of "\n" steps and a "\n\n" stop, which this random model never writes), the stop's first "H" ends one
# step and its second starts the next (or the next request of a step whose "H" had nothing before it), so the
# server, which sees one request's text, never matches "HH" itself.
@pytest.mark.parametrize("prompt,steps", [("1+2=", ["H*j3,5", "*j3s%H", ""]), ("12 + 3 =", [""])])
def test_remote_stop_string_split_across_steps_matches_local(srv, any_remote, prompt, steps):
    def go(backend):
        return run_strategy("beam_search", prompt, backend, None, Budget(), seed=0, max_tokens=20, max_step_tokens=6,
                            temperature=0, n=2, width=2, step="H", stop=["HH"])

    loc, r = go(srv.local), go(any_remote)
    assert [c.steps for c in loc.candidates] == [steps] * 2 and loc.best.finish_reason == "stop"  # the case is real
    assert [c.text for c in r.candidates] == [c.text for c in loc.candidates]
    assert [c.steps for c in r.candidates] == [c.steps for c in loc.candidates]
    assert [c.finish_reason for c in r.candidates] == [c.finish_reason for c in loc.candidates]


KNOBS = {"best_of_n": {"n": 4}, "majority": {"n": 4}, "beam_search": {"n": 4, "width": 2},
         "particle_filter": {"n": 4}, "astar": {"n": 2, "max_expansions": 4}}


@pytest.mark.parametrize("name,verifier", [("best_of_n", "self_eval"), ("majority", None),
                                           ("particle_filter", "arith_prm"), ("astar", "arith_prm")])
def test_remote_strategies_complete_and_reproduce(srv, remote, name, verifier):
    def go():
        v = get_verifier(verifier, backend=remote) if verifier else None
        return run_strategy(name, PROMPT, remote, v, Budget(), seed=0, max_tokens=8, step=" ", max_step_tokens=4,
                            temperature=1.0, **KNOBS[name])

    r = go()
    assert r.candidates and r.best is not None and r.budget["spent"]["generated_tokens"] > 0
    assert all(c.n_tokens == len(c.logprobs) for c in r.candidates)
    if verifier == "self_eval":
        assert r.budget["spent"]["verifier_passes"] > 0 and all(c.score is not None for c in r.candidates)
    assert [c.text for c in go().candidates] == [c.text for c in r.candidates]  # equal seeds, equal results


def test_remote_sample_from_a_server_without_n(srv):
    bare = OpenAIBackend(srv.bare_url, "tiny")
    params = SamplingParams(max_tokens=8, temperature=1.0, step=None)
    b = Budget()
    rows = bare.sample(PROMPT, 4, params, b, seed=3)
    assert bare.multi_n is False and len({c.text for c in rows}) > 1
    assert all(c.n_tokens == len(c.logprobs) > 0 for c in rows)
    assert b.spent()["generated_tokens"] == sum(c.n_tokens for c in rows)
    assert [c.text for c in bare.sample(PROMPT, 4, params, Budget(), seed=3)] == [c.text for c in rows]


@pytest.mark.parametrize("name", ["majority", "particle_filter", "beam_search"])
def test_remote_search_stops_at_the_budget(any_remote, name):
    r = run_strategy(name, "abc", any_remote, None, Budget.of(tokens=20), seed=0, max_tokens=30, step=" ",
                     temperature=1.0, **KNOBS[name])
    spent = r.budget["spent"]["generated_tokens"]
    assert r.budget["exhausted"] and 20 <= spent <= 20 + 4  # at most one token per row over
    assert r.candidates


def test_remote_choice_logprobs_match_local(srv, remote):
    contexts, options = ["Is 2+2=4? ", "Sky green? "], ["Yes", "No"]
    b = Budget()
    got = remote.choice_logprobs(contexts, options, b)
    ref = srv.local.choice_logprobs(contexts, options, Budget())
    assert got == [pytest.approx(row, abs=1e-4) for row in ref]
    assert b.spent()["verifier_passes"] == 4 and b.spent()["verifier_tokens"] > 0
    bare = OpenAIBackend(srv.bare_url, "tiny")  # rejects echo: the first token's top-20 log-probs instead
    fallback = bare.choice_logprobs(contexts, options, Budget())
    assert bare.echo is False
    for row, exact in zip(fallback, ref):
        assert all(v == -math.inf or v == pytest.approx(e, abs=1e-4) for v, e in zip(row, exact))


def test_remote_errors_name_the_server(srv, remote):
    with pytest.raises(SteerscaleError, match="context window"):
        remote.sample("x" * 200, 1, greedy(2), Budget())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(SteerscaleError) as exc:
        OpenAIBackend(f"http://127.0.0.1:{port}", "tiny", timeout=5).sample("x", 1, greedy(2), Budget())
    assert f"127.0.0.1:{port}" in str(exc.value) and "steerscale serve" in exc.value.hint


# -- the client's decisions, on pieces shaped like real servers' answers ----------------------------------------
def piece(text, finish, reason=MISSING, n=None):
    n = len(text) if n is None else n
    return Piece(text, tuple([-1.0] * n), tuple(range(n)), finish, reason)


def test_advance_follows_local_step_rules():
    # a server that reports the matched stop: the delimiter is put back into the step
    assert advance("", piece("ab", "stop", " ", 3), stops=(), step=" ", room=9, left=9, cap=9).status == "step"
    assert advance("", piece("ab", "stop", " ", 3), stops=(), step=" ", room=9, left=9, cap=9).text == "ab "
    # ... unless only whitespace precedes it (LocalBackend's rule): the row goes on
    out = advance("", piece("", "stop", " ", 1), stops=(), step=" ", room=9, left=9, cap=9)
    assert (out.text, out.status) == (" ", "more")
    # a server that does not say (llama.cpp): the step is cut client-side, tokens past it dropped
    out = advance("", piece("ab cd", "length"), stops=(), step=" ", room=9, left=5, cap=9)
    assert (out.text, len(out.logprobs), out.status) == ("ab ", 3, "step")
    # limits: room before the step-token limit before the budget share; EOS and stop strings before all
    assert advance("", piece("abcdef", "length", None), stops=(), step=None, room=4, left=4, cap=2).status == "more"
    out = advance("", piece("abcdef", "length", None), stops=(), step=None, room=4, left=4, cap=9)
    assert (out.text, out.status) == ("abcd", "length")
    assert advance("", piece("ab", "stop", None, 3), stops=(), step=None, room=3, left=3, cap=3).status == "eos"
    out = advance("", piece("ab", "stop", "\n", 3), stops=("\n",), step=" ", room=3, left=3, cap=3)
    assert (out.text, out.status) == ("ab", "stop")


def test_advance_finds_a_stop_string_split_across_steps():
    # "\n" ended the last step (the delimiter); this step's first "\n" completes the stop "\n\n": the server, which
    # saw only the new "\n", reports the delimiter, but the row stops as LocalBackend's find_stop decides
    out = advance("", piece("", "stop", "\n", 1), stops=("\n\n",), step="\n", room=9, left=9, cap=9, prev="ab\n")
    assert (out.text, len(out.logprobs), out.status, out.drop) == ("", 1, "stop", 0)
    # split across two requests of one step: the part already in this call's text is dropped, as locally
    out = advance("\n", piece("", "stop", "\n", 1), stops=("\n\n",), step="\n", room=9, left=9, cap=9, prev="")
    assert (out.text, out.status, out.drop) == ("", "stop", 1)
    # cut at the token that completes the stop, not at the end of the piece (offsets known)
    out = advance("", piece("\nxy", "length", None), stops=("\n\n",), step=None, room=9, left=9, cap=9, prev="a\n")
    assert (out.text, len(out.logprobs), out.status) == ("", 1, "stop")
    # no stop string: unchanged
    out = advance("", piece("xy", "length", None), stops=("\n\n",), step=None, room=9, left=9, cap=9, prev="a\n")
    assert (out.text, out.status, out.drop) == ("xy", "length", 0)


def test_plan_requests_dedupes_greedy_rows_and_seeds_each_prompt_apart():
    assert plan_requests(["a", "b", "a"], greedy=True, seeded=True) == [(["a", "b"], 1, [[0, 2], [1]])]
    assert plan_requests(["a", "a", "a"], greedy=False, seeded=True) == [(["a"], 3, [[0], [1], [2]])]
    assert plan_requests(["a", "b", "a"], greedy=False, seeded=True) == [(["a"], 2, [[0], [2]]), (["b"], 1, [[1]])]
    assert plan_requests(["a", "b", "a"], greedy=False, seeded=False) == [(["a", "b", "a"], 1, [[0], [1], [2]])]


# -- CLI ------------------------------------------------------------------------------------------------------
def test_serve_help_has_a_working_example(capsys):
    from steerscale.cli import main
    from steerscale.commands.serve_cmd import EPILOG
    from steerscale.serve.schema import ChatRequest, CompletionRequest, parse_chat, parse_completion, read_body

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "curl" in out and "/v1/completions" in out and "--vector NAME=PATH" in out
    bodies = [json.loads(b) for b in re.findall(r"-d '(.*?)'", EPILOG, flags=re.S)]
    assert len(bodies) == 2
    parse_completion(read_body(CompletionRequest, json.dumps(bodies[0]).encode()), max_n=64,
                     vectors={"formal": None})
    parse_chat(read_body(ChatRequest, json.dumps(bodies[1]).encode()), max_n=64, vectors={})


def test_solve_runs_against_a_server(srv, capsys):
    from steerscale.cli import main

    rc = main(["solve", "-p", PROMPT, "--strategy", "greedy", "--max-tokens", "6", "--backend-url",
               srv.url.rsplit("/v1", 1)[0], "--json"])
    out = json.loads(capsys.readouterr().out)
    ref = srv.local.sample(PROMPT, 1, greedy(6), Budget())[0]
    assert rc == 0 and out["model"] == "tiny" and out["text"] == ref.text


# -- eval --strategy against the server ------------------------------------------------------------------------
@pytest.fixture
def sums(tmp_path):
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in [(PROMPT, "15"), ("1+2=", "3")]))
    return str(path)


def outputs(res):
    return [(r["id"], r["output"]["text"], r["output"]["strategy_answer"], r["score"], r["tokens"]["generated"],
             r["tokens"]["prompt"]) for r in sorted(res.records, key=lambda r: r["id"])]


@pytest.mark.parametrize("strategy,knobs", [("greedy", {}), ("majority", {"n": 3, "temperature": 1.0}),
                                            ("best_of_n", {"n": 3, "temperature": 1.0, "verifier": "self_eval"})])
def test_eval_strategy_on_a_server_matches_local(srv, remote, sums, tmp_path, monkeypatch, strategy, knobs):
    from steerscale.measure.runs import evaluate

    common = dict(strategy=strategy, max_new_tokens=8, chat=False, outdir=tmp_path / "runs", progress=False, **knobs)
    loc = evaluate((srv.model, srv.tok, srv.layout), sums, **common)
    rem = evaluate(None, sums, backend=remote, **common)
    assert rem.summary["n_ok"] == 2 and outputs(rem) == outputs(loc)  # the server's answers are the local ones
    assert rem.dir != loc.dir and rem.summary["config_hash"] != loc.summary["config_hash"]
    assert rem.summary["config"]["backend"]["url"] == srv.url and rem.summary["config"]["backend"]["model"] == "tiny"
    assert loc.summary["config"]["backend"] == {"type": "local"} and loc.summary["backend"] == "local"
    assert srv.url in rem.summary["backend"] and srv.url in rem.summary["config"]["model"]
    # a rerun is served from the run's cache: not one request reaches the server
    monkeypatch.setattr(OpenAIBackend, "completions", lambda *a, **k: pytest.fail("a cached run sent a request"))
    again = evaluate(None, sums, backend=remote, **common)
    assert again.dir == rem.dir and outputs(again) == outputs(rem)


def test_eval_backend_refuses_what_needs_the_local_model(srv, remote, sums, tmp_path):
    from steerscale.measure.runs import evaluate

    with pytest.raises(SteerscaleError, match="not into backend="):
        evaluate(None, sums, strategy="greedy", backend=remote, steer=["v.safetensors:2"], outdir=tmp_path)
    with pytest.raises(SteerscaleError, match="answers through a scaling strategy"):
        evaluate(None, sums, backend=remote, outdir=tmp_path)
    with pytest.raises(SteerscaleError, match="local model"):
        evaluate(None, sums, strategy="greedy", backend=remote, cost=True, outdir=tmp_path)
    with pytest.raises(SteerscaleError, match="needs a model"):
        evaluate(None, sums, strategy="greedy", outdir=tmp_path)


def test_eval_cli_runs_a_strategy_against_a_server(srv, sums, tmp_path, capsys):
    from steerscale.cli import main
    from steerscale.measure.runs import evaluate, read_records

    root = srv.url.rsplit("/v1", 1)[0]
    rc = main(["eval", "--task", sums, "--strategy", "greedy", "--max-new-tokens", "8", "--no-chat", "--backend-url",
               root, "-o", str(tmp_path / "runs"), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["n_ok"] == 2 and summary["config"]["backend"]["url"] == srv.url
    loc = evaluate((srv.model, srv.tok, srv.layout), sums, strategy="greedy", max_new_tokens=8, chat=False,
                   outdir=tmp_path / "runs", progress=False)
    remote_records = read_records(Path(summary["dir"]) / "examples.jsonl")
    assert [(r["id"], r["output"]["text"]) for r in remote_records] == [(r["id"], r["output"]["text"]) for r in loc.records]
    assert main(["eval", "--task", sums, "--strategy", "greedy", "--max-new-tokens", "8", "--no-chat",
                 "--backend-url", root, "-o", str(tmp_path / "runs")]) == 0
    assert f"backend: openai tiny @ {srv.url}" in capsys.readouterr().out


def test_eval_cli_steer_with_a_backend_url_fails_like_solve(srv, sums, tmp_path, capsys):
    from steerscale.cli import main

    root = srv.url.rsplit("/v1", 1)[0]
    common = ["--steer", str(tmp_path / "v.safetensors:2"), "--backend-url", root]
    assert main(["eval", "--task", sums, "--strategy", "greedy", "-o", str(tmp_path), *common]) == 2
    eval_err = capsys.readouterr().err
    assert main(["solve", "-p", PROMPT, "--strategy", "greedy", *common]) == 2
    solve_err = capsys.readouterr().err
    assert eval_err == solve_err and "not through --backend-url" in eval_err and "hint:" in eval_err
    assert "Traceback" not in eval_err
    assert main(["eval", "--task", sums, "--backend-url", root, "-o", str(tmp_path)]) == 2  # no --strategy
    assert "add --strategy greedy" in capsys.readouterr().err


def test_a_request_cannot_make_the_server_open_a_file(srv, tmp_path):
    # judges' meta probes and program stages (handbook, router) name files: fine locally, never from a client
    secret = tmp_path / "program.json"
    secret.write_text('{"stages": [{"type": "generate"}]}')
    for strategy in ({"name": "best_of_n", "verifier": "genjudge", "verifier_opts": {"meta_probe": str(secret)}},
                     {"name": "program", "program": str(secret)},
                     {"name": "program", "program": '{"stages": [{"type": "handbook", "path": "/etc/hostname"}]}'}):
        status, err = call(srv, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "strategy": strategy})
        assert_error(status, err, 400, "strategy")
        assert "file on the server" in err["error"]["message"] or "never a file" in err["error"]["message"]
