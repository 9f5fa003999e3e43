"""Logistic-regression probe direction, with its held-out accuracy recorded."""

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from ._common import orient_and_scale

NAME = "probe"
PAIRED_ONLY = False


def split_pairs(n_pairs: int, holdout: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train/held-out pair indices; both texts of a pair stay on one side so no pair leaks across."""
    order = np.random.default_rng(seed).permutation(n_pairs)
    n_hold = max(1, int(round(n_pairs * holdout))) if n_pairs > 1 else 0
    return order[n_hold:], order[:n_hold]


def probe_accuracy(pos: torch.Tensor, neg: torch.Tensor, holdout: float = 0.3, seed: int = 0, C: float = 1.0):
    """(held-out accuracy, fitted classifier, mean, std). Features are standardised with train statistics.

    Row i of ``pos`` and ``neg`` is one pair when both have the same length (the pair stays on one side of the
    split); otherwise (labelled data) each class is split on its own."""
    if pos.shape[0] == neg.shape[0]:
        tr_p, te_p = split_pairs(pos.shape[0], holdout, seed)
        tr_n, te_n = tr_p, te_p
    else:
        tr_p, te_p = split_pairs(pos.shape[0], holdout, seed)
        tr_n, te_n = split_pairs(neg.shape[0], holdout, seed + 1)
    x_tr = torch.cat([pos[tr_p], neg[tr_n]]).double().numpy()
    y_tr = np.r_[np.ones(len(tr_p)), np.zeros(len(tr_n))]
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    clf = LogisticRegression(C=C, max_iter=2000).fit((x_tr - mu) / sd, y_tr)
    if len(te_p) == 0 or len(te_n) == 0:
        return float("nan"), clf, mu, sd
    x_te = torch.cat([pos[te_p], neg[te_n]]).double().numpy()
    y_te = np.r_[np.ones(len(te_p)), np.zeros(len(te_n))]
    return float(clf.score((x_te - mu) / sd, y_te)), clf, mu, sd


def fit(pos: torch.Tensor, neg: torch.Tensor, holdout: float = 0.3, seed: int = 0, C: float = 1.0):
    acc, clf, _, sd = probe_accuracy(pos, neg, holdout, seed, C)
    # The classifier acts on standardised features; w/sd is its normal in the raw activation space.
    unit = torch.from_numpy(clf.coef_[0] / sd).float()
    direction, info = orient_and_scale(unit, pos, neg)
    return direction, {**info, "probe_accuracy": acc}
