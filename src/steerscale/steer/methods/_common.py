"""Helpers shared by direction-finding methods."""

import torch


def orient_and_scale(unit: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Orient a unit direction toward the positive side and give it the mean difference's length along it.

    Orientation follows repeng: the sign under which more pairs project higher for the positive text.
    Length: the mean projected difference, so ``scale=1`` moves as far as the data's own mean shift does.
    """
    unit = unit / unit.norm()
    proj_pos, proj_neg = pos.double() @ unit.double(), neg.double() @ unit.double()
    if proj_pos.shape != proj_neg.shape:  # labelled data: orient and size by the class means
        gap = float(proj_pos.mean() - proj_neg.mean())
        return (unit * gap).float(), {"class_mean_gap": abs(gap)}
    agree = float((proj_pos > proj_neg).double().mean())
    if agree < 0.5:
        unit, agree = -unit, 1.0 - agree
    strength = float(((proj_pos - proj_neg).abs()).mean()) if agree == 1.0 else abs(float((proj_pos - proj_neg).mean()))
    return (unit * strength).float(), {"pair_agreement": agree, "strength": strength}
