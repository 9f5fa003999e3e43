"""The HTTP client of the remote backend: one JSON request to an OpenAI-compatible server (``http_json``), its
retries and backoff, the one error type (``RemoteError``) and ``list_models``; nothing here knows about
completions.

Each request runs on a fresh connection (``http.client``; proxies from the environment are honoured as ``urllib``
does). No connection (refused, connect timeout), a connection dropped before the answer (reset, closed), HTTP 5xx and
429 are retried ``retries`` times, ``backoff`` * 2^k s apart with jitter (capped at ``MAX_BACKOFF``), or after the
answer's ``Retry-After`` when it has one (capped at ``MAX_RETRY_AFTER``); another 4xx is an immediate
``RemoteError`` with the server's message. ``timeout`` bounds the connect and each read (a non-streaming answer
comes whole, so the generation is timed as a whole). A read timeout is not retried: the connection is shut down at
once, which makes servers that watch for it (vLLM, steerscale serve) abort the generation, and the error says the
request was abandoned.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import http.client
import json
import logging
import math
import random
import socket
import ssl
import time
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

from ...errors import SteerscaleError

if TYPE_CHECKING:
    from ..backend import Candidate

HINT = ("is the server running? start one with `steerscale serve -m MODEL` (or `vllm serve MODEL`), and pass its "
        "base URL, e.g. http://127.0.0.1:8000/v1")
MAX_BACKOFF = 30.0  # seconds: the longest wait between two attempts of a request
MAX_RETRY_AFTER = 60.0  # seconds: the longest Retry-After honoured
log = logging.getLogger(__package__)  # "steerscale.scale.remote": one logger for the package, as before the split
_jitter = random.Random()  # its own generator: retries never move the global random state


class RemoteError(SteerscaleError):
    """A request to the server that failed for good (after any retries). ``status``: the server's HTTP status, None
    when no answer came (no connection, connection dropped, timeout); ``attempts``: requests sent; ``timed_out``: the
    read timed out and the request was abandoned; ``partial``/``partial_prompts``: what ``OpenAIBackend`` finished
    before the failure (see ``remote.backend``; empty when raised by ``http_json`` itself)."""

    def __init__(self, problem: str, hint: str | None, status: int | None = None, *, attempts: int = 1,
                 timed_out: bool = False):
        super().__init__(problem, hint)
        self.status, self.attempts, self.timed_out = status, attempts, timed_out
        self.partial: list[Candidate] = []
        self.partial_prompts: list[str] = []


def rejected(exc: RemoteError) -> bool:
    """The server refused the request itself (4xx but 429): resending it as it is cannot help."""
    return exc.status is not None and 400 <= exc.status < 500 and exc.status != 429


def base_url_of(url: str) -> str:
    """``http://host:port`` -> ``http://host:port/v1``; a URL with a path is taken as the API root as it is."""
    if not isinstance(url, str) or not url.strip():
        raise SteerscaleError("empty server URL", "pass e.g. http://127.0.0.1:8000/v1")
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SteerscaleError(f"bad server URL {url!r}", "use http://HOST:PORT/v1 (or https://...)")
    path = parts.path.rstrip("/") or "/v1"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class _Failed(Exception):
    """One attempt that got no HTTP answer: ``what`` (for the message), whether another attempt may help."""

    def __init__(self, what: str, retry: bool, timed_out: bool = False):
        super().__init__(what)
        self.what, self.retry, self.timed_out = what, retry, timed_out


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str, dict]:
    """A connection for ``url`` (through the environment's proxy, as urllib would), the request target, and the
    headers the proxy needs."""
    parts = urllib.parse.urlsplit(url)
    https = parts.scheme == "https"
    kind = http.client.HTTPSConnection if https else http.client.HTTPConnection
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.netloc.rsplit("@", 1)[-1]):
        return kind(parts.hostname, parts.port, timeout=timeout), target, {}
    p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    auth = {}
    if p.username:
        token = base64.b64encode(f"{urllib.parse.unquote(p.username)}:{urllib.parse.unquote(p.password or '')}"
                                 .encode()).decode()
        auth = {"Proxy-Authorization": f"Basic {token}"}
    if https:  # a CONNECT tunnel through the proxy, TLS to the server inside it
        conn = kind(p.hostname, p.port or 80, timeout=timeout)
        conn.set_tunnel(parts.hostname, parts.port, headers=auth)
        return conn, target, {}
    return http.client.HTTPConnection(p.hostname, p.port or 80, timeout=timeout), url, auth


def _exchange(url: str, data: bytes | None, headers: dict, timeout: float) -> tuple[int, Any, bytes]:
    """One HTTP request on a fresh connection: ``(status, headers, body)``, or ``_Failed``. The socket is shut down
    whatever happens, so a server sees the client go away at once (a read timeout abandons the request)."""
    conn, target, more = _connection(url, timeout)
    sock = resp = None
    try:
        try:
            conn.connect()
        except ssl.SSLError as exc:
            raise _Failed(f"failed (TLS: {exc})", retry=False) from None
        except socket.gaierror as exc:
            raise _Failed(f"failed (cannot resolve the host: {exc})", retry=False) from None
        except TimeoutError:
            raise _Failed(f"could not connect (timed out after {timeout:g} s)", retry=True) from None
        except OSError as exc:  # refused, unreachable, reset during the handshake
            raise _Failed(f"could not connect ({_reason(exc)})", retry=True) from None
        sock = conn.sock  # kept: the connection drops its own reference once the response says "close"
        try:
            conn.request("POST" if data is not None else "GET", target, body=data, headers={**headers, **more})
            resp = conn.getresponse()
            raw = resp.read()
        except TimeoutError:
            raise _Failed(f"timed out after {timeout:g} s; the request was abandoned (connection closed, so the "
                          "server stops working on it)", retry=False, timed_out=True) from None
        except (OSError, http.client.HTTPException) as exc:  # reset, closed without an answer, a cut-off body
            raise _Failed(f"failed ({_reason(exc)})", retry=True) from None
        return resp.status, resp.headers, raw
    finally:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if resp is not None:
            resp.close()
        conn.close()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    name = type(exc).__name__
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    return f"{name}: {text}" if text else name


def retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date), capped; None when absent."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER) if math.isfinite(seconds) else None


def backoff_delay(backoff: float, attempt: int) -> float:
    """The wait before retry number ``attempt`` + 1: ``backoff`` * 2^attempt capped at ``MAX_BACKOFF``, with jitter
    (a uniform draw from its upper half), so clients that failed together do not come back together."""
    top = min(MAX_BACKOFF, backoff * 2 ** attempt)
    return _jitter.uniform(top / 2, top)


def http_json(url: str, body: dict | None = None, *, api_key: str | None = None, timeout: float = 60,
              retries: int = 0, backoff: float = 0.5) -> dict:
    """GET (``body`` None) or POST JSON; every failure is a ``RemoteError`` naming the URL. ``retries`` more
    attempts follow a failure another attempt may fix (no connection, a dropped connection, HTTP 5xx, 429): see
    the module docstring; a read timeout and other 4xx are final at once."""
    headers = {"Accept": "application/json", "User-Agent": "steerscale", "Connection": "close"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(retries + 1):
        wait = None
        try:
            status, answer_headers, raw = _exchange(url, data, headers, timeout)
        except _Failed as f:
            retry, status = f.retry, None
            problem, timed_out = f"request to {url} {f.what}", f.timed_out
            hint = (f"raise the timeout (timeout=, --backend-timeout; now {timeout:g} s) or ask for fewer tokens"
                    if timed_out else HINT)
        else:
            if 200 <= status < 300:
                return _json_object(url, raw)
            retry, timed_out = status >= 500 or status == 429, False
            problem = f"{url} answered HTTP {status}: {_error_message(raw)}"
            hint = ("the server rejected the request; check the model name and the fields it supports"
                    if status < 500 else "the server failed; its log says why")
            if status == 429:
                hint = "the server is overloaded; send fewer requests at once, or raise retries"
            elif status == 404:
                hint = "check the base URL (it usually ends in /v1) and the model name (GET /v1/models lists them)"
            elif 300 <= status < 400:
                hint = f"the server redirects to {answer_headers.get('Location')}: use that URL"
            if retry:
                wait = retry_after(answer_headers.get("Retry-After"))
        if not retry or attempt == retries:
            if attempt:
                problem += f" (after {attempt + 1} attempts)"
            raise RemoteError(problem, hint, status, attempts=attempt + 1, timed_out=timed_out)
        delay = wait if wait is not None else backoff_delay(backoff, attempt)
        log.warning("%s; retrying in %.1f s (attempt %d of %d)", problem, delay, attempt + 2, retries + 1)
        time.sleep(delay)
    raise AssertionError("unreachable")


def _json_object(url: str, raw: bytes) -> dict:
    try:
        out = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RemoteError(f"{url} did not answer with JSON: {raw[:120]!r}", HINT, 200) from None
    if not isinstance(out, dict):
        raise RemoteError(f"{url} answered with JSON that is not an object: {str(out)[:120]}", HINT, 200)
    return out


def _error_message(raw: bytes) -> str:
    """The server's own error message (OpenAI's ``{"error": {"message"}}``, vLLM's ``{"message"}``) or the text."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return raw[:300].decode("utf-8", "replace").strip() or "(empty body)"
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        return str(err.get("message") or err)[:500]
    return str(err)[:500]


def list_models(base_url: str, *, api_key: str | None = None, timeout: float = 10, retries: int = 0,
                backoff: float = 0.5) -> list[str]:
    """The model ids a server serves (``GET /v1/models``)."""
    data = http_json(base_url_of(base_url) + "/models", api_key=api_key, timeout=timeout, retries=retries,
                     backoff=backoff)
    return [m["id"] for m in data.get("data", []) if isinstance(m, dict) and isinstance(m.get("id"), str)]
