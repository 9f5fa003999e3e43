"""Multiple-choice evaluation scored on a server: ``OpenAIBackend.loglikelihood`` (echoed prompt log-probs, lm-eval's
way) against ``steerscale serve`` in-process on a tiny model gives the local packed scorer's log-likelihoods, token
counts and accuracies; what cannot work remotely fails with a clear ``SteerscaleError``."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from steerscale import SteerscaleError
from steerscale.measure.runs import evaluate, read_records
from steerscale.scale import Budget, LocalBackend
from steerscale.scale.remote import OpenAIBackend
from steerscale.scale.remote.readers import Loglikelihood, echo_continuation_logprob, echo_option_logprob
from steerscale.serve import ApiError, App, start_server
from tiny import ChatCharTokenizer, tiny_model

QUESTIONS = [
    ("What is 2 + 2?", ["4", "five", "22", "a large number"], 0),
    ("Which is a colour?", ["blue", "seven"], 0),
    ("Pick the animal.", ["table", "dog", "cloud"], 1),
    ("Question: the sky is\nAnswer:", ["green", "blue sky", "up"], 1),
    ("Ends in a space ", ["yes", "no"], 1),
]


class NoEchoApp(App):
    """A server that refuses echo (as llama.cpp's /v1/completions does)."""

    async def completions(self, body, request=None):
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        return await super().completions(body, request)


@pytest.fixture(scope="module")
def srv():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, layout = tiny_model("llama")
    tok = ChatCharTokenizer()
    server = start_server(App(model, tok, layout, model_id="tiny", max_n=16))
    bare = start_server(NoEchoApp(model, tok, layout, model_id="tiny", max_n=16))
    yield SimpleNamespace(url=server.url, bare_url=bare.url, model=model, layout=layout, tok=tok)
    for s in (server, bare):
        s.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mc(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "mc.jsonl"
    path.write_text("".join(json.dumps({"question": q, "choices": c, "gold": g}) + "\n" for q, c, g in QUESTIONS))
    return str(path)


def remote_of(srv, chat: bool, **kw):
    """A client that formats prompts as the local run does: the chat template (the same tokenizer) or raw text."""
    kw = {"timeout": 30, "max_n": 16, **kw}
    return OpenAIBackend(srv.url, "tiny", tokenizer=srv.tok if chat else None, chat=chat, **kw)


def scored(res):
    return {r["id"]: (r["output"], r["metrics"], r["score"], r["tokens"]) for r in res.records}


@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "raw"])
def test_remote_mc_scores_equal_local(srv, mc, tmp_path, chat):
    common = dict(chat=None if chat else False, outdir=tmp_path / "runs", progress=False)
    loc = evaluate((srv.model, srv.tok, srv.layout), mc, **common)
    rem = evaluate(None, mc, backend=remote_of(srv, chat), **common)
    assert rem.summary["n_ok"] == loc.summary["n_ok"] == len(QUESTIONS)
    want, got = scored(loc), scored(rem)
    assert set(got) == set(want)
    for key, (lo, lm, ls, lt) in want.items():
        ro, rm, rs, rt = got[key]
        assert ro["n_tokens"] == lo["n_tokens"] and ro["prompt_tokens"] == lo["prompt_tokens"]
        assert ro["logprobs"] == pytest.approx(lo["logprobs"], abs=1e-4)
        assert ro["mean_logprobs"] == pytest.approx(lo["mean_logprobs"], abs=1e-4)
        assert rm == lm and rs == ls and rt == lt  # acc, acc_norm, acc_per_char and token counts alike
    assert rem.summary["score"]["mean"] == loc.summary["score"]["mean"]
    assert rem.summary["metrics"] == loc.summary["metrics"]
    # a different backend is a different run, named by its server; a rerun is served from the cache
    assert rem.dir != loc.dir and rem.summary["config"]["backend"]["url"] == srv.url
    assert "backend" not in loc.summary["config"] and srv.url in rem.summary["backend"]
    again = evaluate(None, mc, backend=remote_of(srv, chat, retries=0), **common)
    assert again.dir == rem.dir and scored(again) == got


def test_loglikelihood_batches_charges_and_matches_local(srv, monkeypatch):
    local = LocalBackend(srv.model, srv.tok, srv.layout, chat=False)
    remote = remote_of(srv, False, max_n=2)
    sent = []
    real = OpenAIBackend._request
    monkeypatch.setattr(OpenAIBackend, "_request", lambda self, prompts, fields: sent.append(prompts) or
                        real(self, prompts, fields))
    pairs = [("The cat", " sat"), ("The cat", " ran away"), ("1 + 1 =", " 2"), ("ab", "c"), ("x\n", "yz")]
    budget = Budget()
    got = remote.loglikelihood(pairs, budget)
    assert [len(p) for p in sent] == [2, 2, 1]  # prompt arrays of max_n pairs
    assert budget.spent()["prompt_tokens"] == sum(len(c) + len(x) for c, x in pairs)  # usage charged
    for (c, x), g in zip(pairs, got):  # one token a character: the last len(x) tokens of a teacher-forced pass
        lps, _ = local.token_logprobs(srv.tok.encode(c + x))
        assert isinstance(g, Loglikelihood) and g.n_tokens == len(x) and g.n_context == len(c) and not g.straddles
        assert g.logprob == pytest.approx(sum(lps[-len(x):]), abs=1e-4)
    assert remote.loglikelihood([]) == []


def test_the_cli_scores_multiple_choice_on_a_server(srv, mc, tmp_path, capsys):
    from steerscale.cli import main

    root = srv.url.rsplit("/v1", 1)[0]
    rc = main(["eval", "--task", mc, "--no-chat", "--backend-url", root, "-o", str(tmp_path / "runs"), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["n_ok"] == len(QUESTIONS) and summary["config"]["backend"]["url"] == srv.url
    loc = evaluate((srv.model, srv.tok, srv.layout), mc, chat=False, outdir=tmp_path / "runs", progress=False)
    records = read_records(Path(summary["dir"]) / "examples.jsonl")
    assert [r["score"] for r in records] == [r["score"] for r in loc.records]
    for r, w in zip(records, loc.records):
        assert r["output"]["logprobs"] == pytest.approx(w["output"]["logprobs"], abs=1e-4)


def test_echo_continuation_reading():
    def echo(tokens, values, start=0, tops=None):
        offs = [start + sum(map(len, tokens[:i])) for i in range(len(tokens))]
        lp = {"tokens": tokens, "token_logprobs": values, "text_offset": offs}
        if tops is not None:
            lp["top_logprobs"] = tops
        return {"text": "".join(tokens), "logprobs": lp}

    # the tokens after the boundary; offsets counted from the prompt or from 0 alike
    for start in (0, 7):
        got = echo_continuation_logprob(echo(["Q", ":", " Par", "is"], [None, -1.0, -2.0, -0.5], start), " Paris")
        assert got == Loglikelihood(-2.5, 2, 2)
    # a token straddling the boundary (context "ab", continuation "cd", tokens "a" "bc" "d") is counted
    got = echo_continuation_logprob(echo(["a", "bc", "d"], [None, -1.0, -0.25]), "cd")
    assert got.logprob == -1.25 and got.n_tokens == 2 and got.n_context == 1 and got.straddles
    # greedy when every counted token is the top one
    tops = [None, {":": -1.0}, {" Par": -2.0}, {"is": -0.1}]
    assert echo_continuation_logprob(echo(["Q", ":", " Par", "is"], [None, -1.0, -2.0, -0.5], tops=tops),
                                     " Paris").greedy is False
    # not placeable: not an echo, a missing log-prob, token strings that do not spell the continuation
    assert echo_continuation_logprob({"text": "x", "logprobs": None}, "x") is None
    assert echo_continuation_logprob(echo(["Q", "x"], [None, None]), "x") is None
    assert echo_continuation_logprob(echo(["Q", "\ufffd", "\ufffd"], [None, -1.0, -1.0]) | {"text": "Q°"}, "°") is None
    assert echo_continuation_logprob(echo(["ab"], [None]), "b") is None  # nothing precedes the continuation
    # choice_logprobs' reader shares the echo parsing
    assert echo_option_logprob(echo(["Q", ":", " Yes"], [None, -1.0, -0.3]), " Yes") == -0.3


def test_what_cannot_be_scored_remotely_is_refused(srv, mc, tmp_path):
    gen = tmp_path / "sums.jsonl"
    gen.write_text(json.dumps({"question": "1+2=", "answer": "3"}) + "\n")
    remote = remote_of(srv, False)
    with pytest.raises(SteerscaleError, match="answers through a scaling strategy") as e:
        evaluate(None, str(gen), backend=remote, outdir=tmp_path, progress=False)  # plain generation
    assert "--strategy greedy" in str(e.value)
    with pytest.raises(SteerscaleError, match="cannot score log-likelihoods.*echo"):
        evaluate(None, mc, backend=OpenAIBackend(srv.bare_url, "tiny", chat=False, timeout=30, retries=0),
                 chat=False, outdir=tmp_path, progress=False)
    with pytest.raises(SteerscaleError, match="needs a server backend"):
        evaluate(None, mc, backend=LocalBackend(srv.model, srv.tok, srv.layout, chat=False), outdir=tmp_path)
    with pytest.raises(SteerscaleError, match="chat=True asks for a chat template"):
        evaluate(None, mc, backend=remote, chat=True, outdir=tmp_path)
    with pytest.raises(SteerscaleError, match="not into backend="):
        evaluate(None, mc, backend=remote, steer=["v.safetensors:2"], outdir=tmp_path)
    with pytest.raises(SteerscaleError, match="local model"):
        evaluate(None, mc, backend=remote, cost=True, outdir=tmp_path)
    with pytest.raises(SteerscaleError, match="non-empty continuation"):
        remote.loglikelihood([("context", "")])
