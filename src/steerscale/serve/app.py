"""``steerscale serve``'s application: the FastAPI routes, the server's state, and the order of work per request.
See docs/serving.md.

A request's body is read here (size-capped, time-capped), parsed into a pydantic model and a checked
``GenRequest`` in ``serve/schema.py``, run on the model in ``serve/engine.py`` (one engine loop owns the model
and batches concurrent requests, ``serve/scheduler.py``) and shaped into OpenAI's response objects, or a stream of
them, in ``serve/responses.py``. Every error a client can cause is a 4xx in OpenAI's error shape; a 5xx means a
bug (logged, no traceback to the client).

Admission: at most ``Limits.max_pending`` generation requests are in flight (queued or running); the next gets a
429 with ``Retry-After``. A request that runs past ``Limits.request_timeout`` or whose client disconnects is
cancelled, and its rows leave the batch at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.token_gates import TokenGate
from ..errors import SteerscaleError
from ..measure.cost import neutral_prompts
from ..steer.conditional import Condition
from ..steer.controller import SteeringController
from ..steer.gating import FittedTokenGate
from ..steer.sae import SAE, ClampableSAE
from ..steer.vector import SteeringVector
from ..version import __version__
from .engine import Engine, SharedTokenizer
from .metrics import Metrics
from .responses import Shaper, StreamShaper, sse, stream_safe, to_json
from .schema import VECTOR_NAME, ApiError, ChatRequest, CompletionRequest, GenRequest, ProgramMemory, bad, \
    parse_chat, parse_completion, read_body
from .studio import studio_router

log = logging.getLogger("steerscale.serve")

__all__ = ["ApiError", "App", "Limits"]


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; checked at construction."""

    max_pending: int = 64  # generation requests in flight (queued or running); past it: 429
    max_body_bytes: int = 4 * 2**20  # a request body (JSON); past it: 413
    max_vector_bytes: int = 64 * 2**20  # an uploaded vector file
    max_tokens_limit: int = 4096  # max_tokens a request may ask for
    request_timeout: float = 600.0  # seconds from arrival to the last token; past it the request is cancelled
    body_timeout: float = 30.0  # seconds to receive a request body
    retry_after: int = 1  # seconds, the 429's Retry-After

    def __post_init__(self):
        for name in ("max_pending", "max_body_bytes", "max_vector_bytes", "max_tokens_limit", "retry_after"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SteerscaleError(f"server limit {name} must be a positive integer, got {value!r}")
        for name in ("request_timeout", "body_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise SteerscaleError(f"server limit {name} must be a positive number of seconds, got {value!r}")


class App:
    """The server's state: one model and its engine loop (``Engine``), its registered steering vectors, limits,
    metrics, and the FastAPI application (``.api``) that routes to the endpoint methods below."""

    def __init__(self, model, tokenizer, layout, *, model_id: str, vectors: dict | None = None, max_n: int = 64,
                 max_batch: int = 16, limits: Limits | None = None, api_key: str | None = None,
                 conditions: dict | None = None, controllers: dict | None = None, block_corpus=None,
                 saes: dict | None = None, memories: dict | None = None, gates: dict | None = None):
        if not isinstance(max_n, int) or max_n < 1:
            raise SteerscaleError(f"max_n must be a positive integer, got {max_n!r}")
        if not isinstance(model_id, str) or not model_id:
            raise SteerscaleError("the served model needs a non-empty id")
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise SteerscaleError("the API key is empty", "pass a non-empty --api-key, or none for an open server")
        self.layout, self.limits, self.api_key = layout, limits or Limits(), api_key
        # the steering registries (GET/PUT/DELETE /v1/steering/KIND[/NAME]); requests name their entries
        self.vectors, self.conditions, self.controllers, self.saes, self.memories = {}, {}, {}, {}, {}
        self.gates = {}
        self.shelves = {"vectors": self.vectors, "conditions": self.conditions, "controllers": self.controllers,
                        "gates": self.gates, "saes": self.saes, "memories": self.memories}
        for kind, given in (("vectors", vectors), ("conditions", conditions), ("controllers", controllers),
                            ("gates", gates), ("memories", memories)):
            for name, obj in (given or {}).items():
                self.add_artifact(kind, name, obj)  # one made for another model fails here, not in a request
        for name, sae in (saes or {}).items():  # its clamp's token cap is measured once, on the shipped neutral texts
            if isinstance(sae, SAE):
                sae = ClampableSAE.measure(sae, model, tokenizer, layout, neutral_prompts(), name=name)
            self.add_artifact("saes", name, sae)
        tokenizer = SharedTokenizer(tokenizer)  # used by request threads and the engine thread
        self.tokenizer, self.model_id, self.max_n = tokenizer, model_id, max_n
        self.corpus = block_corpus  # an engine.provenance.SpanIndex: provenance-aware decoding (None: off)
        self.engine = Engine(model, tokenizer, layout, self.vectors, max_n, max_batch,
                             max_tokens_limit=self.limits.max_tokens_limit)
        self.shaper = Shaper(tokenizer, self.engine.tokens.decode, model_id)
        self.metrics = Metrics(self.engine.scheduler)
        self.workers = ThreadPoolExecutor(max_workers=max(4, max_batch), thread_name_prefix="steerscale-request")
        # strategies hold a thread for their whole run: their own pool, so they never starve the others' encoding
        self.strategy_workers = ThreadPoolExecutor(max_workers=max(2, max_batch),
                                                   thread_name_prefix="steerscale-strategy")
        self.pending = 0  # generation requests in flight; only the event loop's thread changes it
        self.created = int(time.time())
        self.api = build_api(self)

    def close(self) -> None:
        """Stop the engine loop (requests still running end with an error) and the worker threads."""
        self.engine.close()
        for pool in (self.workers, self.strategy_workers):
            pool.shutdown(wait=False, cancel_futures=True)

    def add_artifact(self, kind: str, name: str, obj) -> None:
        """Register ``obj`` (a vector, condition or controller, as ``kind`` says) under ``name``, checked against the
        served model."""
        import re

        if not isinstance(name, str) or not re.fullmatch(VECTOR_NAME, name):
            raise SteerscaleError(f"bad {ARTIFACTS[kind].what} name {name!r}",
                                  "use 1-128 letters, digits, '_', '.' and '-'")
        if kind == "gates" and isinstance(obj, TokenGate):
            obj = FittedTokenGate.of(obj)  # a gate built in Python: the saved kind's check and card
        if not isinstance(obj, ARTIFACTS[kind].type):
            raise SteerscaleError(f"{name!r} is a {type(obj).__name__}, not a {ARTIFACTS[kind].what}")
        obj.check(self.layout)  # every artifact kind has one model check (steer.artifacts.Artifact)
        self.shelves[kind][name] = obj

    # -- helpers ----------------------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_id:
            raise ApiError(404, f"model {name!r} is not served here; this server serves {self.model_id!r}",
                           param="model", type="not_found_error", code="model_not_found")

    async def blocking(self, fn, *args, **kwargs):
        """``fn`` on a worker thread (tokenising, waiting on the engine), so the event loop keeps serving."""
        return await asyncio.wrap_future(self.workers.submit(fn, *args, **kwargs))

    def admit(self) -> None:
        if self.pending >= self.limits.max_pending:
            raise ApiError(429, f"the server is busy ({self.pending} requests in flight); retry in "
                                f"{self.limits.retry_after} s", type="rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(self.limits.retry_after)})
        self.pending += 1
        self.metrics.in_flight.set(self.pending)

    def release(self) -> None:
        self.pending -= 1
        self.metrics.in_flight.set(self.pending)

    async def wait(self, futures: list[Future], request: Request | None, deadline: float, cancel) -> None:
        """Until every future is done; on a disconnect or past ``deadline`` (loop time): ``cancel()`` and an error."""
        loop = asyncio.get_running_loop()
        waiting = {asyncio.wrap_future(f) for f in futures}
        while waiting:
            _, waiting = await asyncio.wait(waiting, timeout=0.2)
            if not waiting:
                return
            if request is not None and await request.is_disconnected():
                cancel()
                raise ClientGone()
            if loop.time() > deadline:
                cancel()
                raise timeout_error(self.limits.request_timeout)

    # -- endpoints --------------------------------------------------------------------------------------------
    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "steerscale",
                "max_model_len": self.engine.tokens.context_window,
                "steerscale": {**{kind: sorted(shelf) for kind, shelf in self.shelves.items()}, "max_n": self.max_n}}

    async def completions(self, body: CompletionRequest, request: Request | None = None):
        self.check_model(body.model)
        return await self.generate(parse_completion(body, max_n=self.max_n, corpus=self.corpus, **self.shelves),
                                   request,
                                   chat=False)

    async def chat_completions(self, body: ChatRequest, request: Request | None = None):
        self.check_model(body.model)
        return await self.generate(parse_chat(body, max_n=self.max_n, corpus=self.corpus, **self.shelves), request,
                                   chat=True)

    async def generate(self, req: GenRequest, request: Request | None, *, chat: bool):
        start = time.monotonic()
        deadline = asyncio.get_running_loop().time() + self.limits.request_timeout
        self.admit()
        handed_off = False  # a stream releases its slot when it ends
        try:
            texts, all_ids, max_tokens = await self.blocking(self.engine.encode, req, chat=chat)
            self.metrics.prompt_tokens.inc(sum(len(ids) for ids in all_ids))
            if req.strategy is not None:
                return await self.strategy(req, request, deadline, chat=chat)
            if req.stream:
                stream = Stream(self, req, texts, all_ids, max_tokens, chat=chat, start=start, deadline=deadline)
                stream.submit()  # a 4xx (e.g. the server is closing) is still answered as JSON
                handed_off = True
                return StreamingResponse(stream.events(request), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                         background=BackgroundTask(stream.close))
            timer = FirstToken(self.metrics, start)
            jobs = self.engine.submit(req, all_ids, max_tokens, on_update=timer)
            try:
                await self.wait([j.future for j in jobs if j is not None], request, deadline,
                                lambda: [j.cancel() for j in jobs if j is not None])
            finally:
                for j in jobs:
                    if j is not None and not j.future.done():
                        j.cancel()
            choices, usage = await self.blocking(self.engine.finish, req, texts, all_ids, jobs)
            self.metrics.generation_tokens.inc(usage["completion_tokens"])
            shape = self.chat_choice if chat else self.completion_choice
            return self.shaper.envelope([shape(i, c, req) for i, c in enumerate(choices)], usage, chat=chat)
        finally:
            if not handed_off:
                self.release()
                self.metrics.latency.observe(time.monotonic() - start)

    async def strategy(self, req: GenRequest, request: Request | None, deadline: float, *, chat: bool) -> dict:
        backend = self.engine.strategy_backend(req, chat=chat)
        prompt = req.prompts[0][0]["content"] if chat else req.prompts[0]
        future = self.strategy_workers.submit(self.engine.run_strategy, req, prompt, backend)
        await self.wait([future], request, deadline, backend.cancel)
        result = future.result()
        self.metrics.generation_tokens.inc(result.budget["spent"]["generated_tokens"])
        return self.shaper.strategy_response(result, chat=chat)

    # -- response shape: one choice (a subclass may answer like another server, e.g. llama.cpp's) ----------------
    def completion_choice(self, index: int, c, req) -> dict:
        return self.shaper.completion_choice(index, c, req)

    def chat_choice(self, index: int, c, req) -> dict:
        return self.shaper.chat_choice(index, c, req)

    # -- the steering registries ------------------------------------------------------------------------------
    def artifact_card(self, kind: str, name: str) -> dict:
        shelf = self.shelf(kind)
        if name not in shelf:
            what = ARTIFACTS[kind].what
            raise ApiError(404, f"no {what} {name!r} on this server", param="name", type="not_found_error",
                           code=f"{what.split()[-1]}_not_found")
        return {"id": name, **ARTIFACTS[kind].card(shelf[name])}

    def list_artifacts(self, kind: str) -> dict:
        return {"object": "list", "data": [self.artifact_card(kind, name) for name in sorted(self.shelf(kind))]}

    def shelf(self, kind: str) -> dict:
        if kind not in self.shelves:
            raise ApiError(404, f"no steering registry {kind!r}; the server has {', '.join(self.shelves)}",
                           param="kind", type="not_found_error", code="registry_not_found")
        return self.shelves[kind]

    def upload_artifact(self, kind: str, name: str, data: bytes) -> dict:
        """Register ``data`` (a steerscale .safetensors artifact of ``kind``; for vectors also a llama.cpp
        control-vector .gguf) as ``name``, replacing any of that name (running requests keep the one they
        started with)."""
        import re

        self.shelf(kind)  # 404 for an unknown registry
        spec = ARTIFACTS[kind]
        if spec.load is None:
            raise bad("kind", f"{spec.what}s are folders, not one file: register them when the server starts "
                              f"({spec.files})")
        if not re.fullmatch(VECTOR_NAME, name):
            raise bad("name", f"bad {spec.what} name {name!r}: use 1-128 letters, digits, '_', '.' and '-'")
        if data[:4] == b"GGUF" and kind == "vectors":
            suffix = ".gguf"
        elif len(data) > 8 and data[8:9] == b"{":  # safetensors: an 8-byte header length, then a JSON header
            suffix = ".safetensors"
        else:
            raise bad(None, f"the body is not a {spec.what} file ({spec.files}); upload the file's bytes "
                            "(e.g. curl --data-binary @file.safetensors)")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"upload{suffix}"
            path.write_bytes(data)
            try:
                self.add_artifact(kind, name, spec.load(path))
            except SteerscaleError as exc:
                raise bad(None, f"{spec.what} {name!r} rejected: {exc.problem}" + (f" ({exc.hint})" if exc.hint
                                                                                     else "")) from None
        return self.artifact_card(kind, name)

    def delete_artifact(self, kind: str, name: str) -> dict:
        card = self.artifact_card(kind, name)  # 404 when there is none
        del self.shelves[kind][name]
        return {"id": name, "object": card["object"], "deleted": True}


@dataclass(frozen=True)
class _Kind:
    """One kind of steering artifact the server registers: its class, loader, listing card and file formats."""

    what: str
    type: type
    load: object
    card: object
    files: str


ARTIFACTS = {
    "vectors": _Kind("steering vector", SteeringVector, SteeringVector.load,
                     lambda v: {"object": "steering_vector", "method": v.method, "model_name": v.model_name,
                                "sites": [s.key() for s in v.sites], "norms": v.norms()},
                     "a steerscale .safetensors vector or a llama.cpp control-vector .gguf"),
    "conditions": _Kind("steering condition", Condition, Condition.load,
                        lambda c: {"object": "steering_condition", "site": c.site.key(), "threshold": c.threshold,
                                   "comparison": c.comparison.value, "readout": c.readout.value,
                                   "model_name": c.model_name, "f1": c.metadata.get("f1")},
                        "a steerscale .safetensors condition (steerscale condition)"),
    "controllers": _Kind("steering controller", SteeringController, SteeringController.load,
                         lambda c: {"object": "steering_controller", "inputs": [s.key() for s in c.inputs],
                                    "edits": [s.key() for s in c.edit_sites], "max_strength": c.max_strength,
                                    "model_name": c.model_name},
                         "a steerscale .safetensors controller (steerscale controller)"),
    "gates": _Kind("token gate", FittedTokenGate, FittedTokenGate.load,
                   lambda g: {"object": "token_gate", "site": g.site.key(), "threshold": g.threshold,
                              "invert": g.invert, "model_name": g.metadata.get("model_name"),
                              "holdout_token_accuracy": g.metadata.get("holdout_token_accuracy")},
                   "a steerscale .safetensors token gate (steerscale gate)"),
    "saes": _Kind("SAE", ClampableSAE, None, lambda c: c.card(),
                  "steerscale serve --sae NAME=DIR, DIR an SAELens folder: cfg.json + sae_weights.safetensors"),
    "memories": _Kind("program memory", ProgramMemory, None, lambda m: m.card(),
                      "steerscale serve --memory NAME=PATH, a handbook, concept memory or router JSON"),
}


class ClientGone(Exception):
    """The client disconnected: nothing is sent back."""


def timeout_error(seconds: float) -> ApiError:
    return ApiError(408, f"the request ran past the server's limit of {seconds:g} s and was cancelled; ask for "
                         "fewer tokens or raise steerscale serve --request-timeout", type="timeout_error",
                    code="request_timeout")


class FirstToken:
    """A job's ``on_update``: observes the time to the first generated token once (engine thread)."""

    def __init__(self, metrics: Metrics, start: float):
        self.metrics, self.start, self.seen = metrics, start, False

    def __call__(self) -> None:
        if not self.seen:
            self.seen = True
            self.metrics.ttft.observe(time.monotonic() - self.start)


class Stream:
    """One streamed response: submits the request's jobs with an ``on_update`` that wakes the event loop, then
    yields each choice's new text as server-sent events until every choice has finished."""

    def __init__(self, app: App, req: GenRequest, texts, all_ids, max_tokens: int, *, chat: bool, start: float,
                 deadline: float):
        self.app, self.req, self.texts, self.all_ids, self.max_tokens = app, req, texts, all_ids, max_tokens
        self.chat, self.start, self.deadline = chat, start, deadline
        self.shaper = StreamShaper(app.model_id, chat=chat, include_usage=req.include_usage)
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.jobs = []
        self.first_token = FirstToken(app.metrics, start)
        self.n_gen = 0
        self.closed = False

    def _update(self) -> None:  # engine thread
        self.first_token()
        try:
            self.loop.call_soon_threadsafe(self.wake.set)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
            pass

    def submit(self) -> None:
        self.jobs = self.app.engine.submit(self.req, self.all_ids, self.max_tokens, on_update=self._update)

    def cancel(self) -> None:
        for job in self.jobs:
            if not job.future.done():
                job.cancel()

    def close(self) -> None:
        """Cancel what still runs and give back the request's slot (once; the generator's end and the response's
        background task both call it, as either may not run when a client vanishes)."""
        self.cancel()
        if not self.closed:
            self.closed = True
            self.app.metrics.generation_tokens.inc(self.n_gen)
            self.app.metrics.latency.observe(time.monotonic() - self.start)
            self.app.release()

    async def events(self, request: Request | None):
        n = self.req.n
        sent = [0] * (len(self.jobs) * n)
        done = [False] * len(sent)
        try:
            if self.chat:
                yield self.shaper.chunk([self.shaper.role(i) for i in range(len(sent))])
            while not all(done):
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=0.5)
                except TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return
                    if self.loop.time() > self.deadline:
                        self.cancel()
                        yield sse(timeout_error(self.app.limits.request_timeout).body())
                        return
                    continue
                self.wake.clear()
                if self.loop.time() > self.deadline:  # a stream that keeps producing still ends at its deadline
                    self.cancel()
                    yield sse(timeout_error(self.app.limits.request_timeout).body())
                    return
                out = []
                for p, job in enumerate(self.jobs):
                    failed = job.future.done() and job.future.exception() is not None
                    if failed:
                        exc = job.future.exception()
                        err = ApiError(400, exc.problem) if isinstance(exc, SteerscaleError) else ApiError(
                            500, "internal server error (details are in the server log)", type="server_error")
                        if not isinstance(exc, SteerscaleError):
                            log.error("stream failed", exc_info=exc)
                        yield sse(err.body())
                        return
                    for i, cand in enumerate(list(job.cands)):
                        index = p * n + i
                        if done[index]:
                            continue
                        finished = cand.finished
                        text = cand.text
                        if finished:
                            stop = self.app.engine.stop_reason(cand, self.req)
                            text = cand.text
                            out.append(self.shaper.delta(index, text[sent[index]:], cand, stop))
                            done[index] = True
                            self.n_gen += len(cand.token_ids)
                        else:
                            end = stream_safe(text, self.req.stop)
                            if end > sent[index]:
                                out.append(self.shaper.delta(index, text[sent[index]:end]))
                                sent[index] = end
                if out:
                    yield self.shaper.chunk(out)
            if self.req.include_usage:
                n_prompt = sum(len(ids) for ids in self.all_ids)
                yield self.shaper.usage({"prompt_tokens": n_prompt, "completion_tokens": self.n_gen,
                                         "total_tokens": n_prompt + self.n_gen})
            yield sse(b"[DONE]")
        finally:
            self.close()  # the client went away (or the server is stopping): its rows leave the batch


class CountRequests:
    """ASGI middleware: every response counted by route and status (a plain ASGI wrapper: Starlette's
    ``BaseHTTPMiddleware`` would hide a client's disconnect from the endpoint, and with it cancellation)."""

    def __init__(self, asgi, metrics: Metrics):
        self.asgi, self.metrics = asgi, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.asgi(scope, receive, send)
        status = 500

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.asgi(scope, receive, send_counted)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "unmatched"), str(status)).inc()


# -- the FastAPI application --------------------------------------------------------------------------------------
def build_api(app: App) -> FastAPI:
    """The HTTP routes of ``app``. Bodies are read here (``read_request``) and parsed by ``serve/schema.py``."""

    @asynccontextmanager
    async def lifespan(_):
        yield
        app.close()  # after uvicorn has drained (or cancelled) the requests in flight

    api = FastAPI(title="steerscale serve", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible completions and chat completions with per-request steering "
                              "(`steer`) and inference-time scaling strategies (`strategy`). See docs/serving.md.")

    async def read_request(request: Request, limit: int) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise ApiError(413 if length.isdigit() else 400, f"the request body is over this server's limit of "
                                                             f"{limit} bytes" if length.isdigit() else
                           "bad Content-Length header", code="body_too_large" if length.isdigit() else None)
        chunks, size = [], 0

        async def receive():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"the request body is over this server's limit of {limit} bytes",
                                   code="body_too_large")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(receive(), app.limits.body_timeout)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {app.limits.body_timeout:g} s",
                           code="body_timeout") from None
        return b"".join(chunks)

    def authorize(request: Request) -> None:
        if app.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), app.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    def answer(payload, status: int = 200):
        if isinstance(payload, Response):
            return payload
        return Response(to_json(payload), status_code=status, media_type="application/json")

    api.add_middleware(CountRequests, metrics=app.metrics)

    @api.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return Response(to_json(exc.body()), status_code=exc.status, media_type="application/json",
                        headers=exc.headers)

    @api.exception_handler(SteerscaleError)
    async def steerscale_error(_, exc: SteerscaleError):
        msg = exc.problem + (f" (hint: {exc.hint})" if exc.hint else "")
        return await api_error(_, ApiError(400, msg))

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: ("not_found_error", "not_found"), 405: ("invalid_request_error", "method_not_allowed")}
        typ, code = kind.get(exc.status_code, ("invalid_request_error", None))
        msg = (f"no route {request.method} {request.url.path}; see /docs" if exc.status_code == 404 else
               f"{request.url.path} does not take {request.method}" if exc.status_code == 405 else str(exc.detail))
        return await api_error(request, ApiError(exc.status_code, msg, type=typ, code=code))

    @api.exception_handler(ClientGone)
    async def client_gone(_, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it (nginx's code for "client closed the request")

    @api.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # a bug: the log gets the traceback
        log.exception("internal error on %s %s", request.method, request.url.path)
        return await api_error(request, ApiError(500, "internal server error (details are in the server log)",
                                                 type="server_error", code="internal_error"))

    def body_doc(model) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
            "$ref": f"#/components/schemas/{model.__name__}"}}}}}

    @api.get("/health", tags=["server"])
    async def health():
        return {"status": "ok", "running_rows": app.engine.scheduler.running,
                "queue_depth": app.engine.scheduler.queue_depth}

    @api.get("/metrics", tags=["server"], response_class=Response)
    async def metrics():
        return Response(app.metrics.render(), media_type=app.metrics.content_type)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])  # every /v1 route: the API key, when set

    @v1.get("/models", tags=["openai"])
    async def models():
        return answer(app.models())

    @v1.get("/models/{model_id:path}", tags=["openai"])
    async def model(model_id: str):
        app.check_model(model_id)
        return answer(app.model_card())

    @v1.post("/completions", tags=["openai"], openapi_extra=body_doc(CompletionRequest))
    async def completions(request: Request):
        body = read_body(CompletionRequest, await read_request(request, app.limits.max_body_bytes))
        return answer(await app.completions(body, request))

    @v1.post("/chat/completions", tags=["openai"], openapi_extra=body_doc(ChatRequest))
    async def chat_completions(request: Request):
        body = read_body(ChatRequest, await read_request(request, app.limits.max_body_bytes))
        return answer(await app.chat_completions(body, request))

    @v1.get("/steering/{kind}", tags=["steering"])
    async def list_artifacts(kind: str):
        """The registered steering artifacts of one kind: vectors, conditions or controllers."""
        return answer(app.list_artifacts(kind))

    @v1.get("/steering/{kind}/{name}", tags=["steering"])
    async def get_artifact(kind: str, name: str):
        return answer(app.artifact_card(kind, name))

    @v1.put("/steering/{kind}/{name}", tags=["steering"], openapi_extra={"requestBody": {
        "required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "description": "; ".join(f"{kind}: {spec.files}" for kind, spec in ARTIFACTS.items()) + " (never pickle)"}})
    async def upload_artifact(kind: str, name: str, request: Request):
        app.shelf(kind)  # 404 before reading a body for a registry that does not exist
        data = await read_request(request, app.limits.max_vector_bytes)
        return answer(await app.blocking(app.upload_artifact, kind, name, data), 201)

    @v1.delete("/steering/{kind}/{name}", tags=["steering"])
    async def delete_artifact(kind: str, name: str):
        return answer(app.delete_artifact(kind, name))

    api.include_router(v1)
    api.include_router(studio_router())  # the steering studio page at / (serve/studio.py)

    default_openapi = api.openapi

    def openapi() -> dict:
        """FastAPI's schema plus the request models (read by hand, so FastAPI cannot see them)."""
        if api.openapi_schema is None:
            schema = default_openapi()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (CompletionRequest, ChatRequest):
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi
    return api
