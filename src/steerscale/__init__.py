"""steerscale: inference-time intervention on language models. Steer representations, scale compute, measure both."""

from .engine import (
    Ablate, Add, Affine, Intervention, Lambda, LogitContrast, Readout, SetProjection, Site, SiteKind, TokenScope,
    capture, format_prompt, generate, intervene,
)
from .errors import SteerscaleError
from .models import DEFAULT_MODEL, LoadedModel, ModelLayout, find_layout, load_model
from .version import __version__

__all__ = [
    "Ablate", "Add", "Affine", "DEFAULT_MODEL", "Intervention", "Lambda", "LoadedModel", "LogitContrast", "ModelLayout",
    "Readout",
    "SetProjection", "Site", "SiteKind", "SteerscaleError", "TokenScope", "__version__", "capture", "find_layout",
    "format_prompt", "generate", "intervene", "load_model",
]
