"""RepE ``pca_center``: PCA of activations centred on each pair's midpoint."""

import torch

from ._common import orient_and_scale
from .pca_diff import first_component


def fit(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, dict]:
    center = (pos + neg) / 2
    unit = first_component(torch.cat([pos - center, neg - center]))
    return orient_and_scale(unit, pos, neg)
