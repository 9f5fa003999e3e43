"""What a request asks of steerscale inside vLLM, in the flat form vLLM carries (no vLLM import here).

A request names registered vectors with an operation and a token scope: ``"NAME:OP[:SCOPE]"`` strings, one per
entry, applied in order. OP is a scale (``formal:4``: add 4 x the vector, the ``Add`` edit), ``ablate``
(``refusal:ablate``: project the vector's direction out, ``Ablate``) or ``=VALUE`` (``refusal:=2.5``: set the
component along the direction to VALUE, ``SetProjection``); ``honest:-2:generated`` edits generated tokens only.
They travel as ``SamplingParams.extra_args["steer"]`` offline
or ``"vllm_xargs": {"steer": [...]}`` in an OpenAI request to ``vllm serve`` (vLLM's ``vllm_xargs`` take strings,
numbers and flat lists only, hence strings). A comma-separated string is the same list.

Tenant safety is the server's job, not the client's: ``check_extra_args`` is what vLLM's front end runs on every
request (``frontend.py``): anything the workers cannot run exactly is refused there with a 400 that names the field,
and ``request_salt`` derives the prefix-cache salt from the request's steering (and any salt the client sent), so
no request can read KV blocks computed under other steering, whatever its client sends.
"""

from __future__ import annotations

import hashlib

from ..errors import SteerscaleError
from ..steer.grammar import entries_from_objects, format_steer, parse_steer

STEER_KEY = "steer"  # the extra_args / vllm_xargs key

# steerscale server request fields that the vLLM path does not run: sent in vllm_xargs they are refused (400), never
# silently ignored (the vector would otherwise be applied unconditionally)
UNSUPPORTED_KEYS = {
    "condition": "CAST conditions", "condition_rule": "CAST conditions", "controller": "learned controllers",
    "gate": "token gates", "logit_contrast": "logit contrast", "strategy": "scaling strategies",
    "block_corpus": "provenance-aware decoding",
    "vector": "steer entries as objects", "scale": "steer entries as objects", "scope": "steer entries as objects",
}


def check_extra_args(extra_args) -> list[tuple[str, float | tuple[str, float], str]]:
    """The steer entries of a request's ``extra_args`` / ``vllm_xargs``, checked: a malformed ``steer`` value or a
    steerscale field the vLLM path cannot run is a ``SteerscaleError`` whose problem starts with the field's name."""
    if not extra_args:
        return []
    for key in extra_args:
        if key in UNSUPPORTED_KEYS or (key.startswith("steer") and key != STEER_KEY):
            what = UNSUPPORTED_KEYS.get(key, "this field")
            raise SteerscaleError(f"vllm_xargs.{key}: {what} do not run inside vLLM",
                                  'send plain steer entries ("NAME:OP[:SCOPE]") here, or serve the request with '
                                  "`steerscale serve`, which runs them")
    spec = extra_args.get(STEER_KEY)
    if spec is None:
        return []
    if not isinstance(spec, (str, list, tuple)) or (
            isinstance(spec, (list, tuple)) and not all(isinstance(s, (str, list, tuple)) for s in spec)):
        raise SteerscaleError(f"vllm_xargs.steer must be a string or a list of strings, not {type(spec).__name__}",
                              'e.g. "steer": ["formal:4", "refusal:ablate:generated"]')
    try:
        return parse_steer(spec)
    except SteerscaleError as exc:
        raise SteerscaleError(f"vllm_xargs.steer: {exc.problem}", exc.hint) from None


# steerscale serve's top-level request fields, as vLLM's API server receives them (its request models keep unknown
# fields): "steer" is translated, the others are refused rather than silently ignored
BODY_FIELDS = {"steer": None, "logit_contrast": "logit contrast", "strategy": "scaling strategies",
               "block_corpus": "provenance-aware decoding"}


def body_extra_args(fields: dict | None, extra_args: dict | None) -> dict | None:
    """``extra_args`` with the steering of a request body written in ``steerscale serve``'s grammar (the top-level
    ``steer`` field: objects or strings), so one request body works on both servers."""
    fields = {k: v for k, v in (fields or {}).items() if k in BODY_FIELDS}
    if not fields:
        return extra_args
    for key, what in BODY_FIELDS.items():
        if key in fields and what:
            raise SteerscaleError(f"{key}: {what} do not run inside vLLM", "serve the request with `steerscale serve`")
    if STEER_KEY in (extra_args or {}):
        raise SteerscaleError("steer: given both as a field and in vllm_xargs", "give it once")
    for i, item in enumerate(fields[STEER_KEY] if isinstance(fields[STEER_KEY], list) else []):
        for key in sorted(set(item) & {"condition", "condition_rule", "controller", "gate"}) if isinstance(
                item, dict) else ():
            raise SteerscaleError(f"steer[{i}].{key}: {UNSUPPORTED_KEYS[key]} do not run inside vLLM",
                                  "steer with plain vectors here, or serve the request with `steerscale serve`")
    entries = entries_from_objects(fields[STEER_KEY])
    return {**(extra_args or {}), STEER_KEY: format_steer(entries)} if entries else extra_args


def request_salt(entries, engine_wide=(), digests: dict[str, str] | None = None, prompt=None,
                 client_salt: str | None = None) -> str | None:
    """The prefix-cache salt the server gives a request. ``entries`` are its own steer entries, ``engine_wide`` the
    steering every request gets, ``digests`` (name -> content digest) tell a re-registered vector of the same name
    apart, ``client_salt`` is whatever the client sent. None only for an unsteered request without a client salt
    (such requests share the cache, as in plain vLLM). Plain and steered requests are hashed in separate domains,
    so no choice of client salt can make one read the other's blocks."""
    steering = list(engine_wide) + parse_steer(entries)
    if not steering:
        return None if client_salt is None else "steerscale-p-" + _digest(f"plain|{client_salt}")
    key = ";".join(f"{n}#{(digests or {}).get(n, '')}:{s!r}:{c}" for n, s, c in steering)
    if any(scope != "all" for _, _, scope in steering):
        # which tokens a scoped entry edits depends on where the prompt ends: a later prompt that extends this one
        # (a chat's next turn) must not reuse its blocks, so the prompt is part of the salt
        if prompt is None:
            raise SteerscaleError("a steer entry scoped to the prompt or to generated tokens needs the prompt in its "
                                  "cache salt", "pass prompt= (its text or token ids)")
        key += "|" + repr(list(prompt) if not isinstance(prompt, str) else prompt)
    return "steerscale-s-" + _digest(f"steer|{key}|{client_salt}")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_salt(entries, digests: dict[str, str] | None = None, prompt=None) -> str | None:
    """The salt ``request_salt`` gives a request steered with ``entries`` and no client salt (None: unsteered).
    Clients need not send it: steerscale's plugin derives it in vLLM's front end; it is kept for callers that want
    to know the salt a request will get."""
    return request_salt(entries, (), digests, prompt)
