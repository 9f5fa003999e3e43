"""Logistic-regression probe direction, with its held-out accuracy recorded.

The probe is L2-regularised logistic regression on standardised features, the objective of scikit-learn's
``LogisticRegression(C=C)`` (``C * sum(log-loss) + |w|^2 / 2``, intercept unpenalised), solved by Newton's
method for many sites at once: an ITI sweep fits one probe per attention head (270 on SmolLM2), and one
batched solve replaces hundreds of separate fits. ``tests/test_steer.py`` checks it against scikit-learn.
"""

import numpy as np
import torch

from ._common import orient_and_scale


def split_pairs(n_pairs: int, holdout: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train/held-out pair indices; both texts of a pair stay on one side so no pair leaks across."""
    order = np.random.default_rng(seed).permutation(n_pairs)
    n_hold = max(1, int(round(n_pairs * holdout))) if n_pairs > 1 else 0
    return order[n_hold:], order[:n_hold]


def _penalised_loss(x1: torch.Tensor, y: torch.Tensor, w: torch.Tensor, C: float) -> torch.Tensor:
    margin = torch.einsum("snd,sd->sn", x1, w)
    return C * torch.nn.functional.softplus(margin).sub(y * margin).sum(1) + 0.5 * w[:, :-1].pow(2).sum(1)


def _newton_step(hess: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``hess^-1 grad`` for every site: one batched solve, or one site at a time when torch's batched LU refuses
    finite, well-posed systems ("Pivots given to lu_solve must all be greater or equal to 1": seen on this CPU
    build in a process that had loaded a transformers checkpoint earlier; the unbatched solve is unaffected)."""
    try:
        return torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
    except RuntimeError:
        return torch.stack([torch.linalg.solve(h, g) for h, g in zip(hess, grad)])


def fit_logistic(x: torch.Tensor, y: torch.Tensor, C: float = 1.0, max_iter: int = 100,
                 tol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``(S, d)`` and intercepts ``(S,)`` of S independent L2 logistic regressions on ``x`` ``(S, n, d)``
    with labels ``y`` ``(n,)`` in {0, 1}. Damped Newton steps (halved until the loss does not rise)."""
    x = x.double()
    y = y.double()
    s, n, d = x.shape
    x1 = torch.cat([x, torch.ones(s, n, 1, dtype=x.dtype)], dim=2)
    w = torch.zeros(s, d + 1, dtype=x.dtype)
    ridge = torch.ones(d + 1, dtype=x.dtype)
    ridge[-1] = 0.0
    loss = _penalised_loss(x1, y, w, C)
    for _ in range(max_iter):
        p = torch.sigmoid(torch.einsum("snd,sd->sn", x1, w))
        grad = C * torch.einsum("snd,sn->sd", x1, p - y) + ridge * w
        hess = C * torch.einsum("snd,sn,sne->sde", x1, p * (1 - p), x1) + torch.diag_embed(ridge.expand(s, -1))
        hess = hess + 1e-10 * torch.eye(d + 1, dtype=x.dtype)  # intercept-only flat directions stay solvable
        step = _newton_step(hess, grad)
        t = torch.ones(s, 1, dtype=x.dtype)
        for _ in range(30):  # per-site backtracking: a full Newton step can overshoot on separable data
            new_loss = _penalised_loss(x1, y, w - t * step, C)
            worse = new_loss > loss + 1e-12 * loss.abs()
            if not worse.any():
                break
            t = torch.where(worse[:, None], t / 2, t)
        w = w - t * step
        loss = new_loss
        if (t * step).abs().max() < tol * (1 + w.abs().max()):
            break
    return w[:, :-1], w[:, -1]


def _split(n_pos: int, n_neg: int, holdout: float, seed: int):
    if n_pos == n_neg:  # paired rows: a pair stays on one side of the split
        tr_p, te_p = split_pairs(n_pos, holdout, seed)
        return tr_p, te_p, tr_p, te_p
    tr_p, te_p = split_pairs(n_pos, holdout, seed)
    tr_n, te_n = split_pairs(n_neg, holdout, seed + 1)
    return tr_p, te_p, tr_n, te_n


def probe_accuracies(pos: list[torch.Tensor], neg: list[torch.Tensor], holdout: float = 0.3, seed: int = 0,
                     C: float = 1.0, max_bytes: float = 5e8) -> list[tuple[float, np.ndarray, float, np.ndarray]]:
    """For each site ``k``: (held-out accuracy, weights on standardised features, intercept, feature std).

    All sites must have the same row counts (one capture pass gives that); features are standardised with the
    training rows' statistics, site by site. Row i of ``pos`` and ``neg`` is one pair when both have the same
    length; otherwise (labelled data) each class is split on its own. Sites are solved in batches of about
    ``max_bytes`` of float64 work arrays."""
    d = pos[0].shape[1]
    per_site = 8 * ((pos[0].shape[0] + neg[0].shape[0]) * (d + 1) * 3 + 2 * (d + 1) ** 2)
    chunk = max(1, int(max_bytes // per_site))
    if len(pos) > chunk:
        return [r for i in range(0, len(pos), chunk)
                for r in probe_accuracies(pos[i:i + chunk], neg[i:i + chunk], holdout, seed, C, max_bytes)]
    n_pos, n_neg = pos[0].shape[0], neg[0].shape[0]
    tr_p, te_p, tr_n, te_n = _split(n_pos, n_neg, holdout, seed)
    x_tr = torch.stack([torch.cat([p[tr_p], q[tr_n]]) for p, q in zip(pos, neg)]).double()
    y_tr = torch.cat([torch.ones(len(tr_p)), torch.zeros(len(tr_n))]).double()
    mu, sd = x_tr.mean(1, keepdim=True), x_tr.std(1, unbiased=False, keepdim=True) + 1e-6
    w, b = fit_logistic((x_tr - mu) / sd, y_tr, C)
    if len(te_p) and len(te_n):
        x_te = torch.stack([torch.cat([p[te_p], q[te_n]]) for p, q in zip(pos, neg)]).double()
        y_te = torch.cat([torch.ones(len(te_p)), torch.zeros(len(te_n))]).double()
        pred = (torch.einsum("snd,sd->sn", (x_te - mu) / sd, w) + b[:, None] > 0).double()
        acc = (pred == y_te).double().mean(1).tolist()
    else:
        acc = [float("nan")] * len(pos)
    return [(acc[k], w[k].numpy(), float(b[k]), sd[k, 0].numpy()) for k in range(len(pos))]


def probe_accuracy(pos: torch.Tensor, neg: torch.Tensor, holdout: float = 0.3, seed: int = 0, C: float = 1.0):
    """(held-out accuracy, weights on standardised features, intercept, feature std) of one probe."""
    return probe_accuracies([pos], [neg], holdout, seed, C)[0]


def fit(pos: torch.Tensor, neg: torch.Tensor, holdout: float = 0.3, seed: int = 0, C: float = 1.0):
    acc, coef, _, sd = probe_accuracy(pos, neg, holdout, seed, C)
    # The classifier acts on standardised features; w/sd is its normal in the raw activation space.
    unit = torch.from_numpy(coef / sd).float()
    direction, info = orient_and_scale(unit, pos, neg)
    return direction, {**info, "probe_accuracy": acc}
