"""The one steering grammar of requests: what a steer entry may say, in every place that takes one (``steerscale
serve``'s ``steer`` field, steerscale's vLLM plugin, ``SteeredLLM``). The vector name rule, the scale cap and the
scopes are defined here once.

An entry names a registered vector, an operation and a token scope. As a string: ``"NAME:OP[:SCOPE]"``, OP a scale
(``formal:4``: add 4 x the vector), ``ablate`` (project the vector's direction out) or ``=VALUE`` (set the component
along the direction to VALUE); ``honest:-2:generated`` edits generated tokens only. As an object (the JSON form
``steerscale serve`` documents): ``{"vector": NAME, "scale": 4, "scope": "generated"}``, or ``{"vector": NAME,
"op": "ablate"}`` / ``{"vector": NAME, "op": "set", "value": 2.5}``. Both parse to ``(name, op, scope)`` tuples, op
a float scale or ``("set", value)`` (ablate: value 0).
"""

from __future__ import annotations

import math
import re

from ..errors import SteerscaleError

SCOPES = ("all", "prompt", "generated")
MAX_SCALE = 1e3  # |scale| and |value|: far past any useful strength, far short of overflowing a float32 activation
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


VECTOR_NAME = r"^[A-Za-z0-9_.\-]{1,128}$"  # NAME as a JSON-schema pattern
OBJECT_KEYS = {"vector", "scale", "scope", "op", "value"}
SAE_KEYS = {"layer", "index", "strength"}  # an SAE feature in Neuronpedia's shape: steerscale serve --sae only


def entries_from_objects(items, field: str = "steer") -> list[tuple[str, float | tuple[str, float], str]]:
    """Steer entries written as JSON objects (or strings), each checked; an error names ``field[i].key``."""
    if not isinstance(items, list):
        raise SteerscaleError(f"{field} must be a list of entries, not {type(items).__name__}",
                              'e.g. [{"vector": "formal", "scale": 4}] or ["formal:4"]')
    out = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if isinstance(item, str):
            try:
                out += parse_steer([item])
            except SteerscaleError as exc:
                raise SteerscaleError(f"{where}: {exc.problem}", exc.hint) from None
            continue
        if not isinstance(item, dict):
            raise SteerscaleError(f"{where} must be an object or a string, not {type(item).__name__}")
        extra = set(item) - OBJECT_KEYS
        if extra & SAE_KEYS:
            raise SteerscaleError(f"{where}.{sorted(extra & SAE_KEYS)[0]}: SAE features are not steered here",
                                  "steerscale serve --sae runs them (added or clamped); here, save the feature as a "
                                  "vector (steerscale sae vector) and steer with it by name")
        if extra:
            raise SteerscaleError(f"{where}.{sorted(extra)[0]}: not a field of a steer entry here",
                                  f"fields: {', '.join(sorted(OBJECT_KEYS))}")
        name, scope, op = item.get("vector"), item.get("scope") or "all", item.get("op", "add")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise SteerscaleError(f"{where}.vector: {name!r} is not a vector name",
                                  "use 1-128 letters, digits, '_', '.' and '-'")
        if scope not in SCOPES:
            raise SteerscaleError(f"{where}.scope: unknown scope {scope!r}", f"use one of {', '.join(SCOPES)}")
        if op not in ("add", "ablate", "set"):
            raise SteerscaleError(f"{where}.op: unknown op {op!r}", "use add (with scale), ablate, or set (with value)")
        key, number = {"add": ("scale", item.get("scale", 1.0)), "ablate": ("value", 0.0),
                       "set": ("value", item.get("value"))}[op]
        if op != "add" and "scale" in item or op != "set" and "value" in item:
            raise SteerscaleError(f"{where}: op {op!r} takes {'no number' if op == 'ablate' else key}",
                                  "scale goes with add, value with set")
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                or abs(number) > MAX_SCALE:
            raise SteerscaleError(f"{where}.{key}: {number!r} must be a finite number with |{key}| <= {MAX_SCALE:g}")
        out.append((name, float(number) if op == "add" else ("set", float(number)), scope))
    return out


def check_op(op):
    """A steering op as Python passes it (a ``(vector, op, scope)`` entry): a finite scale, ``("set", value)``, or
    ``("clamp", value)`` (with an ``engine.plan.FeatureClamp``)."""
    if isinstance(op, bool) or not isinstance(op, (int, float, tuple)):
        raise SteerscaleError(f"steering scale must be a finite number or ('set', value), got {op!r}")
    if isinstance(op, tuple) and len(op) == 2 and op[0] == "clamp":
        value = op[1]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or abs(value) > MAX_SCALE:
            raise SteerscaleError(f"clamp value must be a finite number with |value| <= {MAX_SCALE:g}, got {value!r}")
        return ("clamp", float(value))
    try:
        return _op(op, op)
    except SteerscaleError:
        raise SteerscaleError(f"steering scale must be a finite number with |scale| <= {MAX_SCALE:g}, or "
                              f"('set', value), got {op!r}") from None


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


