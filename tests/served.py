"""Steering artifacts for tests of servers on the tiny llama (``tiny.tiny_model("llama")``): the two random
vectors ``a`` (layer 0) and ``b`` (layer 1) that server tests register, a condition that always holds and one that
never does, a token gate that opens at once and one that never does, and a small random controller. Seeded, so every test module that serves them serves the same."""

from __future__ import annotations

import torch

from steerscale import Site, SiteKind
from steerscale.engine.token_gates import TokenGate
from steerscale.steer.conditional import Condition
from steerscale.steer.controller import SteeringController
from steerscale.steer.vector import SteeringVector


def random_vectors(layout, seed: int = 3, norm: float = 3.0) -> dict[str, SteeringVector]:
    """``{"a": layer 0, "b": layer 1}`` residual-stream vectors of standard normal entries times ``norm``."""
    g = torch.Generator().manual_seed(seed)
    sites = {name: Site(layer, SiteKind.RESID_POST) for name, layer in (("a", 0), ("b", 1))}
    return {name: SteeringVector({s: torch.randn(layout.site_dim(s), generator=g) * norm}) for name, s in sites.items()}


def fixed_conditions(layout) -> dict[str, Condition]:
    """``always`` (cosine > -2: holds for every prompt) and ``never`` (cosine > 2) at layer 0."""
    dim = layout.site_dim(Site(0))
    return {name: Condition(Site(0), torch.ones(dim), torch.zeros(dim), t) for name, t in (("always", -2.0),
                                                                                            ("never", 2.0))}


def fixed_gates(layout) -> dict[str, TokenGate]:
    """``open`` (fires at the last prompt token: the vector steers every generated token) and ``shut`` (never fires),
    both read at layer 0."""
    dim = layout.site_dim(Site(0))
    return {"open": TokenGate(Site(0), torch.zeros(dim), 20.0), "shut": TokenGate(Site(0), torch.zeros(dim), -20.0)}


def random_controller(layout, vector: SteeringVector, seed: int = 5, max_strength: float = 6.0) -> SteeringController:
    """A controller reading layer 0 with a random two-layer net, steering ``vector`` up to ``max_strength``."""
    g = torch.Generator().manual_seed(seed)
    dim = layout.site_dim(Site(0))
    net = {"w1": torch.randn(8, dim, generator=g), "b1": torch.zeros(8), "w2": torch.randn(2, 8, generator=g),
           "b2": torch.zeros(2), "feature_mean": torch.zeros(dim), "feature_std": torch.ones(dim)}
    return SteeringController(vector, [Site(0)], net, max_strength=max_strength)


def api_call(server, path: str, data: bytes | None = None, method: str = "GET") -> tuple[int, dict]:
    """``(status, JSON body)`` of a plain HTTP request to a running test server's ``path`` (a 4xx too)."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(server.url.rsplit("/v1", 1)[0] + path, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
