"""steerscale: inference-time intervention on language models. Steer representations, scale compute, measure both."""

__version__ = "0.1.0"

from .engine import (  # noqa: E402
    Ablate, Add, Affine, Intervention, Lambda, Readout, SetProjection, Site, SiteKind, TokenScope, capture,
    format_prompt, generate, intervene,
)
from .errors import SteerscaleError  # noqa: E402
from .models import DEFAULT_MODEL, LoadedModel, ModelLayout, find_layout, load_model  # noqa: E402

__all__ = [
    "Ablate", "Add", "Affine", "DEFAULT_MODEL", "Intervention", "Lambda", "LoadedModel", "ModelLayout", "Readout",
    "SetProjection", "Site", "SiteKind", "SteerscaleError", "TokenScope", "__version__", "capture", "find_layout",
    "format_prompt", "generate", "intervene", "load_model",
]
