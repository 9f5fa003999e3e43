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
import math
import re

from ..errors import SteerscaleError

STEER_KEY = "steer"  # the extra_args / vllm_xargs key
SCOPES = ("all", "prompt", "generated")
MAX_SCALE = 1e3  # as the steerscale server's cap: far past any useful strength, short of overflowing activations
NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


def parse_steer(spec) -> list[tuple[str, float | tuple[str, float], str]]:
    """``"a:4,b:ablate:generated"`` or ``["a:4", "b:=2"]`` (or ``(name, op[, scope])`` tuples) as
    ``[(name, op, scope)]``, op a float scale (add) or ``("set", value)`` (ablate: value 0); anything malformed is a
    ``SteerscaleError`` naming the entry."""
    if spec is None:
        return []
    items = [s for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        if not isinstance(item, (str, list, tuple)):
            raise SteerscaleError(f"bad steer entry {item!r}: not a string",
                                  'write "NAME:OP" or "NAME:OP:SCOPE", e.g. "formal:4"')
        parts = item.strip().split(":") if isinstance(item, str) else list(item)
        if not 2 <= len(parts) <= 3:
            raise SteerscaleError(f"bad steer entry {item!r}",
                                  'write "NAME:OP" or "NAME:OP:SCOPE", OP a scale, "ablate" or "=VALUE", e.g. '
                                  '"formal:4"')
        name, scale, scope = str(parts[0]).strip(), parts[1], (str(parts[2]).strip() if len(parts) == 3 else "all")
        if not NAME.fullmatch(name):
            raise SteerscaleError(f"bad vector name {name!r} in steer entry {item!r}",
                                  "use 1-128 letters, digits, '_', '.' and '-'")
        scale = _op(scale, item)
        if scope not in SCOPES:
            raise SteerscaleError(f"steer entry {item!r}: unknown scope {scope!r}", f"use one of {', '.join(SCOPES)}")
        out.append((name, scale, scope))
    return out


# steerscale server request fields that the vLLM path does not run: sent in vllm_xargs they are refused (400), never
# silently ignored (the vector would otherwise be applied unconditionally)
UNSUPPORTED_KEYS = {
    "condition": "CAST conditions", "condition_rule": "CAST conditions", "controller": "learned controllers",
    "gate": "token gates", "logit_contrast": "logit contrast", "strategy": "scaling strategies",
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


def _op(op, item):
    """A scale (float), or ``("set", value)`` from ``ablate`` / ``=VALUE`` / a ``("set", value)`` tuple."""
    if isinstance(op, tuple) and len(op) == 2 and op[0] == "set":
        op = f"={op[1]}"
    text = op.strip() if isinstance(op, str) else op
    setting = isinstance(text, str) and (text == "ablate" or text.startswith("="))
    raw = 0.0 if text == "ablate" else text[1:] if setting else text
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise SteerscaleError(f"steer entry {item!r}: {op!r} is not a scale, 'ablate' or '=VALUE'") from None
    if not math.isfinite(value) or abs(value) > MAX_SCALE:
        raise SteerscaleError(f"steer entry {item!r}: the value must be finite with |value| <= {MAX_SCALE:g}")
    return ("set", value) if setting else value


def _op_text(op) -> str:
    if isinstance(op, tuple):
        return "ablate" if op[1] == 0 else f"={op[1]!r}"
    return repr(op)


def format_steer(entries) -> list[str]:
    """The ``"NAME:OP:SCOPE"`` strings of ``entries`` (checked), for ``extra_args`` / ``vllm_xargs``."""
    return [f"{name}:{_op_text(op)}:{scope}" for name, op, scope in parse_steer(entries)]


def cache_salt(entries, digests: dict[str, str] | None = None, prompt=None) -> str | None:
    """The salt ``request_salt`` gives a request steered with ``entries`` and no client salt (None: unsteered).
    Clients need not send it: steerscale's plugin derives it in vLLM's front end; it is kept for callers that want
    to know the salt a request will get."""
    return request_salt(entries, (), digests, prompt)
