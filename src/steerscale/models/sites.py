"""Where an intervention acts: a ``Site`` is ``(layer, kind, head)``.

Layer indices are 0-based block indices. ``resid_post`` of layer ``i`` is the output of block ``i``, which is
what llama.cpp's control-vector tensor ``direction.i`` edits (``i >= 1``; see ``steer.gguf`` and
docs/portability.md). ``resid_pre`` of layer ``i`` is the input of block ``i`` (equal to ``resid_post`` of ``i-1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..errors import SteerscaleError


class SiteKind(str, Enum):
    RESID_PRE = "resid_pre"  # input of block i (hidden size)
    RESID_POST = "resid_post"  # output of block i (hidden size)
    ATTN_OUT = "attn_out"  # output of block i's attention module, after its output projection (hidden size)
    MLP_OUT = "mlp_out"  # output of block i's MLP / MoE block (hidden size)
    HEAD_OUT = "head_out"  # one head's slice of the input of the attention output projection (head dim)
    ROUTER = "router"  # MoE router logits (number of experts)


_FORWARD_ORDER = {SiteKind.RESID_PRE: 0, SiteKind.HEAD_OUT: 1, SiteKind.ATTN_OUT: 2, SiteKind.ROUTER: 3,
                  SiteKind.MLP_OUT: 4, SiteKind.RESID_POST: 5}


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    kind: SiteKind = SiteKind.RESID_POST
    head: int | None = None

    def __post_init__(self):
        try:
            object.__setattr__(self, "kind", SiteKind(self.kind))
        except ValueError:
            raise SteerscaleError(
                f"unknown site kind {self.kind!r}", f"use one of: {', '.join(k.value for k in SiteKind)}"
            ) from None
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise SteerscaleError(f"site layer must be an int, got {self.layer!r}")
        if (self.kind is SiteKind.HEAD_OUT) != (self.head is not None):
            raise SteerscaleError(
                f"site {self.kind.value} at layer {self.layer} has head={self.head!r}",
                "give head=H exactly for kind 'head_out' and never for other kinds",
            )

    def forward_rank(self) -> tuple[int, int]:
        """Where the site's hook runs in a forward pass: sites with a smaller rank run first (within a block:
        its input, the attention output and heads, the router, the MLP output, the block's output)."""
        return self.layer, _FORWARD_ORDER[self.kind]

    def key(self) -> str:
        """A stable string form, used as tensor names in files: ``resid_post.12`` or ``head_out.12.3``."""
        base = f"{self.kind.value}.{self.layer}"
        return base if self.head is None else f"{base}.{self.head}"

    @classmethod
    def parse(cls, key: str) -> "Site":
        parts = key.split(".")
        try:
            if len(parts) == 2:
                return cls(int(parts[1]), SiteKind(parts[0]))
            if len(parts) == 3:
                return cls(int(parts[1]), SiteKind(parts[0]), int(parts[2]))
        except ValueError:
            pass
        raise SteerscaleError(f"malformed site key {key!r}", "expected KIND.LAYER or head_out.LAYER.HEAD")
