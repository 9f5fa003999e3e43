"""Contrastive Activation Addition (Rimsky et al. 2024): the mean of paired differences."""

import torch

NAME = "caa"


def fit(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, dict]:
    diff = pos.double() - neg.double()
    return diff.mean(0).float(), {"mean_diff_norm": float(diff.mean(0).norm())}
