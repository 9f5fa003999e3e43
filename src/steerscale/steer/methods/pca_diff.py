"""RepE / repeng control vector: first principal component of the (centred) paired differences."""

import torch

from ._common import orient_and_scale


def first_component(x: torch.Tensor) -> torch.Tensor:
    """Top principal axis of ``x`` after centring (what sklearn's PCA(n_components=1) returns)."""
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[0]


def fit(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, dict]:
    unit = first_component(pos - neg)
    direction, info = orient_and_scale(unit, pos, neg)
    return direction, {**info, "unit_direction_norm": 1.0}
