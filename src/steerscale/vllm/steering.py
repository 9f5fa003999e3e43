"""What a request asks of steerscale inside vLLM, in the flat form vLLM carries (no vLLM import here).

A request names registered vectors with an operation and a token scope: ``"NAME:OP[:SCOPE]"`` strings, one per
entry, applied in order. OP is a scale (``formal:4``: add 4 x the vector, the ``Add`` edit), ``ablate``
(``refusal:ablate``: project the vector's direction out, ``Ablate``) or ``=VALUE`` (``refusal:=2.5``: set the
component along the direction to VALUE, ``SetProjection``); ``honest:-2:generated`` edits generated tokens only.
They travel as ``SamplingParams.extra_args["steer"]`` offline
or ``"vllm_xargs": {"steer": [...]}`` in an OpenAI request to ``vllm serve`` (vLLM's ``vllm_xargs`` take strings,
numbers and flat lists only, hence strings). A comma-separated string is the same list.

Its KV cache must never serve a request under other steering: ``cache_salt(entries)`` is the prefix-cache salt a
steered request sends (``SteeredLLM`` sends it for you; a ``vllm serve`` client sends it as ``"cache_salt"``).
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
    """The prefix-cache salt of a request steered with ``entries`` (None: unsteered, share the cache). ``digests``
    (name -> content digest) makes a re-registered vector of the same name a different salt. ``prompt`` (its text
    or token ids) is needed when an entry's scope is not ``all``: which tokens such an entry edits depends on where
    the prompt ends, so a later request whose prompt extends this one's text (a chat's next turn) must not reuse
    its cached blocks; the salt then covers the prompt too."""
    entries = parse_steer(entries)
    if not entries:
        return None
    key = ";".join(f"{n}#{(digests or {}).get(n, '')}:{s!r}:{c}" for n, s, c in entries)
    if any(scope != "all" for _, _, scope in entries):
        if prompt is None:
            raise SteerscaleError("a steer entry scoped to the prompt or to generated tokens needs the prompt in its "
                                  "cache salt", "pass prompt= (its text or token ids) to cache_salt")
        key += "|" + repr(prompt)
    return "steerscale-" + hashlib.sha256(key.encode()).hexdigest()[:32]
