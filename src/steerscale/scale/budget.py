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

The cost rules live here and nowhere else: ``flops_of`` (2 x parameters x tokens) and the purchase methods the
backends and verifiers call. The budget is a hard cap: a purchase is granted *before* the work is done, cut to
what remains, so no limited currency is ever exceeded:

* ``buy_prompt(tokens, rows, n_params)``: encode a prompt (all or nothing);
* ``buy_tokens(rows, n_params)``: one decoding step of ``rows`` rows, cut to the rows that can still be paid for
  (the others finish with ``"budget"``);
* ``buy_verifier(token_counts, n_params)``: a batch of verifier passes (one per entry, reading that many tokens),
  cut to the leading passes that fit;
* ``buy_judge(calls)``: LLM-as-judge calls, cut likewise.

Two costs are known only after the work: wall time (checked between steps, ``exhausted``), and the prompt tokens
of a remote server's request (the server counts them; ``record_remote`` charges what it reports). Strategies only
*read* the ledger (``exhausted``, ``remaining``) to decide when to stop; every ``Result`` carries
``budget.report()``.
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


def flops_of(tokens: float, n_params: int) -> float:
    """Estimated FLOPs of running ``tokens`` tokens through a model of ``n_params`` parameters (forward only)."""
    return 2.0 * n_params * tokens


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

    # -- purchases: reserved before the work, cut to what remains ------------------------------------------------
    def affordable(self, costs) -> int:
        """How many of the leading ``costs`` (one ``{currency: amount}`` per unit of work) fit in what remains of
        every limited currency (wall time is not reserved: it is checked between steps)."""
        left = {k: v for k, v in self.remaining().items() if k != "wall_seconds"}
        if not left:
            return len(costs)
        total = dict.fromkeys(left, 0.0)
        for k, cost in enumerate(costs):
            for key in left:
                total[key] += cost.get(key, 0.0)
                if total[key] > left[key] + 1e-9:
                    return k
        return len(costs)

    def _buy(self, costs) -> int:
        k = self.affordable(costs)
        summed: dict = {}
        for cost in costs[:k]:
            for key, v in cost.items():
                summed[key] = summed.get(key, 0) + v
        if summed:
            self.charge(**summed)
        return k

    def buy_prompt(self, tokens: int, rows: int, n_params: int) -> bool:
        """Encode ``rows`` copies of a ``tokens``-token prompt: charged and True if all of it fits, else nothing."""
        cost = {"prompt_tokens": rows * tokens, "flops": flops_of(rows * tokens, n_params)}
        return self._buy([cost]) == 1

    def buy_tokens(self, rows: int, n_params: int) -> int:
        """One generated token for each of ``rows`` rows: the number of rows granted (charged), at most ``rows``."""
        return self._buy([{"generated_tokens": 1, "flops": flops_of(1, n_params)}] * rows)

    def buy_verifier(self, token_counts, n_params: int) -> int:
        """One verifier pass per entry of ``token_counts`` (the tokens it reads): how many leading passes are granted
        (charged)."""
        return self._buy([{"verifier_passes": 1, "verifier_tokens": t, "flops": flops_of(t, n_params)}
                          for t in token_counts])

    def buy_judge(self, calls: int) -> int:
        """``calls`` LLM-as-judge calls: how many are granted (charged)."""
        return self._buy([{"judge_calls": 1}] * calls)

    def record_remote(self, *, prompt_tokens: int = 0, generated_tokens: int = 0, verifier_passes: int = 0,
                      verifier_tokens: int = 0, n_params: int = 0) -> None:
        """What a remote server reports it spent on a request the backend had already capped (its prompt tokens
        cannot be known before it answers). FLOPs follow ``flops_of`` when the model size is known."""
        tokens = prompt_tokens + generated_tokens + verifier_tokens
        self.charge(prompt_tokens=prompt_tokens, generated_tokens=generated_tokens, verifier_passes=verifier_passes,
                    verifier_tokens=verifier_tokens, flops=flops_of(tokens, n_params))

    def tokens_left(self, n_params: int) -> float:
        """Generated tokens still affordable under the token and FLOP limits (``inf`` when neither is set)."""
        left = self.remaining_of("generated_tokens")
        if n_params and "flops" in self.limits:
            left = min(left, self.remaining_of("flops") / flops_of(1, n_params))
        return left

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
