"""An OpenAI-compatible HTTP server for one loaded model (``steerscale serve``), with per-request steering and
scaling strategies as extension fields. ``app`` holds the request -> response logic, ``http`` the stdlib front end.
The client side (any OpenAI-compatible server as a ``Backend``) is ``steerscale.scale.remote.OpenAIBackend``."""

from .app import ApiError, App
from .http import make_server, serve

__all__ = ["ApiError", "App", "make_server", "serve"]
