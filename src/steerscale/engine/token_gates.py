"""Token gates: steering switched on token by token by a probe on the model's own hidden states (TruthPrInt-style).

A ``TokenGate`` is a linear probe read at ``gate.site`` during every forward pass. Put it on an ``Intervention``
(``Intervention(site, edit, gate=gate)``) and the edit applies to a row from the first position, at or after the
last prompt token, whose probe probability crosses the threshold, and from then on (latched). The gated edit must
sit after the gate's site in the forward pass (``Site.forward_rank``): then the gate's readings never depend on
its own edits, the trigger is found in the same pass that first applies the edit, and a cached decode, an uncached
recompute and one teacher-forced scoring pass all steer exactly the same positions. The latch is per row and
lives in the ``Intervener`` (``engine.runtime``), never in the gate, so one gate serves any number of concurrent
``intervene`` blocks. Fitting a gate: ``steer.gating``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import SteerscaleError
from ..models.sites import Site, SiteKind

@dataclass(eq=False)
class TokenGate:
    """A linear probe ``sigmoid(h . weight + bias)`` read at ``site`` on each token from the last prompt token on;
    gated edits apply from the first token whose probability exceeds ``threshold``. ``invert``: gate on the
    probability falling below ``threshold`` instead."""

    site: Site
    weight: torch.Tensor
    bias: float = 0.0
    threshold: float = 0.5
    invert: bool = False
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.site, Site):
            self.site = Site.parse(self.site)
        if self.site.kind is SiteKind.ROUTER:
            raise SteerscaleError("a token gate cannot read router logits", "read a resid_post, mlp_out or head site")
        self.weight = torch.as_tensor(self.weight, dtype=torch.float32).detach()
        if self.weight.dim() != 1 or not torch.isfinite(self.weight).all():
            raise SteerscaleError(f"gate weight must be a finite 1-D tensor, got shape {tuple(self.weight.shape)}")
        self.bias = float(self.bias)
        self.threshold = float(self.threshold)
        if not math.isfinite(self.bias) or not 0.0 < self.threshold < 1.0:
            raise SteerscaleError(f"gate bias must be finite and threshold in (0, 1), got bias={self.bias}, "
                                  f"threshold={self.threshold}", "refit the gate or pick a threshold such as 0.5")

    @property
    def dim(self) -> int:
        return self.weight.shape[0]

    def probability(self, h: torch.Tensor) -> torch.Tensor:
        """(batch, seq) probability of the probe's positive class for activations ``h`` (batch, seq, dim)."""
        w = self.weight.to(device=h.device, dtype=torch.float32)
        return torch.sigmoid(h.float() @ w + self.bias)

    def fires(self, h: torch.Tensor) -> torch.Tensor:
        p = self.probability(h)
        return p < self.threshold if self.invert else p > self.threshold

    def check_edit_site(self, site: Site) -> None:
        if site.forward_rank() <= self.site.forward_rank():
            raise SteerscaleError(
                f"a gated edit at {site.key()} runs before (or at) its gate's site {self.site.key()} in the forward "
                "pass", "read the gate at an earlier site than every edit it gates (e.g. gate at resid_post.8, "
                "edit at layers 9 and later)")
