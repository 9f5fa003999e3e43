"""One compute ledger for a search: every cost is charged here, in ``Budget.charge``, and nowhere else.

Currencies (any subset may be limited):

=====================  ====================================================================================
``prompt_tokens``      prompt tokens run through the model (a shared prefix encoded once counts once)
``generated_tokens``   tokens sampled by the generator (real tokens only; padding of finished rows is free)
``verifier_passes``    forward passes (or calls) made by a verifier / PRM / self-evaluation
``verifier_tokens``    tokens those passes read
``judge_calls``        LLM-as-judge calls
``flops``              estimated FLOPs: 2 x parameters x tokens, generator and verifier tokens included
``wall_seconds``       wall time since the budget was created (or ``restart()``)
=====================  ====================================================================================

The backend charges prompt/generated tokens and generator FLOPs; verifiers charge their own passes, tokens
and FLOPs. Strategies only *read* the ledger (``exhausted``, ``remaining``) to decide when to stop; every
``Result`` carries ``budget.report()``.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

from ..errors import SteerscaleError

CURRENCIES = ("prompt_tokens", "generated_tokens", "verifier_passes", "verifier_tokens", "judge_calls", "flops",
              "wall_seconds")
_IDS = itertools.count(1)
ALIASES = {"tokens": "generated_tokens", "gen": "generated_tokens", "prompt": "prompt_tokens",
           "wall": "wall_seconds", "seconds": "wall_seconds", "time": "wall_seconds", "judge": "judge_calls",
           "verifier": "verifier_passes"}


def _canonical(name: str) -> str:
    key = ALIASES.get(name, name)
    if key not in CURRENCIES:
        raise SteerscaleError(f"unknown budget currency {name!r}",
                              f"use one of: {', '.join(CURRENCIES)} (or tokens=, wall=)")
    return key


@dataclass
class Budget:
    """Limits (``None``: unlimited) and what has been spent so far."""

    limits: dict = field(default_factory=dict)
    _spent: dict = field(default_factory=dict, repr=False)
    _start: float = field(default_factory=time.perf_counter, repr=False)
    uid: int = field(default_factory=lambda: next(_IDS), repr=False, compare=False)  # never reused, unlike id()

    def __post_init__(self):
        clean = {}
        for name, value in dict(self.limits).items():
            if value is None:
                continue
            key = _canonical(name)
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise SteerscaleError(f"budget {key}={value!r} is not a number", "use e.g. tokens=20000") from None
            if not math.isfinite(v) or v <= 0:
                raise SteerscaleError(f"budget {key}={value!r} must be a positive finite number",
                                      "a zero or negative budget cannot buy any compute; omit the limit for none")
            clean[key] = v
        self.limits = clean
        self._spent = {c: 0.0 for c in CURRENCIES if c != "wall_seconds"}

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def of(cls, **limits) -> "Budget":
        """``Budget.of(tokens=20000, wall=60)``."""
        return cls(limits)

    @classmethod
    def parse(cls, text: str | None) -> "Budget":
        """``"tokens=20000,flops=1e12,wall=60"`` (the CLI's ``--budget``); empty or None: unlimited."""
        limits = {}
        for part in (text or "").replace(";", ",").split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, value = part.partition("=")
            if not sep:
                raise SteerscaleError(f"bad budget item {part!r}", "write NAME=VALUE, e.g. --budget tokens=20000")
            limits[name.strip()] = value.strip()
        return cls(limits)

    def restart(self) -> "Budget":
        """Zero the spending and the clock (limits are kept)."""
        self._spent = {c: 0.0 for c in self._spent}
        self._start = time.perf_counter()
        return self

    # -- the one place where compute is charged -------------------------------------------------------------
    def charge(self, *, prompt_tokens: int = 0, generated_tokens: int = 0, verifier_passes: int = 0,
               verifier_tokens: int = 0, judge_calls: int = 0, flops: float = 0.0) -> None:
        for key, value in (("prompt_tokens", prompt_tokens), ("generated_tokens", generated_tokens),
                           ("verifier_passes", verifier_passes), ("verifier_tokens", verifier_tokens),
                           ("judge_calls", judge_calls), ("flops", flops)):
            if value < 0:
                raise SteerscaleError(f"cannot charge a negative amount of {key} ({value})")
            self._spent[key] += value

    # -- reading --------------------------------------------------------------------------------------------
    def spent(self) -> dict:
        out = {k: (int(v) if k != "flops" else float(v)) for k, v in self._spent.items()}
        out["wall_seconds"] = round(time.perf_counter() - self._start, 4)
        return out

    def remaining(self) -> dict:
        """Remaining amount of each limited currency (never negative)."""
        spent = self.spent()
        return {k: max(0.0, lim - spent[k]) for k, lim in self.limits.items()}

    def remaining_of(self, key: str) -> float:
        """Remaining amount of one currency (``inf`` when it has no limit)."""
        key = _canonical(key)
        return self.remaining().get(key, math.inf)

    @property
    def exhausted(self) -> bool:
        spent = self.spent()
        return any(spent[k] >= lim for k, lim in self.limits.items())

    def exhausted_by(self) -> list[str]:
        spent = self.spent()
        return [k for k, lim in self.limits.items() if spent[k] >= lim]

    def report(self) -> dict:
        return {"limits": dict(self.limits), "spent": self.spent(), "remaining": self.remaining(),
                "exhausted": self.exhausted, "exhausted_by": self.exhausted_by()}
