"""Logistic-regression probe direction, with its held-out accuracy recorded."""

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from ._common import orient_and_scale

NAME = "probe"


def split_pairs(n_pairs: int, holdout: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train/held-out pair indices; both texts of a pair stay on one side so no pair leaks across."""
    order = np.random.default_rng(seed).permutation(n_pairs)
    n_hold = max(1, int(round(n_pairs * holdout))) if n_pairs > 1 else 0
    return order[n_hold:], order[:n_hold]


def probe_accuracy(pos: torch.Tensor, neg: torch.Tensor, holdout: float = 0.3, seed: int = 0, C: float = 1.0):
    """(held-out accuracy, fitted classifier). Features are standardised with train statistics."""
    train, test = split_pairs(pos.shape[0], holdout, seed)
    x_tr = torch.cat([pos[train], neg[train]]).double().numpy()
    y_tr = np.r_[np.ones(len(train)), np.zeros(len(train))]
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    clf = LogisticRegression(C=C, max_iter=2000).fit((x_tr - mu) / sd, y_tr)
    if len(test) == 0:
        return float("nan"), clf, mu, sd
    x_te = torch.cat([pos[test], neg[test]]).double().numpy()
    y_te = np.r_[np.ones(len(test)), np.zeros(len(test))]
    return float(clf.score((x_te - mu) / sd, y_te)), clf, mu, sd


def fit(pos: torch.Tensor, neg: torch.Tensor, holdout: float = 0.3, seed: int = 0, C: float = 1.0):
    acc, clf, _, sd = probe_accuracy(pos, neg, holdout, seed, C)
    # The classifier acts on standardised features; w/sd is its normal in the raw activation space.
    unit = torch.from_numpy(clf.coef_[0] / sd).float()
    direction, info = orient_and_scale(unit, pos, neg)
    return direction, {**info, "probe_accuracy": acc}
