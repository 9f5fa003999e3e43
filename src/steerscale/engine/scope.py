"""Which token positions an intervention touches, computed from the KV cache, never from call counts.

``TokenState`` is built once per forward pass of the decoder stack (a pre-hook on ``layout.base``). From the
cache length ``past`` and the input width ``T`` it forms ``cache_position = past + arange(T)`` (the absolute
column of each input token; transformers >= 5 no longer passes it, so we derive it), and from the 2-D attention
mask each token's index among the row's real tokens (``-1`` for padding). All scopes are functions of these,
so a run with ``use_cache=True`` and one with ``use_cache=False`` edit exactly the same tokens.

Prompt length: the first forward pass of a sequence (``past == 0``) defines the prompt. A later pass with
``past == 0`` whose input starts with the same prompt tokens is treated as the same sequence (generation
without a cache); any other pass with ``past == 0`` starts a new sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from ..errors import SteerscaleError


class Scope(str, Enum):
    ALL = "all"  # every position, padding included (padding is masked out of attention anyway)
    PROMPT = "prompt"  # the prompt's real tokens
    GENERATED = "generated"  # positions whose next-token prediction is generated: the last prompt token onwards
    LAST_K = "last_k"  # the last k real tokens of the prompt
    POSITIONS = "positions"  # explicit indices among a row's real tokens (negative: from the prompt's end)


@dataclass(frozen=True)
class TokenScope:
    kind: Scope = Scope.ALL
    k: int | None = None
    positions: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "kind", Scope(self.kind))
        if self.kind is Scope.LAST_K and (not isinstance(self.k, int) or self.k < 1):
            raise SteerscaleError(f"last_k scope needs k >= 1, got {self.k!r}")
        if self.kind is Scope.POSITIONS:
            if not self.positions:
                raise SteerscaleError("positions scope needs at least one position")
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))

    def text(self) -> str:
        """The form ``parse`` reads back: ``all``, ``last:4``, ``positions:0,3,-1``."""
        if self.kind is Scope.LAST_K:
            return f"last:{self.k}"
        if self.kind is Scope.POSITIONS:
            return "positions:" + ",".join(map(str, self.positions))
        return self.kind.value

    @classmethod
    def parse(cls, text: str | "TokenScope" | None) -> "TokenScope":
        """``all``, ``prompt``, ``generated``, ``last:4``, ``positions:0,3,-1``."""
        if text is None:
            return cls()
        if isinstance(text, TokenScope):
            return text
        name, _, arg = str(text).partition(":")
        try:
            if name in ("last", "last_k"):
                return cls(Scope.LAST_K, k=int(arg))
            if name in ("pos", "positions"):
                return cls(Scope.POSITIONS, positions=tuple(int(x) for x in arg.split(",")))
            return cls(Scope(name))
        except ValueError:
            raise SteerscaleError(
                f"unknown token scope {text!r}", "use all, prompt, generated, last:K or positions:I,J,..."
            ) from None


ALL_TOKENS = TokenScope()


@dataclass
class TokenState:
    """Per-forward facts about the tokens being processed.

    Padding-aware positions are derived lazily from the attention mask, only when a scope other than ``all``
    asks for them: an ``all``-scoped edit (the common case) costs no mask arithmetic and no device sync.
    """

    cache_position: torch.Tensor  # (T,) absolute column of each input token
    attention_mask: torch.Tensor | None  # (B, past+T) 2-D mask as the model received it, or None
    prompt_width: int  # prompt length in columns (padding included)
    batch: int
    _masks: dict = field(default_factory=dict)
    _rows: tuple | None = None

    def mask(self, scope: TokenScope) -> torch.Tensor | None:
        """(B, T) bool mask of positions to edit, or None meaning every position."""
        if scope.kind is Scope.ALL:
            return None
        if scope not in self._masks:
            self._masks[scope] = self._compute(scope)
        return self._masks[scope]

    def real_positions(self) -> torch.Tensor:
        """(B, T) index of each input token among its row's real tokens; -1 for padding."""
        real, _ = self._padding()
        return real if real is not None else self.cache_position[None, :].expand(self.batch, -1)

    def _padding(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(real_position (B, T) with -1 for padding, real prompt length per row (B,)); (None, None): no padding."""
        if self._rows is None:
            mask = self.attention_mask
            if mask is None or mask.dim() != 2 or bool(mask.all()):
                self._rows = (None, None)
            else:
                counts = mask.long().cumsum(-1) - 1
                cols = self.cache_position.clamp(max=mask.shape[1] - 1)
                real = torch.where(mask[:, cols].bool(), counts[:, cols], torch.full_like(counts[:, cols], -1))
                self._rows = (real, mask[:, : self.prompt_width].long().sum(-1))
        return self._rows

    def _compute(self, scope: TokenScope) -> torch.Tensor:
        cols = self.cache_position[None, :]  # (1, T)
        real_position, prompt_lengths = self._padding()
        real = real_position if real_position is not None else cols.expand(self.batch, -1)
        valid = real >= 0
        plen = (
            prompt_lengths[:, None]
            if prompt_lengths is not None
            else torch.full((self.batch, 1), self.prompt_width, device=cols.device)
        )
        if scope.kind is Scope.PROMPT:
            return valid & (real < plen)
        if scope.kind is Scope.GENERATED:
            return valid & (real >= plen - 1)
        if scope.kind is Scope.LAST_K:
            return valid & (real >= plen - scope.k) & (real < plen)
        m = torch.zeros_like(valid)
        for p in scope.positions:
            target = plen + p if p < 0 else torch.full_like(plen, p)
            m |= valid & (real == target)
        return m


def _past_length(kwargs: dict) -> int:
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:  # legacy tuple cache
        return int(cache[0][0].shape[-2])
    return 0


class SequenceTracker:
    """Builds a ``TokenState`` for each forward pass and remembers the current sequence's prompt."""

    def __init__(self, prompt_width: int | None = None):
        self.prompt_width = prompt_width
        self._prompt_ids: torch.Tensor | None = None
        self.state: TokenState | None = None

    def reset(self, prompt_width: int | None = None) -> None:
        self.prompt_width = prompt_width
        self._prompt_ids = None

    def observe(self, input_ids: torch.Tensor | None, width: int, batch: int, device, kwargs: dict) -> TokenState:
        past = _past_length(kwargs)
        if past == 0 and not self._continues(input_ids, width):
            self.prompt_width = width
            self._prompt_ids = input_ids.detach().clone() if input_ids is not None else None
        elif self.prompt_width is None:  # entered the context mid-sequence: treat what came before as the prompt
            self.prompt_width = past
        cache_position = torch.arange(past, past + width, device=device)
        mask = kwargs.get("attention_mask")
        mask = mask.to(device) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self.state = TokenState(cache_position, mask, self.prompt_width, batch)
        return self.state

    def _continues(self, input_ids, width: int) -> bool:
        if self.prompt_width is None or width <= self.prompt_width:
            return False
        if input_ids is None or self._prompt_ids is None:
            return True  # inputs_embeds: fall back to "longer input extends the prompt"
        return input_ids.shape[0] == self._prompt_ids.shape[0] and bool(
            (input_ids[:, : self.prompt_width] == self._prompt_ids).all()
        )
