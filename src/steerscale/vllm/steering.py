"""What a request asks of steerscale inside vLLM, in the flat form vLLM carries (no vLLM import here).

A request names registered vectors with a scale and a token scope: ``"NAME:SCALE[:SCOPE]"`` strings, one per
entry, applied in order (``formal:4``, ``honest:-2:generated``), as ``SamplingParams.extra_args["steer"]`` offline
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


def parse_steer(spec) -> list[tuple[str, float, str]]:
    """``"a:4,b:-2:generated"`` or ``["a:4", "b:-2:generated"]`` (or ``(name, scale[, scope])`` tuples) as
    ``[(name, scale, scope)]``; anything malformed is a ``SteerscaleError`` naming the entry."""
    if spec is None:
        return []
    items = [s for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        parts = item.strip().split(":") if isinstance(item, str) else list(item)
        if not 2 <= len(parts) <= 3:
            raise SteerscaleError(f"bad steer entry {item!r}",
                                  'write "NAME:SCALE" or "NAME:SCALE:SCOPE", e.g. "formal:4"')
        name, scale, scope = str(parts[0]).strip(), parts[1], (str(parts[2]).strip() if len(parts) == 3 else "all")
        if not NAME.fullmatch(name):
            raise SteerscaleError(f"bad vector name {name!r} in steer entry {item!r}",
                                  "use 1-128 letters, digits, '_', '.' and '-'")
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise SteerscaleError(f"steer entry {item!r}: scale {scale!r} is not a number") from None
        if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
            raise SteerscaleError(f"steer entry {item!r}: scale must be finite with |scale| <= {MAX_SCALE:g}")
        if scope not in SCOPES:
            raise SteerscaleError(f"steer entry {item!r}: unknown scope {scope!r}", f"use one of {', '.join(SCOPES)}")
        out.append((name, scale, scope))
    return out


def format_steer(entries) -> list[str]:
    """The ``"NAME:SCALE:SCOPE"`` strings of ``entries`` (checked), for ``extra_args`` / ``vllm_xargs``."""
    return [f"{name}:{scale!r}:{scope}" for name, scale, scope in parse_steer(entries)]


def cache_salt(entries, digests: dict[str, str] | None = None) -> str | None:
    """The prefix-cache salt of a request steered with ``entries`` (None: unsteered, share the cache). ``digests``
    (name -> content digest) makes a re-registered vector of the same name a different salt."""
    entries = parse_steer(entries)
    if not entries:
        return None
    key = ";".join(f"{n}#{(digests or {}).get(n, '')}:{s!r}:{c}" for n, s, c in entries)
    return "steerscale-" + hashlib.sha256(key.encode()).hexdigest()[:32]
