"""Layer specs as the CLI and the extraction methods take them: ``auto``, ``N``, ``A-B`` or ``A,B,C``."""

from __future__ import annotations

from ..errors import SteerscaleError


def parse_layers(spec, n_layers: int) -> list[int] | str:
    """``auto``, ``N``, ``A-B`` (inclusive), ``A,B,C`` or a list of ints."""
    if spec in (None, "auto"):
        return "auto"
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
            raise SteerscaleError(f"bad layer spec {spec!r}", "use auto, N, A-B or A,B,C") from None
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise SteerscaleError(f"layer(s) {bad or spec} out of range: this model has {n_layers} blocks",
                              f"use layers between 0 and {n_layers - 1}")
    return sorted(set(layers))
