"""The steering studio: a web page ``steerscale serve`` serves at ``/`` (docs/studio.md).

The page is static (``serve/studio/``: plain HTML, CSS and one JavaScript module; no build step) and holds no data:
everything it shows comes from the server's own API, as any client would call it -- ``GET /v1/models`` (the model),
``GET /v1/steering/{vectors,conditions,controllers,saes}`` (the pickers) and ``POST /v1/chat/completions`` with the
``steer`` field (and ``strategy`` for the fourth column), one request per column. The one thing the API does not
list, the scaling strategies the server's library knows and their knobs, is ``GET /studio/strategies.json``.
So what a user sees in the studio is what the API does, and an API key guards the studio's data exactly as it
guards the API: the page asks for the key when ``/v1`` answers 401 and sends it as ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from .schema import ApiError

# the page's files and their media types; nothing else under serve/studio/ is served
FILES = {"index.html": "text/html; charset=utf-8", "studio.js": "text/javascript; charset=utf-8",
         "studio.css": "text/css; charset=utf-8"}


def page_file(name: str) -> bytes:
    """One of the page's ``FILES`` (a 404 ``ApiError`` for any other name)."""
    if name not in FILES:
        raise ApiError(404, f"no studio file {name!r}; the studio serves {', '.join(sorted(FILES))}",
                       type="not_found_error", code="not_found")
    return resources.files("steerscale.serve").joinpath("studio", name).read_bytes()


def strategies() -> dict:
    """The scaling strategies a request's ``strategy`` field may name (``scale.STRATEGIES``), each with its knobs."""
    from ..scale import STRATEGIES
    from ..scale.spec import strategy_knobs

    return {"object": "list", "data": [{"id": name, "knobs": sorted(strategy_knobs(name))} for name in STRATEGIES]}


def studio_router() -> APIRouter:
    """``GET /`` (the page), ``GET /studio/FILE`` (its script and style) and ``GET /studio/strategies.json``. Not in
    the OpenAPI document: they are the page, not the API."""
    router = APIRouter(include_in_schema=False)

    def send(name: str) -> Response:
        # no-cache: a page from an older server version must not outlive a restart
        return Response(page_file(name), media_type=FILES[name], headers={"Cache-Control": "no-cache"})

    @router.get("/")
    async def index():
        return send("index.html")

    @router.get("/studio/strategies.json")
    async def strategy_list():
        return strategies()

    @router.get("/studio/{name}")
    async def asset(name: str):
        return send(name)

    return router
