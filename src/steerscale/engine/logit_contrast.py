"""Early-layer logit contrast (DoLa, VISTA): a decoding-time intervention on the next-token distribution.

The hidden state at an earlier block's output is read through the model's final norm and LM head (an "early exit"),
and the next-token scores become one of:

- ``contrast`` (DoLa, Chuang et al. 2024): ``log p_final - weight * log p_early`` over the tokens the final
  distribution finds plausible (``p_final >= alpha * max p_final``, DoLa's adaptive plausibility constraint); the
  others are masked. With several candidate layers the early layer is chosen per token: the one whose distribution
  is furthest from the final one in Jensen-Shannon divergence (DoLa's dynamic premature layer).
- ``add`` (VISTA's self-logits augmentation, Li et al. 2025): ``logits_final + weight * mean(logits_early)``.

Scores come back as log-probs (log-softmax of the above), so they can be sampled from and summed over an answer's
tokens. Masked tokens get a large finite negative score (``MASKED``), not ``-inf``: an answer that passes through
an implausible token is scored very low instead of every such answer tying at ``-inf``; a ``-inf`` already in the
final logits (e.g. EOS under ``min_tokens``) stays ``-inf``.

Every caller uses this module: ``generate(logit_contrast=)`` (a logits processor), multiple-choice scoring
(``engine.choices``), ``LocalBackend(logit_contrast=)`` for the scaling strategies, and the server per request
(``{"logit_contrast": {...}}``). The early hidden states are read with the hook runtime's observers
(``EarlyReader``), after any steering edits at the same sites: the contrast composes with steering.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import Iterator

import torch

from ..errors import SteerscaleError
from ..models.layout import ModelLayout
from ..models.sites import Site
from .runtime import Observer, observe

MASKED = -1e4  # the score of a token outside the plausible set (see the module docstring)
_ROWS_PER_CHUNK = 256  # early logits are (layers, rows, vocab): chunk the rows to bound memory


class ContrastMode(str, Enum):
    CONTRAST = "contrast"  # DoLa
    ADD = "add"  # VISTA self-logits augmentation


_PRESETS = {"dola": ContrastMode.CONTRAST, "contrast": ContrastMode.CONTRAST, "vista": ContrastMode.ADD,
            "add": ContrastMode.ADD}


@dataclass(frozen=True)
class LogitContrast:
    """A logit-contrast setting. ``layers``: ``"high"`` / ``"low"`` (DoLa-like buckets: every second block of the
    upper / lower half, the last block excluded; transformers' DoLa counts the embedding output as layer 0, so its
    buckets sit one block lower), one block index, or several (0-based ``resid_post`` indices;
    the last block is the final layer itself and is refused). ``alpha``: the plausibility threshold of ``contrast``
    (0 turns it off). ``weight``: how much of the early distribution is subtracted (``contrast``) or added
    (``add``)."""

    layers: str | int | tuple[int, ...] = "high"
    mode: ContrastMode = ContrastMode.CONTRAST
    alpha: float = 0.1
    weight: float = 1.0

    def __post_init__(self):
        try:
            object.__setattr__(self, "mode", ContrastMode(self.mode))
        except ValueError:
            raise SteerscaleError(f"unknown logit contrast mode {self.mode!r}",
                                  "use 'contrast' (DoLa) or 'add' (VISTA)") from None
        layers = self.layers
        if isinstance(layers, (list, tuple)):
            if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
                raise SteerscaleError(f"logit contrast layers must be block indices, got {layers!r}",
                                      "e.g. layers=(16, 18, 20), or 'high' / 'low'")
            layers = tuple(sorted(set(layers)))
        elif isinstance(layers, int) and not isinstance(layers, bool):
            layers = (layers,)
        elif layers not in ("high", "low"):
            raise SteerscaleError(f"logit contrast layers must be 'high', 'low' or block indices, got {layers!r}")
        object.__setattr__(self, "layers", layers)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha < 1.0:
            raise SteerscaleError(f"logit contrast alpha must be a number in [0, 1), got {self.alpha!r}",
                                  "DoLa uses 0.1; 0 turns the plausibility constraint off")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not 0.0 < self.weight <= 10.0:
            raise SteerscaleError(f"logit contrast weight must be a number in (0, 10], got {self.weight!r}",
                                  "DoLa uses 1")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "weight", float(self.weight))

    @classmethod
    def parse(cls, spec: "str | dict | LogitContrast | None") -> "LogitContrast | None":
        """From a CLI spec ``MODE[:LAYERS][,alpha=A][,weight=W]`` (``dola:high``, ``dola:20``, ``dola:14-22``,
        ``vista:24,weight=0.5``; MODE is ``dola``/``contrast`` or ``vista``/``add``; LAYERS ``high``, ``low``, ``N``,
        ``A-B`` or ``A+B+C``), a dict of the fields (as the server takes it), or an instance."""
        if spec is None or isinstance(spec, LogitContrast):
            return spec
        if isinstance(spec, dict):
            unknown = set(spec) - {"layers", "mode", "alpha", "weight"}
            if unknown:
                raise SteerscaleError(f"unknown logit contrast field(s) {sorted(unknown)}",
                                      "use layers, mode, alpha, weight")
            layers, mode = spec.get("layers", "high"), spec.get("mode", "contrast")
            return cls(tuple(layers) if isinstance(layers, list) else layers, _PRESETS.get(mode, mode),
                       spec.get("alpha", 0.1), spec.get("weight", 1.0))
        head, *knobs = str(spec).strip().split(",")
        mode_name, _, layer_text = head.partition(":")
        if mode_name.strip().lower() not in _PRESETS:
            raise SteerscaleError(f"bad logit contrast {spec!r}: unknown mode {mode_name!r}",
                                  "use e.g. dola:high, dola:20, dola:14-22 or vista:24,weight=0.5")
        kwargs: dict = {"mode": _PRESETS[mode_name.strip().lower()], "layers": _parse_layers(layer_text or "high")}
        for knob in knobs:
            key, _, value = knob.partition("=")
            if key.strip() not in ("alpha", "weight"):
                raise SteerscaleError(f"bad logit contrast knob {knob!r} in {spec!r}", "knobs: alpha=A, weight=W")
            try:
                kwargs[key.strip()] = float(value)
            except ValueError:
                raise SteerscaleError(f"bad logit contrast knob {knob!r}: {value!r} is not a number") from None
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return {"layers": self.layers if isinstance(self.layers, str) else list(self.layers),
                "mode": self.mode.value, "alpha": self.alpha, "weight": self.weight}

    def text(self) -> str:
        """The CLI spec ``parse`` reads back."""
        layers = self.layers if isinstance(self.layers, str) else "+".join(map(str, self.layers))
        name = "dola" if self.mode is ContrastMode.CONTRAST else "vista"
        return f"{name}:{layers},alpha={self.alpha:.15g},weight={self.weight:.15g}"

    def resolve(self, n_layers: int) -> tuple[int, ...]:
        """The candidate blocks for a model with ``n_layers`` blocks."""
        if n_layers < 2:
            raise SteerscaleError("logit contrast needs a model with at least 2 blocks")
        if self.layers == "low":
            return tuple(range(0, n_layers // 2, 2))
        if self.layers == "high":
            return tuple(range(n_layers // 2, n_layers - 1, 2)) or (n_layers - 2,)
        bad = [x for x in self.layers if not 0 <= x < n_layers - 1]
        if bad:
            raise SteerscaleError(f"logit contrast layer(s) {bad} out of range: this model has {n_layers} blocks and "
                                  f"the last ({n_layers - 1}) is the final layer itself",
                                  f"use blocks 0 to {n_layers - 2}, or 'high' / 'low'")
        return self.layers


def _parse_layers(text: str):
    text = text.strip()
    if text in ("high", "low"):
        return text
    try:
        if re.fullmatch(r"\d+-\d+", text):
            a, b = map(int, text.split("-"))
            return tuple(range(a, b + 1))
        return tuple(int(x) for x in text.split("+"))
    except ValueError:
        raise SteerscaleError(f"bad logit contrast layers {text!r}", "use high, low, N, A-B or A+B+C") from None


# -- the arithmetic -----------------------------------------------------------------------------------------------
def lm_head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's LM head on final hidden states (after the final norm), with its logit soft-capping if any."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None) or getattr(
        getattr(model.config, "text_config", None), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def head_logits(model, layout: ModelLayout, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of block outputs ``hidden`` (..., dim) read through the final norm and the LM head (early exit)."""
    if layout.final_norm is None:
        raise SteerscaleError(f"cannot read early-layer logits of {type(model).__name__}: its final norm was not found",
                              "logit contrast needs a model whose layout names a final norm")
    return lm_head(model, layout.final_norm(hidden))


def _js(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence per row of two log-distributions over the last dimension."""
    m = (0.5 * (logp.exp() + logq.exp())).clamp_min(1e-30).log()
    p_term = (logp.exp() * (logp - m)).nan_to_num(0.0).sum(-1)  # 0 * (-inf) terms are 0
    q_term = (logq.exp() * (logq - m)).nan_to_num(0.0).sum(-1)
    return 0.5 * (p_term + q_term)


def contrast(final_logits: torch.Tensor, early_logits: torch.Tensor,
             spec: LogitContrast) -> tuple[torch.Tensor, torch.Tensor]:
    """``final_logits`` (rows, vocab) and ``early_logits`` (layers, rows, vocab) -> (the contrasted log-probs
    (rows, vocab) float32, the index into ``layers`` each row used (rows,); ``add`` reports 0)."""
    final = final_logits.float()
    early = early_logits.float()
    if spec.mode is ContrastMode.ADD:
        scores = final + spec.weight * early.mean(0)
        return scores.log_softmax(-1), torch.zeros(final.shape[0], dtype=torch.long, device=final.device)
    logp = final.log_softmax(-1)
    logq = early.log_softmax(-1)
    chosen = torch.stack([_js(logp, q) for q in logq]).argmax(0) if len(logq) > 1 else \
        torch.zeros(final.shape[0], dtype=torch.long, device=final.device)
    picked = logq[chosen, torch.arange(final.shape[0], device=final.device)]
    scores = logp - spec.weight * picked.nan_to_num(neginf=0.0)  # an early -inf must not lift a token to +inf
    if spec.alpha > 0:
        implausible = logp < logp.max(-1, keepdim=True).values + torch.log(torch.tensor(spec.alpha))
        scores = scores.masked_fill(implausible & torch.isfinite(logp), MASKED)
    return scores.log_softmax(-1), chosen


def contrast_hidden(model, layout: ModelLayout, spec: LogitContrast, final_logits: torch.Tensor,
                    early_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """``contrast`` from the final logits (rows, vocab) and the candidate blocks' hidden states, each (rows, dim),
    in chunks of rows (the early logits of every candidate at once would be layers x rows x vocab floats)."""
    out = []
    for start in range(0, final_logits.shape[0], _ROWS_PER_CHUNK):
        rows = slice(start, start + _ROWS_PER_CHUNK)
        early = torch.stack([head_logits(model, layout, h[rows]) for h in early_hidden])
        out.append(contrast(final_logits[rows], early, spec)[0])
    return torch.cat(out) if out else final_logits.float()


# -- reading the early layers -------------------------------------------------------------------------------------
@dataclass
class EarlyReader:
    """Keeps the latest output of each candidate block during forward passes (``with reader.reading(): ...``).
    ``last_only``: keep only the last position (decoding with left padding: the last column is every row's
    newest token), which is all a generation step needs."""

    layout: ModelLayout
    spec: LogitContrast
    model: object = None  # whose final norm and LM head read the kept states (``contrast_hidden``)
    last_only: bool = False
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def layers(self) -> tuple[int, ...]:
        return self.spec.resolve(self.layout.n_layers)

    def _keep(self, layer: int, h: torch.Tensor) -> None:
        self.hidden[layer] = (h[:, -1] if self.last_only else h).detach()

    def observers(self) -> list[Observer]:
        """The reads that keep the candidate blocks' outputs (``reading()`` attaches them; an engine with standing
        hooks runs them itself)."""
        return [Observer(Site(layer), partial(self._keep, layer)) for layer in self.layers]

    @contextmanager
    def reading(self) -> Iterator["EarlyReader"]:
        with observe(self.layout, self.observers()):
            yield self

    def at(self, rows: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The candidates' hidden states (one (n, dim) tensor each) at ``(rows, positions)`` pairs, or every row's
        kept last position when the reader keeps only that."""
        missing = [layer for layer in self.layers if layer not in self.hidden]
        if missing:
            raise SteerscaleError(f"logit contrast read no hidden state at block(s) {missing}",
                                  "run the forward pass inside `with reader.reading():`")
        if self.last_only or rows is None:
            return [self.hidden[layer] for layer in self.layers]
        return [self.hidden[layer][rows, positions] for layer in self.layers]


def check_layout(layout: ModelLayout, spec: LogitContrast) -> None:
    """Refuse before any work: the layers out of range, or no final norm to read early logits through."""
    spec.resolve(layout.n_layers)
    if layout.final_norm is None:
        raise SteerscaleError("logit contrast needs the model's final norm, which this model's layout does not name")


def early_reader(layout: ModelLayout, model, specs: Iterable["LogitContrast | None"],
                 last_only: bool = True) -> EarlyReader | None:
    """One reader of every early block that some row's contrast reads, for a batch whose rows decode under
    ``specs`` (None: a row without a contrast); None when no row has one."""
    specs = {s for s in specs if s is not None}
    if not specs:
        return None
    if len(specs) == 1:
        return EarlyReader(layout, next(iter(specs)), model=model, last_only=last_only)
    layers = sorted({layer for spec in specs for layer in spec.resolve(layout.n_layers)})
    return EarlyReader(layout, LogitContrast(tuple(layers)), model=model, last_only=last_only)


def contrast_rows(model, layout: ModelLayout, logits: torch.Tensor, specs: Sequence["LogitContrast | None"],
                  early: EarlyReader | None) -> torch.Tensor:
    """Each row's next-token logits (rows, vocab) as its request decodes them: rows with a logit contrast get theirs,
    from the early states ``early`` (``early_reader(..., last_only=True)``) kept in the same pass; the others are
    left as they are (the same tensor back when no row has a contrast)."""
    if early is None:
        return logits
    out = logits.clone()
    for spec in {s for s in specs if s is not None}:
        rows = torch.tensor([b for b, s in enumerate(specs) if s == spec], device=logits.device)
        hidden = [early.hidden[layer].reshape(logits.shape[0], -1).index_select(0, rows)
                  for layer in spec.resolve(layout.n_layers)]
        out[rows] = contrast_hidden(model, layout, spec, logits.index_select(0, rows), hidden).to(out.dtype)
    return out
