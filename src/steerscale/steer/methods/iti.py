"""Inference-Time Intervention (Li et al. 2023): per attention head, the mass-mean shift between the two sides.

``steer.extract`` reads every head's output (site ``head_out``), ranks heads by held-out probe accuracy and fits
this direction at the top ``iti_heads`` of them."""

import torch


def fit(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Mass-mean shift, unit length, times the std of activations along it (ITI's ``alpha`` is then the scale)."""
    shift = (pos.double() - neg.double()).mean(0)
    unit = shift / shift.norm()
    std = float(torch.cat([pos, neg]).double().matmul(unit).std())
    return (unit * std).float(), {"std_along_direction": std, "mass_mean_norm": float(shift.norm())}
