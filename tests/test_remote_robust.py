"""``OpenAIBackend`` against servers that misbehave: retries with backoff (503, a reset connection, 429 with
Retry-After, a refused connection), immediate errors for a bad request, a read timeout that closes the connection
(seen by a stdlib server and by ``steerscale serve``, which stops generating), the candidates of an interrupted run
kept in ``RemoteError.partial`` (runs told apart by ``Budget.uid``, never by a recyclable ``id()``), and the served
model's chat template found without ``tokenizer=``. The faulty servers are stdlib ``http.server`` fakes on real
ports; attempts are counted on the server side."""

import gc
import json
import logging
import select
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch

from steerscale import SteerscaleError
from steerscale.scale import Budget, SamplingParams, run_strategy
from steerscale.scale import remote as remote_pkg
from steerscale.scale.remote import OpenAIBackend, RemoteError
from steerscale.scale.remote.client import backoff_delay, retry_after

PROMPT = "2 + 2 ="


def greedy(n_tokens=8, **kw):
    return SamplingParams(max_tokens=n_tokens, temperature=0, step=None, **kw)


def completion(body, text_of):
    """A vLLM-shaped completions answer: ``text_of(prompt, j)`` for choice j of each prompt (a text, or a text and
    the stop string that ended it), one token a char."""
    prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
    choices = []
    for p in prompts:
        for j in range(body.get("n", 1)):
            text, stop = (text_of(p, j), None) if isinstance(text_of(p, j), str) else text_of(p, j)
            choices.append({"index": len(choices), "text": text, "finish_reason": "stop", "stop_reason": stop,
                            "logprobs": {"tokens": list(text), "token_logprobs": [-0.5] * len(text),
                                         "text_offset": list(range(len(text)))}})
    used = sum(len(c["text"]) for c in choices)
    return {"choices": choices, "usage": {"prompt_tokens": 3 * len(prompts), "completion_tokens": used}}


class Fake(ThreadingHTTPServer):
    """A completions server that plays ``script`` (one action per POST, then ``then``): ``"ok"``, an HTTP status
    ``(code, headers)``, ``"reset"`` (RST without answering) or ``("slow", s)`` (waits up to s seconds, noting when
    the client hangs up). ``attempts`` counts POSTs; ``bodies`` keeps them; ``closed`` the hang-ups' delays."""

    daemon_threads = True

    def __init__(self, script=(), then="ok", text_of=lambda p, j: "ok"):
        super().__init__(("127.0.0.1", 0), Handler)
        self.script, self.then, self.text_of = list(script), then, text_of
        self.attempts, self.bodies, self.closed = 0, [], []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def next_action(self, body):
        with self.lock:
            self.attempts += 1
            self.bodies.append(body)
            return self.script.pop(0) if self.script else self.then

    def close(self):
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def finish(self):
        try:
            super().finish()
        except OSError:  # the connection was reset on purpose
            pass

    def answer(self, code, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(code)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.answer(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        action = self.server.next_action(body)
        if callable(action):
            action = action(body)
        if action == "ok":
            self.answer(200, completion(body, self.server.text_of))
        elif action == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
        elif action[0] == "slow":
            start = time.monotonic()
            while time.monotonic() - start < action[1]:
                if select.select([self.connection], [], [], 0.02)[0]:
                    try:
                        gone = self.connection.recv(1, socket.MSG_PEEK) == b""
                    except OSError:
                        gone = True
                    if gone:
                        self.server.closed.append(time.monotonic() - start)
                        self.close_connection = True
                        return
            self.answer(200, completion(body, self.server.text_of))
        else:
            code, headers = action
            self.answer(code, {"error": {"message": f"fake error {code}: max_tokens is too large", "type": "x"}},
                        headers)


@pytest.fixture
def fake():
    servers = []

    def make(*args, **kw):
        servers.append(Fake(*args, **kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def client(server, **kw):
    return OpenAIBackend(server.url, "fake", chat=False, **{"timeout": 10, "retries": 3, "backoff": 0.01, **kw})


# -- retries ----------------------------------------------------------------------------------------------------
def test_two_503s_then_an_answer_is_charged_once(fake):
    srv = fake([(503, {}), (503, {})])
    budget = Budget()
    out = client(srv).sample(PROMPT, 1, greedy(), budget)
    assert srv.attempts == 3 and out[0].text == "ok"
    spent = budget.spent()
    assert spent["generated_tokens"] == 2 and spent["prompt_tokens"] == 3  # the answer used, not the failures


def test_a_reset_connection_is_retried(fake):
    srv = fake(["reset"])
    budget = Budget()
    assert client(srv).sample(PROMPT, 1, greedy(), budget)[0].text == "ok"
    assert srv.attempts == 2 and budget.spent()["generated_tokens"] == 2


def test_429_honours_retry_after(fake):
    srv = fake([(429, {"Retry-After": "0"})])
    t = time.monotonic()
    out = client(srv, backoff=30.0).sample(PROMPT, 1, greedy(), Budget())  # backoff alone would wait >= 15 s
    assert out[0].text == "ok" and srv.attempts == 2 and time.monotonic() - t < 5


def test_a_bad_request_is_not_retried_and_names_the_servers_message(fake):
    srv = fake(then=(400, {}))
    budget = Budget()
    with pytest.raises(RemoteError) as exc:
        client(srv).sample(PROMPT, 1, greedy(), budget)
    assert srv.attempts == 1 and exc.value.status == 400 and exc.value.attempts == 1
    assert "HTTP 400" in str(exc.value) and "max_tokens is too large" in str(exc.value)
    assert budget.spent()["generated_tokens"] == 0


def test_retries_give_up_with_a_clear_error(fake, caplog):
    srv = fake(then=(503, {}))
    budget = Budget()
    with caplog.at_level(logging.WARNING, logger="steerscale.scale.remote"):
        with pytest.raises(RemoteError) as exc:
            client(srv, retries=2).sample(PROMPT, 1, greedy(), budget)
    assert srv.attempts == 3 and exc.value.status == 503 and exc.value.attempts == 3
    assert "after 3 attempts" in str(exc.value) and "fake error 503" in str(exc.value)
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2
    assert budget.spent()["generated_tokens"] == 0
    srv.script = []
    with pytest.raises(RemoteError):
        client(srv, retries=0).sample(PROMPT, 1, greedy(), Budget())
    assert srv.attempts == 4  # retries=0: one attempt


def test_a_refused_connection_is_retried_then_named():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there
    with pytest.raises(RemoteError) as exc:
        OpenAIBackend(f"http://127.0.0.1:{port}", "x", chat=False, retries=2, backoff=0.01).sample(
            PROMPT, 1, greedy(), Budget())
    assert exc.value.status is None and exc.value.attempts == 3
    assert "connection refused" in str(exc.value) and f"127.0.0.1:{port}" in str(exc.value)
    assert "steerscale serve" in exc.value.hint


def test_backoff_is_exponential_jittered_and_capped():
    for attempt, top in enumerate([0.5, 1.0, 2.0, 4.0]):
        waits = [backoff_delay(0.5, attempt) for _ in range(50)]
        assert all(top / 2 <= w <= top for w in waits) and len(set(waits)) > 1
    assert backoff_delay(0.5, 30) <= 30.0
    assert retry_after("0") == 0.0 and retry_after("2.5") == 2.5 and retry_after(None) is None
    assert retry_after("10000") == 60.0 and retry_after("soon") is None
    assert retry_after("Thu, 01 Jan 1970 00:00:00 GMT") == 0.0  # a date in the past: now
    with pytest.raises(SteerscaleError, match="retries"):
        OpenAIBackend("http://127.0.0.1:1/v1", "x", chat=False, retries=-1)
    with pytest.raises(SteerscaleError, match="backoff"):
        OpenAIBackend("http://127.0.0.1:1/v1", "x", chat=False, backoff=-1)


# -- timeouts ---------------------------------------------------------------------------------------------------
def test_a_read_timeout_closes_the_connection_and_is_not_retried(fake):
    srv = fake(then=("slow", 10.0))
    t = time.monotonic()
    with pytest.raises(RemoteError) as exc:
        client(srv, timeout=0.5).sample(PROMPT, 1, greedy(), Budget())
    assert time.monotonic() - t < 3
    assert exc.value.timed_out and exc.value.status is None and srv.attempts == 1
    assert "timed out after 0.5 s" in str(exc.value) and "abandoned" in str(exc.value)
    assert "timeout" in exc.value.hint
    deadline = time.monotonic() + 3
    while not srv.closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.closed and srv.closed[0] < 1.5  # the server saw the client hang up right at its timeout


def test_a_timed_out_request_stops_the_generation_on_steerscale_serve():
    from steerscale.serve import App, start_server
    from tiny import ChatCharTokenizer, tiny_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, layout = tiny_model("llama")
    server = start_server(App(model, ChatCharTokenizer(), layout, model_id="tiny"))
    hook = model.register_forward_pre_hook(lambda *_: time.sleep(0.1))
    try:
        sched = server.app.engine.scheduler
        remote = OpenAIBackend(server.url, "tiny", chat=False, timeout=0.6, retries=3, backoff=0.01)
        with pytest.raises(RemoteError, match="abandoned") as exc:
            remote.sample(PROMPT, 1, greedy(110, ignore_eos=True), Budget())  # 110 tokens: 11 s
        assert exc.value.timed_out and exc.value.attempts == 1
        deadline = time.monotonic() + 5
        while sched.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sched.running == 0 and sched.steps < 40  # cancelled long before its 110 tokens
    finally:
        hook.remove()
        server.close()
        torch.set_num_threads(threads)


# -- partial results ----------------------------------------------------------------------------------------------
def test_an_interrupted_run_keeps_its_finished_candidates(fake):
    srv = fake(["ok"], then=(500, {}), text_of=lambda p, j: f"so {j + 1}")
    budget = Budget()
    with pytest.raises(RemoteError) as exc:  # adaptive_sc samples in batches of 2: the second batch fails
        run_strategy("adaptive_sc", PROMPT, client(srv, retries=1), budget=budget, n=8, batch=2, max_tokens=8,
                     temperature=1.0, step=None)
    got = exc.value.partial
    assert [c.text for c in got] == ["so 1", "so 2"] and all(c.finished for c in got)
    assert exc.value.partial_prompts == [PROMPT, PROMPT] and srv.attempts == 3
    assert budget.spent()["generated_tokens"] == 8  # the first batch only
    remote = client(srv, retries=0)
    with pytest.raises(RemoteError) as other:  # another run (another budget) starts from nothing
        remote.sample(PROMPT, 2, greedy(), Budget())
    assert other.value.partial == []
    del other  # its traceback holds the budget
    gc.collect()
    assert remote._done == {}  # a run's record goes with its budget


def test_a_failed_step_keeps_the_rows_that_finished_in_answered_requests(fake):
    def text_of(prompt, j):
        if prompt == PROMPT:
            return "AB"[j], "\n"  # first step: two rows, "A\n" and "B\n" (the server leaves the stop out)
        return "done"

    def by_prompt(body):  # second step: the row ending "A\n" finishes, the request for "B\n" fails
        return "ok" if body["prompt"] == PROMPT or body["prompt"].endswith("A\n") else (500, {})

    srv = fake(then=by_prompt, text_of=text_of)
    remote, budget = client(srv, retries=0), Budget()
    params = SamplingParams(max_tokens=20, temperature=1.0, step="\n", max_step_tokens=10)
    branches = remote.start(PROMPT, 2, budget, seed=1)
    remote.extend(branches, params, budget)
    assert [r.text for r in branches.rows] == ["A\n", "B\n"]
    with pytest.raises(RemoteError) as exc:
        remote.extend(branches, params, budget)
    assert [(c.text, c.finish_reason) for c in exc.value.partial] == [("A\ndone", "eos")]
    assert branches.rows[1].text == "B\n" and not branches.rows[1].finished  # the failed row as it was
    assert budget.spent()["generated_tokens"] == 2 + 4  # "A", "B", then "done": the failed request costs nothing



def fail_next(srv):
    """The server's next answer is HTTP 500 (then "ok" again)."""
    srv.script = [(500, {})]


def test_two_live_budgets_never_share_a_run(fake):
    srv = fake(text_of=lambda p, j: p[-1])
    remote = client(srv, retries=0)
    a, b = Budget(), Budget()
    remote.sample("run a", 1, greedy(), a)  # the runs interleave on one backend
    remote.sample("run b", 2, greedy(), b)
    remote.sample("again a", 1, greedy(), a)
    assert set(remote._done) == {a.uid, b.uid}  # keyed by the budget's uid, never by its id()
    fail_next(srv)
    with pytest.raises(RemoteError) as in_a:
        remote.sample("more a", 1, greedy(), a)
    assert in_a.value.partial_prompts == ["run a", "again a"] and [c.text for c in in_a.value.partial] == ["a", "a"]
    fail_next(srv)
    with pytest.raises(RemoteError) as in_b:
        remote.sample("more b", 1, greedy(), b)
    assert in_b.value.partial_prompts == ["run b", "run b"] and [c.text for c in in_b.value.partial] == ["b", "b"]


def test_a_recycled_id_starts_a_new_run(fake, monkeypatch):
    """Budgets collected while their runs' records are still there (their clean-up not run yet), then a new budget
    at one of their addresses: the same id(), another uid, and the new run starts from nothing."""
    monkeypatch.setattr(remote_pkg.backend, "weakref", SimpleNamespace(finalize=lambda *a, **k: None))
    srv = fake(text_of=lambda p, j: "old")
    remote = client(srv, retries=0)
    olds = [Budget() for _ in range(16)]
    for b in olds:
        remote.sample("old run", 1, greedy(), b)
    old_uids = {id(b): b.uid for b in olds}
    del olds, b  # freed at once (nothing else holds them): CPython hands their memory to new objects of their size
    new, spare = Budget(), []
    while id(new) not in old_uids and len(spare) < 2000:
        spare.append(new)
        new = Budget()
    if id(new) not in old_uids:
        pytest.skip("the allocator reused none of the freed budgets' addresses")
    assert new.uid != old_uids[id(new)] and len(remote._done) == 16  # the old records outlived their budgets
    fail_next(srv)
    with pytest.raises(RemoteError) as exc:
        remote.sample("new run", 1, greedy(), new)
    assert exc.value.partial == [] and exc.value.partial_prompts == []


def test_every_name_the_package_exported_before_the_split_is_still_there():
    """``scale/remote.py`` became a package (client, readers, replay, backend); ``from steerscale.scale.remote
    import X`` keeps working for each public name the module had, and is the same object as in its new home."""
    homes = {"client": ["HINT", "MAX_BACKOFF", "MAX_RETRY_AFTER", "RemoteError", "backoff_delay", "base_url_of",
                        "http_json", "list_models", "rejected", "retry_after"],
             "readers": ["MISSING", "REASON_KEYS", "Loglikelihood", "Piece", "echo_continuation_logprob",
                         "echo_option_logprob", "echo_tokens", "first_top_logprobs", "read_choice"],
             "replay": ["Outcome", "advance", "first_stop", "plan_requests"],
             "backend": ["FALLBACK_TOP", "MAX_PARALLEL", "OpenAIBackend", "find_tokenizer"]}
    for module, names in homes.items():
        for name in names:
            assert getattr(remote_pkg, name) is getattr(getattr(remote_pkg, module), name), name
    assert remote_pkg.client.log is remote_pkg.backend.log and remote_pkg.client.log.name == "steerscale.scale.remote"

# -- the chat template -------------------------------------------------------------------------------------------
@pytest.fixture
def chat_model_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[UNK]")
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
    tok.save_pretrained(tmp_path / "chat-model")
    return str(tmp_path / "chat-model")


def test_the_served_models_chat_template_is_found_locally(fake, chat_model_dir, caplog):
    srv = fake()
    with caplog.at_level(logging.WARNING, logger="steerscale.scale.remote"):
        remote = OpenAIBackend(srv.url, chat_model_dir)  # the served model id is a local directory
    assert remote.found_tokenizer and remote.templated and not caplog.records
    remote.sample("hi", 1, greedy(), Budget())
    assert srv.bodies[-1]["prompt"] == "<|user|>hi\n<|assistant|>" and srv.bodies[-1]["add_special_tokens"] is False
    raw = OpenAIBackend(srv.url, chat_model_dir, chat=False)  # chat=False: raw, as before
    raw.sample("hi", 1, greedy(), Budget())
    assert raw.tokenizer is None and srv.bodies[-1]["prompt"] == "hi" and "add_special_tokens" not in srv.bodies[-1]


def test_raw_prompts_without_a_tokenizer_are_never_silent(fake, caplog):
    srv = fake()
    with caplog.at_level(logging.WARNING, logger="steerscale.scale.remote"):
        remote = OpenAIBackend(srv.url, "no-such-org/no-such-model")
        remote.sample("hi", 1, greedy(), Budget())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sent raw" in warnings[0] and "--backend-tokenizer" in warnings[0]
    assert srv.bodies[-1]["prompt"] == "hi" and not remote.templated
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="steerscale.scale.remote"):
        OpenAIBackend(srv.url, "no-such-org/no-such-model", chat=False)
        OpenAIBackend(srv.url, "no-such-org/no-such-model", chat="auto", tokenizer=SimpleNamespace(chat_template=None))
    assert not caplog.records  # raw on purpose, or a tokenizer given: nothing to warn about
    with pytest.raises(SteerscaleError, match="chat=True needs a tokenizer"):
        OpenAIBackend(srv.url, "no-such-org/no-such-model", chat=True)


# -- the CLI ------------------------------------------------------------------------------------------------------
def test_cli_backend_retries_and_tokenizer_auto(fake, chat_model_dir, capsys):
    from steerscale.cli import main

    srv = fake(then=(503, {}))
    common = ["solve", "-p", "hi", "--strategy", "greedy", "--max-tokens", "4", "--backend-url", srv.url]
    assert main([*common, "--backend-model", "fake", "--backend-retries", "1", "--no-chat"]) == 2
    err = capsys.readouterr().err
    assert srv.attempts == 2 and "HTTP 503" in err and "after 2 attempts" in err and "Traceback" not in err
    srv.then = "ok"
    assert main([*common, "--backend-model", chat_model_dir, "--json"]) == 0  # --backend-tokenizer auto
    assert srv.bodies[-1]["prompt"] == "<|user|>hi\n<|assistant|>"
    assert json.loads(capsys.readouterr().out)["text"] == "ok"
    assert main([*common, "--backend-retries", "-1"]) == 2
    assert "--backend-retries" in capsys.readouterr().err
