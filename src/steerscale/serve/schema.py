"""Where a request is parsed: the pydantic models of OpenAI's ``/v1/completions`` and ``/v1/chat/completions`` bodies
(with steerscale's ``steer`` and ``strategy`` extension fields), read into a checked ``GenRequest``, or an
``ApiError`` (a 4xx with OpenAI's error object naming the field). Nothing here touches the model.

The models are strict and closed: a field of the wrong JSON type, a non-finite number, a value out of range or a
field this server does not know is a 400 naming it. OpenAI fields steerscale cannot honour (``tools``,
``response_format`` other than text, ``suffix``, ...) are rejected when set to anything but their no-op value,
never silently ignored. The same models document the API (``/openapi.json``).

The ``strategy`` field becomes a ``StrategySpec`` here (``StrategySpec.from_json``), so an unknown strategy,
verifier or knob, a mistyped knob or a malformed budget is a 400 naming the field before any model work; the
request's sampling fields (``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``min_p``, the penalties,
``logit_bias``, ``min_tokens``, ``ignore_eos``, ``stop``) and ``seed`` are inherited, when set, by the knobs of
those names that the strategy takes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..engine.logit_contrast import LogitContrast
from ..engine.scope import TokenScope
from ..errors import SteerscaleError
from ..scale.backend import SamplingParams
from ..scale.spec import StrategySpec
from ..steer.conditional import ConditionalSteering
from ..steer.grammar import MAX_SCALE, VECTOR_NAME

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_STEER_ENTRIES = 16
MAX_CONDITIONS = 8  # per steer entry
MAX_STEER_SCALE = MAX_SCALE  # the one steering grammar's cap and name rule (steer/grammar.py)
# request fields a strategy inherits (when the request sets them): every sampling field, and the seed
REQUEST_KNOBS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "logit_bias", "min_tokens", "ignore_eos", "stop", "seed")


class ApiError(Exception):
    """An error the client sees: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, param=param)


# -- the request models ------------------------------------------------------------------------------------------
class Strict(BaseModel):
    """JSON types as written (no "5" for 5, no 5.0 for an int), finite numbers only, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


Name = Annotated[str, Field(pattern=VECTOR_NAME)]


class SteerEntry(Strict):
    """One steering entry: a vector registered on the server (added always, or only to prompts that meet
    registered conditions: CAST), a registered steering controller (which sets its own strength per prompt), or a
    feature of a registered SAE in Neuronpedia's shape (``{"layer": SAE, "index": FEATURE, "strength": S}``: added,
    or clamped to S with ``"op": "clamp"``)."""

    vector: Name | None = Field(None, description="name of a vector registered on the server (GET "
                                                  "/v1/steering/vectors)")
    controller: Name | None = Field(None, description="name of a steering controller registered on the server (GET "
                                                      "/v1/steering/controllers); instead of 'vector'")
    layer: Name | None = Field(None, description="name of an SAE registered on the server (GET /v1/steering/saes; "
                                                 "Neuronpedia's 'layer'); with 'index', instead of 'vector'")
    index: int | None = Field(None, ge=0, description="the SAE feature to steer with (with 'layer')")
    strength: float | None = Field(None, ge=-MAX_STEER_SCALE, le=MAX_STEER_SCALE,
                                   description="an SAE feature's strength: units of its activation added (op 'add', "
                                               "default 1) or the activation it is clamped to (op 'clamp')")
    scale: float = Field(1.0, ge=-MAX_STEER_SCALE, le=MAX_STEER_SCALE,
                         description="the vector's scale; for a controller, a multiplier of the strength it sets")
    scope: Literal["all", "prompt", "generated"] | None = Field(
        None, description="edit the prompt and generated tokens, the prompt only, or generated tokens only (default: "
                          "all; for a controller, the scope it was saved with)")
    condition: Name | list[Name] | None = Field(
        None, description="names of conditions registered on the server (GET /v1/steering/conditions): the vector "
                          "is added only when the prompt meets them (CAST)")
    condition_rule: Literal["any", "all"] = Field("any", description="steer when any (or all) of the conditions hold")
    gate: Name | None = Field(
        None, description="name of a token gate registered on the server (GET /v1/steering/gates): the vector "
                          "applies from the first token (last prompt token onwards) at which the gate's probe fires, "
                          "per choice")
    op: Literal["add", "ablate", "set", "clamp"] = Field(
        "add", description="add scale x the vector; ablate: project its direction out; set: set the component along "
                           "its direction to 'value' (the grammar of steer/grammar.py, as in steerscale's vLLM "
                           "plugin); clamp: set an SAE feature's activation to 'strength', keeping the SAE's "
                           "reconstruction error")
    value: float | None = Field(None, ge=-MAX_STEER_SCALE, le=MAX_STEER_SCALE,
                                description="the component along the direction, for op 'set'")

    @model_validator(mode="after")
    def _one_kind(self):
        given = self.model_fields_set
        if (self.layer is None) != (self.index is None):
            raise ValueError("an SAE feature takes both 'layer' (the SAE's name) and 'index' (the feature)")
        if sum(x is not None for x in (self.vector, self.controller, self.layer)) != 1:
            raise ValueError("give exactly one of 'vector', 'controller' and 'layer' + 'index' (an SAE feature)")
        if self.layer is not None:
            if self.op not in ("add", "clamp") or given & {"scale", "value", "condition", "gate"}:
                raise ValueError("an SAE feature takes op 'add' or 'clamp' and a 'strength' (no 'scale', 'value', "
                                 "'condition' or 'gate')")
            if self.op == "clamp" and self.strength is None:
                raise ValueError("op 'clamp' needs 'strength': the activation the feature is clamped to")
            return self
        if self.op == "clamp" or self.strength is not None:
            raise ValueError("op 'clamp' and 'strength' go with an SAE feature ('layer' + 'index')")
        if self.op != "add" and (self.controller is not None or self.condition is not None):
            raise ValueError(f"op {self.op!r} edits a vector unconditionally: not with 'controller' or 'condition'")
        if (self.op == "set") != (self.value is not None) or (self.op != "add" and "scale" in given):
            raise ValueError("'value' goes with op 'set' (and 'scale' with op 'add')")
        if self.condition is not None and self.vector is None:
            raise ValueError("'condition' gates a vector; a controller decides on its own")
        if self.gate is not None and (self.vector is None or self.condition is not None):
            raise ValueError("'gate' switches a vector on per token: with 'vector', not with 'condition' (per "
                             "prompt) or a controller")
        if isinstance(self.condition, list) and not 1 <= len(self.condition) <= MAX_CONDITIONS:
            raise ValueError(f"'condition' takes 1 to {MAX_CONDITIONS} names")
        return self


class LogitContrastField(Strict):
    """Early-layer logit contrast for this request (DoLa / VISTA; ``steerscale.engine.logit_contrast``)."""

    layers: Literal["high", "low"] | Annotated[int, Field(ge=0)] | Annotated[
        list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=256)] = Field(
        "high", description="candidate early blocks: 'high', 'low', a block index or a list of them")
    mode: Literal["contrast", "add"] = Field("contrast", description="contrast (DoLa) or add (VISTA)")
    alpha: float = Field(0.1, ge=0, lt=1, description="DoLa's plausibility threshold; 0: off")
    weight: float = Field(1.0, gt=0, le=10, description="how much of the early distribution to subtract or add")


class StreamOptions(Strict):
    include_usage: bool = False


class ResponseFormat(Strict):
    type: Literal["text"] = Field(description="only plain text: JSON modes and schemas are not supported")


Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class _Common(Strict):
    """Fields both endpoints take."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0, description="new tokens per choice (the server caps it)")
    temperature: float = Field(1.0, ge=0, le=100, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="keep the k most likely tokens; 0 or -1: off")
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="token id (as a string) -> bias added to its logit")
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    n: int = Field(1, ge=1)
    stop: Stop | list[Stop] | None = None
    include_stop_str_in_output: bool = False
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    add_special_tokens: bool | None = None
    steer: list[SteerEntry] = Field(default_factory=list, max_length=MAX_STEER_ENTRIES,
                                    description="steerscale: this request's steering vectors, applied in order")
    logit_contrast: LogitContrastField | None = Field(
        None, description='steerscale: decode from an early-layer logit contrast, e.g. {"layers": "high"} (DoLa)')
    block_corpus: bool | None = Field(
        None, description="steerscale: provenance-aware decoding against the server's --block-corpus (default: on "
                          "when the server has one; false turns it off for this request)")
    strategy: dict[str, Any] | None = Field(
        None, description='steerscale: an inference-time scaling strategy, e.g. {"name": "best_of_n", "n": 8, '
                          '"verifier": "self_eval", "budget": "tokens=4000"}; its knobs as fields')
    # OpenAI fields with no steerscale meaning: accepted only at their no-op value
    best_of: Literal[1] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=0)
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        description="a text, several texts, or token ids (one list, or one list per prompt)")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: Literal[""] | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


# -- the checked request the engine runs ------------------------------------------------------------------------
@dataclass
class GenRequest:
    """A validated completions / chat completions request (one or more prompts, not yet chat-formatted)."""

    prompts: list  # completions: texts or token-id lists; chat: one list of {"role", "content"} messages
    max_tokens: int | None  # None: the endpoint's default (cut to the context); 0: score the prompt only (echo)
    n: int
    seed: int | None
    top_logprobs: int | None  # None: no log-probs; k: the k most likely tokens at each position
    echo: bool
    add_special_tokens: bool
    steer: list  # (SteeringVector, scale, scope) tuples and PromptRules (CAST, controllers), resolved at parse time
    strategy: StrategySpec | None
    stream: bool
    include_usage: bool
    include_stop: bool  # include_stop_str_in_output
    sampling: dict = field(default_factory=dict)  # SamplingParams fields besides max_tokens
    logit_contrast: LogitContrast | None = None  # early-layer contrast; its layers are checked against the model

    @property
    def stop(self) -> tuple[str, ...]:
        return self.sampling.get("stop", ())

    def params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, step=None, **self.sampling)


def read_body(model: type[Strict], raw: bytes) -> Strict:
    """``raw`` JSON as ``model``, or a 400 naming the first bad field (pydantic's JSON parser: no recursion limit
    to hit, no NaN, no lone surrogates)."""
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _validation_error(exc: ValidationError) -> ApiError:
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"] if not _is_union_tag(p)]
    param = ".".join(loc) or None
    if err["type"] == "json_invalid":
        return bad(None, f"the request body is not valid JSON ({err['msg'].removeprefix('Invalid JSON: ')})")
    if err["type"] == "model_type" and not loc:
        return bad(None, "the request body must be a JSON object")
    if err["type"] == "extra_forbidden":
        return bad(param, f"unknown field {param!r}: this server does not support it (see /docs for the fields)")
    if err["type"] == "missing":
        return bad(param, f"missing required field {param!r}")
    got = repr(err.get("input"))[:60]
    return bad(param, f"{param or 'body'}: {err['msg']} (got {got})")


def _is_union_tag(part) -> bool:  # pydantic names the union member it tried: "str", "list[str]", "function-..."
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or "-" in part)


def _lookup(shelf: dict, name: str, what: str, flag: str, kind: str):
    if name not in shelf:
        known = ", ".join(sorted(shelf)) or f"(none: register one with {flag} or PUT /v1/steering/{kind}/NAME)"
        raise bad("steer", f"unknown {what} {name!r}; this server has: {known}")
    return shelf[name]  # the object itself: a later DELETE/PUT cannot reach this request


def _steer(entries: list[SteerEntry], vectors, conditions, controllers, saes=None, gates=None) -> list:
    """The request's steering, resolved: ``(vector, scale, scope)`` tuples (an SAE feature: its vector, or a
    ``FeatureClamp`` with ``("clamp", value)``; a gated vector: ``(vector, scale, scope, gate)``), and
    ``PromptRule``s for conditional entries (CAST) and controllers, which the engine decides per prompt before
    generating."""
    steer = []
    for i, e in enumerate(entries):
        if e.layer is not None:
            sae = _lookup(saes or {}, e.layer, "SAE", "--sae", "saes")
            if e.index >= sae.sae.d_sae:
                raise bad(f"steer.{i}.index", f"SAE {e.layer!r} has features 0 to {sae.sae.d_sae - 1}, not {e.index}")
            try:
                steer.append((sae.clamp(e.index), ("clamp", e.strength), e.scope or "all") if e.op == "clamp" else
                             (sae.vector(e.index), 1.0 if e.strength is None else e.strength, e.scope or "all"))
            except SteerscaleError as exc:
                raise bad(f"steer.{i}.op", exc.problem + (f" ({exc.hint})" if exc.hint else "")) from None
            continue
        if e.controller is not None:
            ctl = _lookup(controllers, e.controller, "steering controller", "--controller", "controllers")
            scope = ctl.scope if e.scope is None else TokenScope.parse(e.scope)
            steer.append(dataclasses.replace(ctl, gain=e.scale, scope=scope))  # a copy: the registered one is shared
            continue
        vector = _lookup(vectors, e.vector, "steering vector", "--vector", "vectors")
        scope = e.scope or "all"
        if e.condition is None:
            op = e.scale if e.op == "add" else ("set", 0.0 if e.op == "ablate" else e.value)
            if e.gate is None:
                steer.append((vector, op, scope))
                continue
            gate = _lookup(gates or {}, e.gate, "token gate", "--gate", "gates")
            try:
                for site in vector.directions:
                    gate.check_edit_site(site)
            except SteerscaleError as exc:
                raise bad(f"steer.{i}.gate", exc.problem + (f" ({exc.hint})" if exc.hint else "")) from None
            steer.append((vector, op, scope, gate))
            continue
        names = [e.condition] if isinstance(e.condition, str) else e.condition
        conds = [_lookup(conditions, n, "steering condition", "--condition", "conditions") for n in names]
        try:
            steer.append(ConditionalSteering(vector, conds, e.scale, e.condition_rule, scope))
        except SteerscaleError as exc:
            raise bad("steer", exc.problem + (f" ({exc.hint})" if exc.hint else "")) from None
    return steer


def _block(body: _Common, corpus) -> dict:
    """The provenance veto this request decodes under: the server's corpus unless the request turns it off."""
    if body.block_corpus and corpus is None:
        raise bad("block_corpus", "this server has no corpus to block: start it with --block-corpus DIR")
    return {"block": corpus} if corpus is not None and body.block_corpus is not False else {}


def _common(body: _Common, vectors, conditions, controllers, corpus=None, saes=None, memories=None,
            gates=None) -> dict:
    if body.stream_options is not None and not body.stream:
        raise bad("stream_options", "'stream_options' needs 'stream': true")
    steer = _steer(body.steer, vectors, conditions, controllers, saes, gates)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > MAX_STOPS:
        raise bad("stop", f"'stop' takes at most {MAX_STOPS} strings, got {len(stop)}")
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit() and len(key) <= 18):
            raise bad("logit_bias", f"logit_bias keys are token ids written as strings, got {key!r}")
        bias[int(key)] = value
    sampling = dict(temperature=body.temperature, top_p=body.top_p, top_k=max(0, body.top_k), min_p=body.min_p,
                    repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                    frequency_penalty=body.frequency_penalty, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
                    logit_bias=tuple(sorted(bias.items())), stop=stop, **_block(body, corpus))
    given = {k for k in body.model_fields_set if getattr(body, k) is not None}
    inherit = {k: sampling.get(k, getattr(body, k)) for k in REQUEST_KNOBS if k in given}
    if "stop" in inherit:
        inherit["stop"] = list(stop)
    strategy = read_strategy(body.strategy, inherit, memories)
    if strategy is not None and body.stream:
        raise bad("stream", "a strategy answers once, when it has chosen: send it with 'stream': false")
    contrast = None
    if body.logit_contrast is not None:
        try:
            contrast = LogitContrast.parse(body.logit_contrast.model_dump())
        except SteerscaleError as exc:
            raise bad("logit_contrast", exc.problem) from None
    return dict(n=body.n, seed=body.seed, steer=steer, strategy=strategy, stream=body.stream,
                include_usage=bool(body.stream_options and body.stream_options.include_usage),
                include_stop=body.include_stop_str_in_output, sampling=sampling, logit_contrast=contrast)


# options that name a file on the server's disk (a judge's meta probe, a program stage's handbook or router): a
# client must not make the server open paths it chooses (and learn from the errors which exist)
SERVER_FILE_KEYS = ("meta_probe", "path")


def _names_server_file(value) -> str | None:
    """The first key of ``value`` (nested dicts and lists, inline program JSON) that names a server file."""
    if isinstance(value, str) and value.strip().startswith(("{", "[")):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, dict):
        for key, inner in value.items():
            if key in SERVER_FILE_KEYS:
                return key
            found = _names_server_file(inner)
            if found:
                return found
    if isinstance(value, list):
        return next((found for inner in value if (found := _names_server_file(inner))), None)
    return None


@dataclass(frozen=True)
class ProgramMemory:
    """A program stage's file (a behaviour handbook, concept memory or prompt router JSON that ``steerscale
    program`` wrote) registered by the server's operator (``steerscale serve --memory NAME=PATH``): a request's
    stage names it ``{"memory": NAME}`` instead of a path. Served read-only: one tenant's run must not change what
    another's retrieves."""

    path: Path

    @classmethod
    def load(cls, path) -> "ProgramMemory":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SteerscaleError(f"program memory {path} is not a readable JSON file ({exc})",
                                  "give a handbook, concept memory or router file written by steerscale program")
        if not isinstance(data, dict):
            raise SteerscaleError(f"program memory {path} holds {type(data).__name__}, not a JSON object",
                                  "give a handbook, concept memory or router file written by steerscale program")
        return cls(path.resolve())

    def check(self, layout) -> None:  # the stage checks the file against the model when it runs
        return None

    def card(self) -> dict:
        return {"object": "program_memory", "file": self.path.name}


def _served_memories(strategy: dict, memories: dict) -> dict:
    """``strategy`` with each program stage's ``{"memory": NAME}`` read as the registered file's path; a stage that
    would write to it (``"update": true``) is refused."""
    program = strategy.get("program")
    if not isinstance(program, str) or not program.strip().startswith("{"):
        return strategy
    try:
        tree = json.loads(program)
    except ValueError:
        return strategy  # the program parser names the JSON error

    def resolve(value):
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if not isinstance(value, dict):
            return value
        out = {k: resolve(v) for k, v in value.items()}
        if "memory" in out:
            name = out.pop("memory")
            if not isinstance(name, str) or name not in memories:
                known = ", ".join(sorted(memories)) or "(none: the operator registers them with --memory NAME=PATH)"
                raise bad("strategy", f"program memory {name!r} is not registered on this server; it has: {known}")
            if out.get("update"):
                raise bad("strategy", f"program memory {name!r} is shared by every request, so it is read-only here: "
                                      "drop \"update\" (update a memory with steerscale program locally)")
            out["path"] = str(memories[name].path)
        return out

    return {**strategy, "program": json.dumps(resolve(tree))}


def _check_no_server_files(strategy: dict) -> None:
    found = _names_server_file(strategy)
    if found:
        raise bad("strategy", f"{found!r} names a file on the server, which a request may not do; run it locally "
                              "(steerscale solve) or register it with the server's operator")
    program = strategy.get("program")
    if isinstance(program, str) and not program.strip().startswith("{"):
        from ..scale.programs import PROGRAMS

        if program not in PROGRAMS:
            raise bad("strategy", f"program {program!r} is not a registered program: a request gives a program's "
                                  f"name ({', '.join(PROGRAMS)}) or its JSON, never a file on the server")


def read_strategy(strategy: dict | None, inherit: dict, memories: dict | None = None) -> StrategySpec | None:
    """The ``strategy`` field as a checked ``StrategySpec`` (None when absent); any problem is a 400 naming it.
    ``memories``: the program memories the operator registered (``ProgramMemory`` by name)."""
    if strategy is None:
        return None
    if not isinstance(strategy.get("name"), str):
        raise bad("strategy", "'strategy' needs a \"name\" (e.g. best_of_n, majority, beam_search)")
    _check_no_server_files(strategy)
    strategy = _served_memories(strategy, memories or {})
    scalars = (str, int, float, bool, type(None))
    for key, value in strategy.items():
        if key in ("verifier_opts", "verifier_options", "reference", "budget"):
            continue
        if not isinstance(value, scalars) and not (isinstance(value, list) and all(isinstance(v, scalars)
                                                                                   for v in value)):
            raise bad("strategy", f"strategy knob {key!r} must be a number, string, boolean or an array of them")
    try:
        return StrategySpec.from_json(strategy, inherit=inherit)
    except SteerscaleError as exc:
        raise bad("strategy", exc.problem + (f" ({exc.hint})" if exc.hint else "")) from None


def parse_completion(body: CompletionRequest, *, max_n: int, vectors, conditions=None, controllers=None,
                     corpus=None, saes=None, memories=None, gates=None) -> GenRequest:
    p = body.prompt
    if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
        prompts = [p]
    else:
        prompts = list(p)
    if not prompts:
        raise bad("prompt", "'prompt' must be a string, a non-empty array of strings, or token ids")
    if len(prompts) * body.n > max_n:
        raise bad("n", f"{len(prompts)} prompt(s) x n={body.n} choices; this server returns at most {max_n}")
    common = _common(body, vectors, conditions or {}, controllers or {}, corpus, saes, memories, gates)
    k = body.logprobs
    if body.max_tokens == 0 and not body.echo:
        raise bad("max_tokens", "'max_tokens' must be >= 1 (0 only with echo, to score the prompt)")
    if common["strategy"] is not None and (len(prompts) != 1 or body.n != 1 or body.echo or k is not None
                                           or not isinstance(prompts[0], str)):
        raise bad("strategy", "a strategy answers one text prompt with one choice: drop n, echo and logprobs, and "
                              "put the strategy's own n inside \"strategy\"")
    if body.stream and (body.echo or k is not None):
        raise bad("stream", "streaming sends the generated text only: use 'stream': false for echo or log-probs")
    return GenRequest(prompts, max_tokens=body.max_tokens, top_logprobs=k,
                      echo=body.echo, add_special_tokens=True if body.add_special_tokens is None
                      else body.add_special_tokens, **common)


def chat_messages(body: ChatRequest) -> list[dict]:
    """The messages as ``{"role", "content"}`` dicts for a chat template (``developer`` is OpenAI's newer name for
    ``system``; text parts are joined)."""
    out = []
    for m in body.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def parse_chat(body: ChatRequest, *, max_n: int, vectors, conditions=None, controllers=None,
               corpus=None, saes=None, memories=None, gates=None) -> GenRequest:
    if body.n > max_n:
        raise bad("n", f"n={body.n}; this server returns at most {max_n} choices")
    messages = chat_messages(body)
    common = _common(body, vectors, conditions or {}, controllers or {}, corpus, saes, memories, gates)
    if body.max_tokens == 0:
        raise bad("max_tokens", "'max_tokens' must be >= 1")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    if body.stream and body.logprobs:
        raise bad("stream", "streaming sends the generated text only: use 'stream': false for log-probs")
    if common["strategy"] is not None:
        if body.n != 1 or body.logprobs:
            raise bad("strategy", "a strategy answers with one choice: drop n and logprobs (the strategy's own n goes "
                                  "inside \"strategy\")")
        if len(messages) != 1 or messages[0]["role"] != "user":
            raise bad("messages", "with a strategy, send one user message (the strategy formats it with the chat "
                                  "template, as `steerscale solve` does)")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return GenRequest([messages], max_tokens=max_tokens, top_logprobs=(body.top_logprobs or 0) if body.logprobs
                      else None, echo=False, add_special_tokens=bool(body.add_special_tokens), **common)
