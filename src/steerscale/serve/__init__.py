"""An OpenAI-compatible HTTP server for one loaded model (``steerscale serve``), with per-request steering and
scaling strategies as extension fields. ``app`` holds the routes and the order of work, ``schema`` parses
requests, ``engine`` and ``scheduler`` run them, ``responses`` shapes answers, ``http`` runs uvicorn.
The client side (any OpenAI-compatible server as a ``Backend``) is ``steerscale.scale.remote.OpenAIBackend``."""

from .app import ApiError, App, Limits
from .http import ServerThread, serve, start_server

__all__ = ["ApiError", "App", "Limits", "ServerThread", "serve", "start_server"]
