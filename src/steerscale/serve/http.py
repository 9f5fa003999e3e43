"""Running the application under uvicorn: ``serve`` in the foreground (``steerscale serve``; SIGTERM/SIGINT drain
the requests in flight for ``shutdown_timeout`` seconds, then cancel the rest and stop the engine loop), and
``start_server`` on a background thread (tests, benches, notebooks)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from .app import App

KEEP_ALIVE_S = 5  # idle keep-alive connections are closed after this
MAX_CONNECTIONS = 1024  # open connections past this get a 503 from uvicorn (load, not a request's fault)


def _config(app: App, *, shutdown_timeout: float, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app.api, log_level=log_level, timeout_keep_alive=KEEP_ALIVE_S,
                          limit_concurrency=MAX_CONNECTIONS, timeout_graceful_shutdown=shutdown_timeout,
                          access_log=False, lifespan="on")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def serve(app: App, host: str = "127.0.0.1", port: int = 8000, *, shutdown_timeout: float = 30.0,
          log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT."""
    sock = _bind(host, port)
    h, p = sock.getsockname()[:2]
    vectors = ", ".join(sorted(app.vectors)) or "none"
    print(f"steerscale serve: {app.model_id} on http://{h}:{p}/v1 (vectors: {vectors}; API docs: "
          f"http://{h}:{p}/docs)", flush=True)
    server = uvicorn.Server(_config(app, shutdown_timeout=shutdown_timeout, log_level=log_level))
    try:
        server.run(sockets=[sock])
    finally:
        app.close()


class ServerThread:
    """``app`` served on a background thread: ``.url`` (ends in /v1), ``.port``, ``.close()``."""

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 0, *, shutdown_timeout: float = 5.0):
        self.app = app
        self.sock = _bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}/v1"
        self.server = uvicorn.Server(_config(app, shutdown_timeout=shutdown_timeout, log_level="warning"))
        self.server.install_signal_handlers = lambda: None  # signals belong to the main thread's program
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
                                       name="steerscale-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the steerscale server thread did not start")
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.app.close()


def start_server(app: App, host: str = "127.0.0.1", port: int = 0) -> ServerThread:
    """Serve ``app`` on a background thread (port 0: any free port); ``close()`` stops it."""
    return ServerThread(app, host, port)
