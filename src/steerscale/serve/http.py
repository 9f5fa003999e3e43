"""The HTTP front end of ``steerscale serve``: stdlib ``ThreadingHTTPServer``, JSON in and out, no streaming.

Connections are handled on threads; each waits for its request's work on the engine loop, which batches them.
"""

from __future__ import annotations

import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .app import ApiError, App, to_json

log = logging.getLogger("steerscale.serve")

MAX_BODY = 32 * 1024 * 1024  # bytes; a request body is JSON text, never a model file


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients that make many small requests reuse one connection
    server_version = "steerscale-serve"

    def _send(self, status: int, payload: dict) -> None:
        data = to_json(payload)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self.close_connection = True  # the body was not read, so the connection cannot be reused
            err = ApiError(413 if length > MAX_BODY else 400, f"bad Content-Length (at most {MAX_BODY} bytes)")
            self._send(err.status, err.body())
            return
        body = self.rfile.read(length) if length else b""
        status, payload = self.server.app.handle(method, self.path, body)
        self._send(status, payload)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self):  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self):  # noqa: N802
        self._dispatch("DELETE")

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        log.info("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not keep the process alive at shutdown

    def __init__(self, address, app: App):
        self.app = app
        super().__init__(address, _Handler)


def make_server(app: App, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A bound, not yet running server (port 0: any free port, see ``server.server_address``)."""
    return _Server((host, port), app)


def serve(app: App, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted."""
    server = make_server(app, host, port)
    h, p = server.server_address[:2]
    vectors = ", ".join(sorted(app.vectors)) or "none"
    print(f"steerscale serve: {app.model_id} on http://{h}:{p}/v1 (vectors: {vectors})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.close()
