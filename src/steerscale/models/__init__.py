from .layout import HookPoint, Location, ModelLayout, find_layout
from .loading import LoadedModel, load_model
from .registry import BUNDLED, DEFAULT_MODEL
from .sites import Site, SiteKind

__all__ = ["BUNDLED", "DEFAULT_MODEL", "HookPoint", "LoadedModel", "Location", "ModelLayout", "Site", "SiteKind", "find_layout", "load_model"]
