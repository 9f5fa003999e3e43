"""Provenance-aware decoding (issue 27, item 5): the span index, the post-hoc check (TraceShield) and the decoding-time
veto (Prov-Decode) in every engine: ``generate``, ``LocalBackend`` (every strategy), the server's scheduler, and over
HTTP with the official client. An index whose spans never occur changes nothing; a corpus made of what the model
generates stops it from generating that again."""

import pytest
import torch

import steerscale.engine.provenance as provenance
from steerscale import SteerscaleError
from steerscale.engine.generation import generate
from steerscale.engine.provenance import SpanIndex
from steerscale.scale import Budget, LocalBackend, SamplingParams
from steerscale.serve import App, start_server
from steerscale.serve.scheduler import Job, Scheduler
from tiny import CharTokenizer, ChatCharTokenizer, tiny_model

K = 4
PROMPT = "Once upon a time"


def test_the_index_finds_spans_and_what_would_complete_one():
    index = SpanIndex.from_token_ids({"a": [1, 2, 3, 4, 5, 6], "b": [9, 8, 7, 6]}, k=3)
    assert index.banned([7, 1, 2]) == {3} and index.banned([9, 8]) == {7} and index.banned([2]) == set()
    assert index.spans([0, 1, 2, 3, 4, 0, 9, 8, 7]) == [{"start": 1, "end": 5, "document": "a"},
                                                        {"start": 6, "end": 9, "document": "b"}]
    assert index.flagged([5, 9, 8, 7]) and not index.flagged([1, 2, 4, 5])
    assert index.describe() == {"documents": 2, "tokens": 10, "k": 3, "prefixes": 6}


def test_bad_corpora_are_refused_clearly(tmp_path, monkeypatch):
    with pytest.raises(SteerscaleError, match="k must be an integer >= 2"):
        SpanIndex.from_token_ids({"a": [1, 2, 3]}, k=1)
    with pytest.raises(SteerscaleError, match="corpus is empty"):
        SpanIndex.from_token_ids({"a": []}, k=3)
    with pytest.raises(SteerscaleError, match="does not exist"):
        SpanIndex.from_dir(tmp_path / "nowhere", CharTokenizer())
    (tmp_path / "blank.txt").write_text("   \n")
    (tmp_path / "data.bin").write_bytes(b"\x00\x01")
    with pytest.raises(SteerscaleError, match="no text files with text"):
        SpanIndex.from_dir(tmp_path, CharTokenizer())
    monkeypatch.setattr(provenance, "MAX_TOKENS", 10)
    with pytest.raises(SteerscaleError, match="more than 10 tokens"):
        SpanIndex.from_token_ids({"a": list(range(11))}, k=3)


def _new_span(corpus, prompt_ids, ids) -> bool:
    """Whether a corpus span ends in the generated tokens (a prompt that quotes the corpus is not the model's doing)."""
    return any(s["end"] > len(prompt_ids) for s in corpus.spans(list(prompt_ids) + list(ids)))


def _greedy(model, tok, layout, block=None, tokens=24):
    return generate(model, tok, layout, [PROMPT], max_new_tokens=tokens, chat=False, block=block)[0]


@pytest.fixture(scope="module")
def tiny():
    model, layout = tiny_model("llama")
    tok = CharTokenizer()
    plain = _greedy(model, tok, layout)
    # the "flagged document": what the model says, prompt included
    corpus = SpanIndex.from_token_ids({"doc": tok.encode(PROMPT) + plain.token_ids}, k=K)
    return model, tok, layout, plain, corpus


def test_no_engine_generates_a_corpus_span(tiny):
    model, tok, layout, plain, corpus = tiny
    prompt_ids = tok.encode(PROMPT)
    assert _new_span(corpus, prompt_ids, plain.token_ids)  # without the veto: the span is there
    params = SamplingParams(max_tokens=24, temperature=0.0, step=None)
    outputs = {"generate": _greedy(model, tok, layout, corpus).token_ids,
               "LocalBackend": LocalBackend(model, tok, layout, chat=False, block=corpus).sample(
                   PROMPT, 1, params, Budget())[0].token_ids}
    loop = Scheduler(model, tok, layout)
    future = loop.submit(Job(prompt_ids, params.with_(block=corpus)))
    while not future.done():
        loop.step()
    loop.stop()
    outputs["scheduler"] = future.result()[0].token_ids
    for engine, ids in outputs.items():
        ids = [t for t in ids if t != tok.eos_token_id]
        assert ids and not _new_span(corpus, prompt_ids, ids), engine
    assert outputs["generate"] == [t for t in outputs["LocalBackend"] if t != tok.eos_token_id]


def test_an_index_of_spans_that_never_occur_changes_nothing(tiny):
    model, tok, layout, plain, _ = tiny
    unrelated = SpanIndex.from_token_ids({"other": [90, 91, 92, 93, 94, 95]}, k=K)
    assert _greedy(model, tok, layout, unrelated).token_ids == plain.token_ids


def test_the_server_blocks_per_request(tiny):
    openai = pytest.importorskip("openai")
    model, _, layout, _, _ = tiny
    tok = ChatCharTokenizer()
    plain_app = App(model, tok, layout, model_id="tiny", max_n=4)
    server = start_server(plain_app)
    try:
        c = openai.OpenAI(base_url=server.url, api_key="none", timeout=60, max_retries=0)
        said = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
        with pytest.raises(openai.BadRequestError, match="no corpus to block"):
            c.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, extra_body={"block_corpus": True})
    finally:
        server.close()
    corpus = SpanIndex.from_token_ids({"doc": tok.encode(PROMPT + said)}, k=K)
    server = start_server(App(model, tok, layout, model_id="tiny", max_n=4, block_corpus=corpus))
    try:
        c = openai.OpenAI(base_url=server.url, api_key="none", timeout=60, max_retries=0)
        blocked = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
        opted_out = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0,
                                         extra_body={"block_corpus": False}).choices[0].text
        strategy = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, extra_body={
            "strategy": {"name": "best_of_n", "n": 2, "temperature": 0.8, "seed": 1}}).choices[0].text
    finally:
        server.close()
    assert opted_out == said and blocked != said
    for text in (blocked, strategy):
        assert not _new_span(corpus, tok.encode(PROMPT), tok.encode(text))


def test_smollm2_does_not_repeat_a_flagged_text():
    # SmolLM2-135M recites little verbatim (the MIT licence's first lines come out paraphrased), so the flagged
    # document is the model's own greedy answer: with the veto, no 8-token span of it comes back
    from steerscale.models.loading import load_model

    lm = load_model("smollm2-135m-instruct", dtype="float32")
    prompt, kw = "Write two sentences about the history of Rome.", dict(max_new_tokens=32)
    free = generate(lm.model, lm.tokenizer, lm.layout, [prompt], **kw)[0]
    corpus = SpanIndex.from_texts(lm.tokenizer, {"flagged": free.text}, k=8)
    blocked = generate(lm.model, lm.tokenizer, lm.layout, [prompt], block=corpus, **kw)[0]
    assert corpus.spans(free.token_ids)  # the flagged text is what the model says ...
    assert len(blocked.token_ids) >= 16 and not corpus.spans(blocked.token_ids)  # ... and not with the veto
