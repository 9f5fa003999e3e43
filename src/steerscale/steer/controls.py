"""The registry of methods that decide when, where and how strongly to steer (docs/conditional.md), beside
``steer.methods.METHODS`` (the methods that make a vector): name -> the function that fits the method's artifact.
``steerscale condition``, ``controller``, ``gate`` and ``experts`` are their commands."""

from __future__ import annotations

from ..registry import Registry
from .conditional import fit_condition
from .controller import train_controller
from .gating import fit_token_gate
from .router import router_vector_from_contrast

CONTROLS: Registry = Registry("conditional steering method")
CONTROLS.add("cast", fit_condition, "conditional activation steering: steer a prompt when a condition read from it "
                                    "holds (Condition; grid search on F1)")
CONTROLS.add("controller", train_controller, "a network that sets strength and per-layer weights of a direction per "
                                             "prompt (SteeringController; trained through the frozen model)")
CONTROLS.add("token_gate", fit_token_gate, "a probe that switches steering on at the first generated token it flags "
                                           "(TokenGate; TruthPrInt-style)", aliases=("gate",))
CONTROLS.add("router", router_vector_from_contrast, "MoE router biases toward or away from the experts a behaviour "
                                                    "uses (a SteeringVector at router sites)")
