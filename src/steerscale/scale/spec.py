"""Where a strategy request is parsed: ``StrategySpec``, one frozen, typed description of a scaling strategy run.

A spec is a strategy name, its knobs, a verifier with its options (and reference), and a budget. It is checked
once, when it is built, whatever it was built from:

* ``StrategySpec.of(name, verifier=..., budget=..., **knobs)``: from Python keywords;
* ``StrategySpec.from_json({"name": ..., "n": 8, "verifier": ..., "budget": "tokens=2000"})``: the server's
  ``strategy`` field (``inherit=`` passes the request's own sampling fields to the knobs the strategy takes);
* ``StrategySpec.from_args(args)``: ``steerscale solve`` / ``steerscale eval --strategy``.

An unknown strategy, verifier or knob, a knob of the wrong type, a bad value (e.g. ``temperature=-1``) or a
malformed budget is a ``SteerscaleError`` that names the field and lists the valid ones (with "did you mean").
Each strategy's knobs are read from its function's keyword arguments (their defaults give the types; a
``Choice`` default gives the valid values) plus the sampling knobs every strategy passes to the backend.

``spec.run(prompt, backend)`` builds the verifier and a fresh budget ledger and runs the registered strategy;
the CLI, the server and ``evaluate`` all call it, so a strategy request means the same thing everywhere.
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from ..errors import SteerscaleError
from .backend import DEFAULT_STEP, SamplingParams
from .budget import Budget
from .strategies import STRATEGIES
from .strategies.base import SAMPLING_KNOBS, Choice, Result
from .verifiers import check_options, get_verifier, parse_options, parse_value

#: arguments of a strategy function that are not knobs: the run's context, and code (never JSON)
CONTEXT_ARGS = ("prompt", "backend", "verifier", "budget", "answer_fn")
_SAMPLING_DEFAULTS = {f: getattr(SamplingParams(), f) for f in SAMPLING_KNOBS}


@dataclass(frozen=True)
class Knob:
    """One knob of a strategy: its name, default, and the type its values must have."""

    name: str
    default: Any

    def check(self, value, strategy: str):
        """``value`` converted to the knob's type, or a ``SteerscaleError`` naming the knob."""
        d, name = self.default, self.name

        def wrong(what):
            return SteerscaleError(f"strategy {strategy!r} knob {name!r} must be {what}, got {value!r}")

        if isinstance(d, Choice):
            try:
                return type(d).parse(value)
            except SteerscaleError as exc:
                raise SteerscaleError(f"strategy {strategy!r} knob {name!r}: {exc.problem}", exc.hint) from None
        if name == "stop":
            stops = [value] if isinstance(value, str) else () if value is None else value
            if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
                raise wrong("a string or a list of strings")
            return tuple(stops)
        if name in ("step", "seed") and value is None:  # no step delimiter / an unseeded run
            return None
        if isinstance(d, bool):
            if not isinstance(value, bool):
                raise wrong("true or false")
            return value
        if isinstance(d, int) or name == "seed":
            if isinstance(value, bool) or not isinstance(value, int):
                raise wrong("an integer")
            if name == "seed" and not 0 <= value < 2**63:
                raise wrong("an integer in [0, 2**63)")
            return value
        if isinstance(d, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise wrong("a finite number")
            return float(value)
        if isinstance(d, str) or name == "step":
            if not isinstance(value, str):
                raise wrong("a string")
            return value
        return value


def strategy_knobs(name: str) -> dict[str, Knob]:
    """The knobs strategy ``name`` takes (its own, then the sampling knobs), by name."""
    fn = STRATEGIES[name]
    out: dict[str, Knob] = {}
    takes_sampling = False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            takes_sampling = True
        elif p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in CONTEXT_ARGS:
            out[p.name] = Knob(p.name, p.default)
    if takes_sampling:
        for k, default in _SAMPLING_DEFAULTS.items():
            out.setdefault(k, Knob(k, default if k != "step" else DEFAULT_STEP))
    return out


def _frozen(d: Mapping | None) -> Mapping:
    return MappingProxyType(dict(d or {}))


def _budget_limits(budget) -> dict:
    """Limits from a ``Budget``, a ``"tokens=2000,wall=60"`` text, a ``{"tokens": 2000}`` dict or None."""
    if budget is None:
        return {}
    if isinstance(budget, Budget):
        return dict(budget.limits)
    if isinstance(budget, str):
        return Budget.parse(budget).limits
    if isinstance(budget, Mapping):
        return Budget(dict(budget)).limits
    raise SteerscaleError(f"strategy budget must be text such as \"tokens=2000\" or an object {{\"tokens\": 2000}}, "
                          f"got {budget!r}")


@dataclass(frozen=True)
class StrategySpec:
    """A checked strategy request. Build it with ``of``, ``from_json`` or ``from_args``; run it with ``run``."""

    name: str
    knobs: Mapping[str, Any] = field(default_factory=dict)
    verifier: str | None = None
    verifier_options: Mapping[str, Any] = field(default_factory=dict)
    reference: Any = None
    budget: Mapping[str, float] = field(default_factory=dict)  # limits per run (each run gets a fresh ledger)

    def __post_init__(self):
        name = STRATEGIES.canonical(self.name)  # unknown: lists the strategies, "did you mean"
        object.__setattr__(self, "name", name)
        known = strategy_knobs(name)
        knobs = {}
        for key, value in dict(self.knobs).items():
            if key not in known:
                close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
                guess = f"; did you mean {close[0]!r}?" if close else ""
                raise SteerscaleError(f"strategy {name!r} has no knob {key!r}{guess}",
                                      f"its knobs: {', '.join(sorted(known))}")
            knobs[key] = known[key].check(value, name)
        sampling = {k: v for k, v in knobs.items() if k in SAMPLING_KNOBS}
        SamplingParams(**sampling)  # values in range (temperature >= 0, ...), before any model work
        object.__setattr__(self, "knobs", _frozen(knobs))
        if self.verifier is not None:
            if not isinstance(self.verifier, str):
                raise SteerscaleError(f"verifier must be a registered name, got {self.verifier!r}",
                                      "pass a Verifier object to run(verifier=...) instead")
            check_options(self.verifier, dict(self.verifier_options))
        elif self.verifier_options:
            raise SteerscaleError("verifier options given without a verifier", "name the verifier, e.g. pairwise")
        object.__setattr__(self, "verifier_options", _frozen(self.verifier_options))
        object.__setattr__(self, "budget", _frozen(_budget_limits(self.budget)))

    # -- constructors -----------------------------------------------------------------------------------------
    @classmethod
    def of(cls, name: str, *, verifier: str | None = None, verifier_options: Mapping | str | None = None,
           reference=None, budget=None, **knobs) -> "StrategySpec":
        """From Python keywords: ``StrategySpec.of("majority", n=8, temperature=0.7, budget="tokens=2000")``."""
        return cls(name, knobs, verifier, parse_options(verifier_options, "verifier options"), reference, budget)

    @classmethod
    def from_json(cls, obj, *, inherit: Mapping | None = None) -> "StrategySpec":
        """From a JSON object (the server's ``strategy`` field): ``name``, ``verifier``, ``verifier_opts`` (or
        ``verifier_options``), ``reference``, ``budget``; every other key is a knob. ``inherit``: request fields
        (``max_tokens``, ``temperature``, ...) given to the knobs of those names that the strategy takes and the
        object does not set."""
        if not isinstance(obj, Mapping):
            raise SteerscaleError(f"a strategy is a JSON object with a \"name\", got {obj!r}")
        obj = dict(obj)
        name = obj.pop("name", None)
        if not isinstance(name, str):
            raise SteerscaleError("a strategy needs a \"name\"", f"e.g. one of: {', '.join(STRATEGIES)}")
        verifier = obj.pop("verifier", None)
        options = obj.pop("verifier_opts", None)
        options = obj.pop("verifier_options", None) if options is None else options
        if options is not None and not isinstance(options, (Mapping, str)):
            raise SteerscaleError(f"\"verifier_opts\" must be an object, got {options!r}")
        reference, budget = obj.pop("reference", None), obj.pop("budget", None)
        known = strategy_knobs(STRATEGIES.canonical(name))
        for key, value in (inherit or {}).items():
            if key in known and key not in obj and value is not None:
                obj[key] = value
        return cls(name, obj, verifier, parse_options(options, "verifier options"), reference, budget)

    @classmethod
    def from_args(cls, args) -> "StrategySpec":
        """From parsed CLI arguments: ``--strategy``, ``--verifier``, ``--verifier-opt K=V``, ``--reference``,
        ``--budget``, ``--knob K=V`` and the sampling flags (``-n``, ``--max-tokens``, ``--temperature``, ``--seed``,
        ``--step``, ``--stop``); flags left unset keep the strategy's own defaults."""
        knobs = {}
        for item in getattr(args, "knob", None) or []:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise SteerscaleError(f"bad --knob {item!r}", "write KEY=VALUE, e.g. --knob width=4")
            knobs[key.strip()] = [parse_value(v) for v in value.split("|")] if key.strip() == "stop" \
                else parse_value(value)
        flags = {"n": "n", "max_tokens": "max_tokens", "temperature": "temperature", "seed": "seed", "step": "step"}
        for knob, attr in flags.items():
            value = getattr(args, attr, None)
            if value is not None:
                if knob == "step":  # '' on the command line: no step delimiter
                    value = _unescape(value) or None
                knobs.setdefault(knob, value)
        if getattr(args, "stop", None):
            knobs.setdefault("stop", [_unescape(s) for s in args.stop])
        options = {}
        for item in getattr(args, "verifier_opt", None) or []:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise SteerscaleError(f"bad --verifier-opt {item!r}", "write KEY=VALUE, e.g. --verifier-opt weight=0.2")
            options[key.strip()] = parse_value(value)
        if options and getattr(args, "verifier", None) is None:
            raise SteerscaleError("--verifier-opt given without --verifier", "name the verifier, e.g. --verifier pairwise")
        return cls(args.strategy, knobs, getattr(args, "verifier", None), options, getattr(args, "reference", None),
                   getattr(args, "budget", None) or None)

    # -- use ----------------------------------------------------------------------------------------------------
    def new_budget(self) -> Budget:
        """A fresh ledger with this spec's limits (one per run: evaluation gives every example its own)."""
        return Budget(dict(self.budget))

    def with_knobs(self, **knobs) -> "StrategySpec":
        """A copy with ``knobs`` set (checked like the others)."""
        return StrategySpec(self.name, {**self.knobs, **knobs}, self.verifier, self.verifier_options, self.reference,
                            self.budget)

    def run(self, prompt: str, backend, *, reference=None, verifier=None, budget: Budget | None = None,
            answer_fn: Callable[[str], str | None] | None = None) -> Result:
        """Run the strategy on ``prompt`` with ``backend``. ``reference`` overrides the spec's (per example);
        ``verifier`` (a ``Verifier`` object) and ``budget`` (a ledger) replace what the spec would build;
        ``answer_fn`` reads each candidate's answer (evaluation passes the task's own reader)."""
        if verifier is None and self.verifier is not None:
            ref = reference if reference is not None else self.reference
            verifier = get_verifier(self.verifier, reference=ref, backend=backend, **self.verifier_options)
        budget = budget if budget is not None else self.new_budget()
        return STRATEGIES[self.name](prompt, backend, verifier, budget, answer_fn=answer_fn, **self.knobs)

    def to_dict(self) -> dict:
        """A JSON-safe description (run configs, cache keys, responses)."""
        return {"name": self.name, "knobs": {k: list(v) if isinstance(v, tuple) else v for k, v in self.knobs.items()},
                "verifier": self.verifier, "verifier_options": dict(self.verifier_options),
                "budget": dict(self.budget)}


def _unescape(text: str) -> str:
    """``"\\\\n\\\\n"`` typed on a command line -> two newlines."""
    return text.encode().decode("unicode_escape") if isinstance(text, str) else text


def run_strategy(name: str, prompt: str, backend, verifier=None, budget: Budget | None = None, **knobs) -> Result:
    """Run strategy ``name`` with ``knobs`` checked as ``StrategySpec`` checks them (an unknown or mistyped knob is a
    ``SteerscaleError`` before any sampling); ``verifier`` is a ``Verifier`` object (or None), ``budget`` a ledger
    (default: unlimited); ``answer_fn`` (text -> answer) may be among the knobs."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise SteerscaleError("empty prompt", "pass a non-empty prompt text")
    answer_fn = knobs.pop("answer_fn", None)
    return StrategySpec.of(name, **knobs).run(prompt, backend, verifier=verifier, budget=budget, answer_fn=answer_fn)
