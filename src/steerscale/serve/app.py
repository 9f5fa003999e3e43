"""``steerscale serve``'s application: routing, state and the order of work for each endpoint. See docs/serving.md.

``App.handle(method, path, body) -> (status, payload)`` is all the HTTP front end calls; it never raises. A
request is parsed in ``serve/schema.py``, run on the model in ``serve/engine.py`` (one engine loop owns the
model and batches concurrent requests, ``serve/scheduler.py``) and shaped into OpenAI's response objects in
``serve/responses.py``. ``close()`` stops the engine loop.
"""

from __future__ import annotations

import logging
import re
import time

from ..engine.generation import has_chat_template
from ..errors import SteerscaleError
from .engine import Engine, SharedTokenizer
from .responses import Shaper, to_json
from .schema import ApiError, bad, parse_chat, parse_completion, parse_json, read

log = logging.getLogger("steerscale.serve")

VECTOR_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
__all__ = ["ApiError", "App", "ROUTES", "to_json"]


class App:
    """The server's state: one model and its engine loop (``Engine``), its registered steering vectors."""

    def __init__(self, model, tokenizer, layout, *, model_id: str, vectors: dict | None = None, max_n: int = 64,
                 max_batch: int = 16):
        if not isinstance(max_n, int) or max_n < 1:
            raise SteerscaleError(f"max_n must be a positive integer, got {max_n!r}")
        if not isinstance(model_id, str) or not model_id:
            raise SteerscaleError("the served model needs a non-empty id")
        self.vectors = dict(vectors or {})
        for name, vec in self.vectors.items():
            if not VECTOR_NAME.fullmatch(name):
                raise SteerscaleError(f"bad vector name {name!r}", "use letters, digits, '_', '.' and '-'")
            vec.check_compatible(layout)  # a vector for another model fails here, not in a request
        tokenizer = SharedTokenizer(tokenizer)  # used by the HTTP threads and the engine thread
        self.tokenizer, self.model_id, self.max_n = tokenizer, model_id, max_n
        self.engine = Engine(model, tokenizer, layout, self.vectors, max_n, max_batch)
        self.shaper = Shaper(tokenizer, self.engine.base.decode, model_id)
        self.created = int(time.time())

    def close(self) -> None:
        self.engine.close()

    # -- routing ----------------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
        try:
            route = ROUTES.get(path.split("?", 1)[0].rstrip("/") or "/")
            if route is None:
                raise ApiError(404, f"no route {method} {path}; see /v1/models, /v1/completions, /v1/chat/completions",
                               type="not_found_error", code="not_found")
            want, name = route
            if method != want:
                raise ApiError(405, f"{path} takes {want}, not {method}", code="method_not_allowed")
            endpoint = getattr(self, name)
            return 200, endpoint(parse_json(body)) if want == "POST" else endpoint()
        except ApiError as exc:
            return exc.status, exc.body()
        except SteerscaleError as exc:
            msg = exc.problem + (f" (hint: {exc.hint})" if exc.hint else "")
            return 400, ApiError(400, msg).body()
        except Exception:  # a bug or a failed forward pass: the client gets no traceback, the log does
            log.exception("internal error on %s %s", method, path)
            return 500, ApiError(500, "internal server error (details are in the server log)", type="server_error",
                                 code="internal_error").body()

    def check_model(self, body: dict) -> None:
        name = read(body, "model", "str")
        if name is not None and name != self.model_id:
            raise ApiError(404, f"model {name!r} is not served here; this server serves {self.model_id!r}",
                           param="model", type="not_found_error", code="model_not_found")

    # -- endpoints --------------------------------------------------------------------------------------------
    def health(self) -> dict:
        return {"status": "ok"}

    def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": self.created, "owned_by": "steerscale",
            "max_model_len": self.engine.base.context_window,
            "steerscale": {"vectors": sorted(self.vectors), "max_n": self.max_n}}]}

    def completions(self, body: dict) -> dict:
        self.check_model(body)
        req = parse_completion(body, max_n=self.max_n, vectors=self.vectors)
        if req.strategy is not None:
            return self.shaper.strategy_response(self.engine.run_strategy(req, req.prompts[0], chat=False),
                                                 chat=False)
        choices, usage = self.engine.generate(req, req.prompts)
        return self.shaper.envelope([self.completion_choice(i, c, req) for i, c in enumerate(choices)], usage,
                                    chat=False)

    def chat_completions(self, body: dict) -> dict:
        self.check_model(body)
        req = parse_chat(body, max_n=self.max_n, vectors=self.vectors)
        if req.strategy is not None:
            result = self.engine.run_strategy(req, req.prompts[0][0]["content"], chat=True)
            return self.shaper.strategy_response(result, chat=True)
        choices, usage = self.engine.generate(req, [self.chat_text(req.prompts[0])])
        return self.shaper.envelope([self.chat_choice(i, c, req) for i, c in enumerate(choices)], usage,
                                    chat=True)

    # -- response shape: one choice (a subclass may answer like another server, e.g. llama.cpp's) ----------------
    def completion_choice(self, index: int, c, req) -> dict:
        return self.shaper.completion_choice(index, c, req)

    def chat_choice(self, index: int, c, req) -> dict:
        return self.shaper.chat_choice(index, c, req)

    def chat_text(self, messages: list[dict]) -> str:
        if not has_chat_template(self.tokenizer):
            raise bad("messages", f"{self.model_id} has no chat template; use /v1/completions with a raw prompt")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja templates raise their own errors (e.g. no system role)
            raise bad("messages", f"the chat template rejected these messages: {exc}") from None


ROUTES = {  # path -> (method, App method name)
    "/health": ("GET", "health"),
    "/v1/models": ("GET", "models"),
    "/v1/completions": ("POST", "completions"),
    "/v1/chat/completions": ("POST", "chat_completions"),
}
