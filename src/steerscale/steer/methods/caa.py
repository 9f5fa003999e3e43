"""Contrastive Activation Addition (Rimsky et al. 2024): the mean of paired differences.

For pairs the mean of differences equals the difference of means, which is what labelled (unpaired) data gets."""

import torch


def fit(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, dict]:
    diff = pos.double().mean(0) - neg.double().mean(0)
    return diff.float(), {"mean_diff_norm": float(diff.norm())}
