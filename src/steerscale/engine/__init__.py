"""The intervention engine: sites, edits, token scopes, the hook runtime, capture and generation."""

from ..models.sites import Site, SiteKind
from .capture import Readout, capture
from .generation import Generation, format_prompt, generate
from .logit_contrast import ContrastMode, LogitContrast
from .ops import Ablate, Add, Affine, ClampMode, Edit, Lambda, SetProjection
from .runtime import Intervener, Intervention, Observer, StopForward, intervene, observe
from .scope import Scope, TokenScope

__all__ = [
    "Ablate", "Add", "Affine", "ClampMode", "ContrastMode", "Edit", "Generation", "Intervener", "Intervention",
    "Lambda", "LogitContrast", "Observer",
    "Readout", "Scope", "SetProjection", "Site", "SiteKind", "StopForward", "TokenScope", "capture", "format_prompt",
    "generate", "intervene", "observe",
]
