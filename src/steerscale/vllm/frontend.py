"""Tenant safety in vLLM's front end: every request is checked and salted before it reaches the engine.

vLLM loads ``vllm.general_plugins`` in its front end too (the ``vllm serve`` API server, or the process that holds
``vllm.LLM``), so ``worker.register`` installs two guards there (every name below is vLLM's):

* ``InputProcessor.assign_request_id`` runs on every request that ``LLMEngine`` or ``AsyncLLM`` accepts, processed
  or passed in as an ``EngineCoreRequest``. ``admit`` runs first: a steer spec or a steerscale field that the
  workers cannot run exactly raises ``VLLMValidationError`` (``vllm serve`` answers 400 naming the field, the
  offline ``LLM`` raises), and the request's ``cache_salt`` is replaced by the salt derived from its steering
  (``steering.request_salt``), so no client can make a request read KV blocks computed under other steering.
* ``EngineCore.preprocess_add_request`` (the engine process) refuses a steered request that did not pass ``admit``
  (a front end without the plugin): vLLM turns that into an error for that request alone, never an unsalted or
  unsteered answer.

The front end knows the vectors by name and content digest: ``vllm serve`` reads ``STEERSCALE_VLLM_VECTORS`` and
``STEERSCALE_VLLM_STEER`` as the workers do; ``SteeredLLM`` records what it registers (``REGISTRY``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import SteerscaleError
from .steering import STEER_KEY, body_extra_args, check_extra_args, format_steer, parse_steer, request_salt

VECTORS_ENV = "STEERSCALE_VLLM_VECTORS"  # NAME=PATH,NAME=PATH
GLOBAL_ENV = "STEERSCALE_VLLM_STEER"  # engine-wide steering, "NAME:OP[:SCOPE],..."
STAGES_ENV = "STEERSCALE_VLLM_STAGES"  # steer entries per request (engine-wide included; default 4)
SALT_PREFIX = "steerscale-"


def vector_specs(value: str | None) -> list[tuple[str, Path]]:
    """``NAME=PATH,NAME=PATH`` as ``[(name, path)]``; a malformed item is a clear error at start."""
    out = []
    for item in filter(None, (value or "").split(",")):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise SteerscaleError(f"{VECTORS_ENV}: bad item {item!r}", "write NAME=PATH,NAME=PATH")
        parse_steer(f"{name.strip()}:0")  # the name rule
        out.append((name.strip(), Path(path.strip())))
    return out


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class FrontendRegistry:
    """What the front end knows of the workers' steering: vector names and content digests, engine-wide steering."""

    def __init__(self):
        self.digests: dict[str, str] = {}
        self.engine_wide: list = []
        self.loaded_env = False

    def load_env(self) -> None:
        """Vectors and engine-wide steering from the environment ``vllm serve`` was started with (once)."""
        if self.loaded_env:
            return
        self.loaded_env = True
        for name, path in vector_specs(os.environ.get(VECTORS_ENV)):
            if not path.is_file():
                raise SteerscaleError(f"{VECTORS_ENV}: no file {str(path)!r} for vector {name!r}",
                                      "give the path of a .safetensors or .gguf vector")
            self.digests[name] = digest(path.read_bytes())
        self.set_engine_wide(os.environ.get(GLOBAL_ENV) or None)

    def set_engine_wide(self, spec) -> None:
        entries = parse_steer(spec)
        for name, _, _ in entries:
            self.known(name, field=GLOBAL_ENV)
        self.engine_wide = entries

    def known(self, name: str, field: str = "vllm_xargs.steer") -> None:
        if name not in self.digests:
            have = ", ".join(sorted(self.digests)) or "none"
            raise SteerscaleError(f"{field}: unknown steering vector {name!r}; registered in vLLM: {have}",
                                  "register it (SteeredLLM.register, or STEERSCALE_VLLM_VECTORS=NAME=PATH for "
                                  "vllm serve)")

    def admit(self, request) -> None:
        """Check ``request`` (an ``EngineCoreRequest``) and set its cache salt; ``SteerscaleError`` if it cannot run."""
        self.load_env()
        params = getattr(request, "sampling_params", None)
        extra = getattr(params, "extra_args", None) if params is not None else None
        entries = check_extra_args(extra)
        if params is None and getattr(request, "pooling_params", None) is not None:
            if self.engine_wide:
                raise SteerscaleError("pooling requests are not steered by steerscale's vLLM path",
                                      "serve pooling models without engine-wide steering")
            return
        for name, _, _ in entries:
            self.known(name)
        limit = stages_per_request()
        if len(entries) + len(self.engine_wide) > limit:
            raise SteerscaleError(f"vllm_xargs.steer: {len(entries)} entries (+{len(self.engine_wide)} engine-wide); "
                                  f"vLLM's steering plan holds {limit} per request",
                                  "send fewer entries, or start vLLM with a larger STEERSCALE_VLLM_STAGES")
        prompt = getattr(request, "prompt_token_ids", None)
        steered = entries or self.engine_wide
        if steered and prompt is None:
            raise SteerscaleError("prompt: a steered request needs token ids (prompt embeddings are not steered)",
                                  "send text or token ids")
        request.cache_salt = request_salt(entries, self.engine_wide, self.digests, prompt, request.cache_salt)
        if entries:  # the workers parse one canonical form
            extra[STEER_KEY] = format_steer(entries)


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise SteerscaleError(f"{name}={raw!r} is not a positive integer")
    return int(raw)


def stages_per_request() -> int:
    """Entries a request may carry (engine-wide ones included): the stages of the workers' fixed-buffer plan
    (``STAGES_ENV``), the same limit in either plan, so a request runs the same whatever the workers' mode."""
    return env_int(STAGES_ENV, 4)


REGISTRY = FrontendRegistry()


def check_admitted(request) -> None:
    """The engine process's check: a steered request carries a salt the front end derived (``admit`` ran)."""
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    if extra.get(STEER_KEY) and not (request.cache_salt or "").startswith(SALT_PREFIX):
        raise SteerscaleError(f"request {request.request_id} is steered but was not checked by steerscale's plugin "
                              "in vLLM's front end", "enable the plugin (STEERSCALE_VLLM=1) in the process that "
                                                     "accepts requests")


def install() -> None:
    """Wrap vLLM's request admission in this process (idempotent)."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.input_processor import InputProcessor

    assign = InputProcessor.assign_request_id
    if not getattr(assign, "_steerscale", False):
        def assign_request_id(request):
            try:
                REGISTRY.admit(request)
            except SteerscaleError as exc:
                field = exc.problem.split(":", 1)[0] if exc.problem.startswith(("vllm_xargs.", "prompt")) else None
                raise VLLMValidationError(str(exc), parameter=field) from None
            return assign(request)

        assign_request_id._steerscale = True
        InputProcessor.assign_request_id = staticmethod(assign_request_id)

    for cls in _request_models():
        _wrap_body(cls, VLLMValidationError)

    preprocess = EngineCore.preprocess_add_request
    if not getattr(preprocess, "_steerscale", False):
        def preprocess_add_request(self, request):
            check_admitted(request)
            return preprocess(self, request)

        preprocess_add_request._steerscale = True
        EngineCore.preprocess_add_request = preprocess_add_request


def _request_models() -> list[type]:
    """vLLM's OpenAI request models that build sampling parameters (completions, chat completions)."""
    import importlib

    out = []
    for module, name in [("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),
                         ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest")]:
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return out


def _wrap_body(cls, error) -> None:
    """``cls.to_sampling_params`` reads ``steerscale serve``'s top-level ``steer`` field (vLLM keeps unknown fields in
    ``model_extra``) into ``extra_args``; beam search, which builds its own per-beam parameters, refuses steering."""
    to_params, to_beams = cls.to_sampling_params, getattr(cls, "to_beam_search_params", None)
    if getattr(to_params, "_steerscale", False):
        return

    def to_sampling_params(self, *args, **kwargs):
        params = to_params(self, *args, **kwargs)
        try:
            params.extra_args = body_extra_args(self.model_extra, params.extra_args)
        except SteerscaleError as exc:
            raise error(str(exc), parameter=exc.problem.split(":", 1)[0].split("[")[0]) from None
        return params

    def to_beam_search_params(self, *args, **kwargs):
        if (self.model_extra or {}).get(STEER_KEY) or (getattr(self, "vllm_xargs", None) or {}).get(STEER_KEY):
            raise error("steer: steerscale's vLLM path does not steer beam search", parameter="steer")
        return to_beams(self, *args, **kwargs)

    to_sampling_params._steerscale = True
    cls.to_sampling_params = to_sampling_params
    if to_beams is not None:
        cls.to_beam_search_params = to_beam_search_params
