"""Layer specs as the CLI and the extraction methods take them: ``auto``, ``N``, ``A-B``, ``A,B,C``, or a causal
trace file ``FILE.json[:K]`` (its top K layers, default 1; ``steer.tracing``)."""

from __future__ import annotations

import os
import re

from ..errors import SteerscaleError

# A trace file written by `steerscale trace -o FILE.json`, optionally followed by how many of its top layers to use.
_TRACE_SPEC = re.compile(r"^(?P<path>.+\.json)(?::(?P<k>\d+))?$", re.IGNORECASE)


def parse_layers(spec, n_layers: int) -> list[int] | str:
    """``auto``, ``N``, ``A-B`` (inclusive), ``A,B,C``, a list of ints, or ``FILE.json[:K]``: the top K (default 1)
    layers of a causal trace (``steerscale trace -o FILE.json``), ranked by their largest indirect effect
    (``steer.tracing.TraceResult.top_layers``)."""
    if spec in (None, "auto"):
        return "auto"
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, str) and (m := _TRACE_SPEC.match(spec.strip())):
        from .tracing import traced_layers

        k = int(m["k"]) if m["k"] is not None else 1
        if k < 1:
            raise SteerscaleError(f"bad layer spec {spec!r}: K must be at least 1", "use FILE.json or FILE.json:3")
        return traced_layers(m["path"], n_layers, k)
    if isinstance(spec, int):
        layers = [spec]
    elif isinstance(spec, (list, tuple)):
        layers = [int(x) for x in spec]
    else:
        try:
            layers = []
            for part in str(spec).split(","):
                a, _, b = part.partition("-")
                layers.extend(range(int(a), int(b) + 1) if b else [int(a)])
        except ValueError:
            raise SteerscaleError(f"bad layer spec {spec!r}", "use auto, N, A-B, A,B,C or a trace file FILE.json[:K]") \
                from None
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise SteerscaleError(f"layer(s) {bad or spec} out of range: this model has {n_layers} blocks",
                              f"use layers between 0 and {n_layers - 1}")
    return sorted(set(layers))


def best_layer(accuracy: dict[int, float], n_layers: int) -> int:
    """The layer with the best held-out probe accuracy; ties (within a point) go toward the middle of the network,
    then to the earlier layer. ``layers=auto`` of every extraction method (``extract``, GrAInS) uses this rule."""
    best = max(accuracy.values())
    near = [layer for layer, a in accuracy.items() if a >= best - 0.01]
    return min(near, key=lambda layer: (abs(layer - (n_layers - 1) / 2), layer))
