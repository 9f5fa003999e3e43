"""The registries of what decides when, where and how strongly to steer (``CONTROLS``), and of what turns steering
into model weights (``AMORTISERS``), beside ``steer.methods.METHODS`` (the methods that make a vector).

Every entry is a ``steer.capabilities.Capability``: the function that fits it, what it reads (activations or the
model), the data it is fitted on and the artifact it writes (docs/conditional.md, docs/casal.md,
docs/portability.md). ``steerscale condition``, ``controller``, ``gate``, ``experts``, ``bake`` and ``casal`` are
their commands.
"""

from __future__ import annotations

from ..models.sites import SiteKind
from ..registry import Registry
from .bake import bake
from .capabilities import Capability, Data, Reads
from .casal import CasalConfig, fit_casal
from .conditional import Condition, fit_condition
from .controller import SteeringController, train_controller
from .gating import FittedTokenGate, fit_token_gate
from .router import router_vector_from_contrast
from .vector import SteeringVector

CONTROLS: Registry[Capability] = Registry("conditional steering method")
CONTROLS.add("cast", Capability(fit_condition, Reads.ACTIVATIONS, (Data.PROMPT_SETS,), Condition),
             "conditional activation steering: steer a prompt when a condition read from it holds (Condition; grid "
             "search on F1)")
CONTROLS.add("controller", Capability(train_controller, Reads.MODEL, (Data.PROMPT_SETS,), SteeringController),
             "a network that sets strength and per-layer weights of a direction per prompt (SteeringController; "
             "trained through the frozen model)")
CONTROLS.add("token_gate", Capability(fit_token_gate, Reads.ACTIVATIONS, (Data.COMPLETIONS,), FittedTokenGate),
             "a probe that switches steering on at the first generated token it flags (TokenGate; TruthPrInt-style)",
             aliases=("gate",))
CONTROLS.add("router", Capability(router_vector_from_contrast, Reads.ACTIVATIONS, (Data.PROMPT_SETS,), SteeringVector,
                                  sites=SiteKind.ROUTER),
             "MoE router biases toward or away from the experts a behaviour uses (a SteeringVector at router sites)")

AMORTISERS: Registry[Capability] = Registry("amortiser")
AMORTISERS.add("bake", Capability(bake, Reads.MODEL, (Data.STEERING,), "checkpoint", sites=None),
               "constant steering folded into bias terms of a Hugging Face checkpoint (exact; no training)")
AMORTISERS.add("casal", Capability(fit_casal, Reads.MODEL, (Data.STEERING,), "checkpoint", knobs=CasalConfig,
                                   sites=None),
               "a low-rank update of one MLP projection trained to reproduce the steered activations (CASAL; "
               "written by bake_casal)")
