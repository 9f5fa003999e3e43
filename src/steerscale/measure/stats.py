"""Statistics for evaluation results: bootstrap intervals, paired comparisons, k-fold splits. numpy only, seeded.

Why bootstrap: per-example scores are bounded and often binary with small n; a percentile bootstrap gives an
honest interval without normality assumptions and the same code serves accuracy, MC2 mass and KL.
Why paired: two configs scored on the same examples differ far less than two independent samples; the paired
difference (and a sign-flip permutation test on it) uses that and needs far fewer examples.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Hashable, Sequence

import numpy as np

from ..errors import SteerscaleError


def _arr(values, name: str = "values") -> np.ndarray:
    a = np.asarray(list(values), dtype=float)
    if a.ndim != 1 or a.size == 0:
        raise SteerscaleError(f"{name} must be a non-empty 1-D sequence of numbers")
    if not np.isfinite(a).all():
        raise SteerscaleError(f"{name} contains NaN or inf", "drop failed examples before computing statistics")
    return a


@dataclass
class Estimate:
    mean: float
    lo: float
    hi: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.mean:.4f} [{self.lo:.4f}, {self.hi:.4f}] (n={self.n})"


def bootstrap_ci(values: Sequence[float], n_boot: int = 10_000, alpha: float = 0.05, seed: int = 0) -> Estimate:
    """Mean and percentile-bootstrap (1 - alpha) interval."""
    a = _arr(values)
    if a.size == 1:
        return Estimate(float(a[0]), float(a[0]), float(a[0]), 1)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    means = a[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Estimate(float(a.mean()), float(lo), float(hi), int(a.size))


def wilson_ci(successes: int, n: int, alpha: float = 0.05) -> Estimate:
    """A proportion and its Wilson score interval: unlike a bootstrap it stays informative at 0/n and n/n (a
    refusal rate of 0 on 100 prompts is [0, 3.7%], not [0, 0])."""
    if n < 1 or not 0 <= successes <= n:
        raise SteerscaleError(f"a proportion needs 0 <= successes <= n and n >= 1, got {successes}/{n}")
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - alpha / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n)


@dataclass
class Comparison:
    diff: float  # mean(b - a)
    lo: float
    hi: float
    n: int
    p_permutation: float  # two-sided sign-flip permutation test on the paired differences
    p_sign: float  # two-sided exact sign test (ties dropped)
    wins: int  # examples where b > a
    losses: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"diff {self.diff:+.4f} [{self.lo:+.4f}, {self.hi:+.4f}] n={self.n} "
                f"p_perm={self.p_permutation:.4g} p_sign={self.p_sign:.4g} (+{self.wins}/-{self.losses})")


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial sign test, p = 0.5."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return float(min(1.0, 2 * tail))


def permutation_test(diffs: np.ndarray, n_perm: int = 10_000, seed: int = 0) -> float:
    """Two-sided paired permutation (random sign flips) p-value for mean(diffs) == 0, with the +1 correction."""
    obs = abs(diffs.mean())
    if np.all(diffs == 0):
        return 1.0
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(n_perm, diffs.size))
    null = np.abs((signs * diffs).mean(axis=1))
    return float((1 + np.sum(null >= obs - 1e-12)) / (n_perm + 1))


def paired_compare(a: Sequence[float], b: Sequence[float], n_boot: int = 10_000, alpha: float = 0.05,
                   seed: int = 0) -> Comparison:
    """Compare config B against config A on the same examples (same order): difference B - A with a bootstrap
    interval, a paired permutation p-value and a sign-test p-value."""
    x, y = _arr(a, "a"), _arr(b, "b")
    if x.size != y.size:
        raise SteerscaleError(f"paired comparison needs equal lengths, got {x.size} and {y.size}",
                              "align both runs on the same example ids first (see align)")
    d = y - x
    est = bootstrap_ci(d, n_boot, alpha, seed)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    return Comparison(est.mean, est.lo, est.hi, int(d.size), permutation_test(d, n_boot, seed), sign_test(wins, losses),
                      wins, losses)


def align(a: dict[Hashable, float], b: dict[Hashable, float]) -> tuple[list, list[float], list[float]]:
    """Common keys of two ``{example_id: score}`` maps, sorted, with both score lists."""
    keys = sorted(set(a) & set(b), key=str)
    if not keys:
        raise SteerscaleError("the two runs share no example ids", "evaluate both on the same task, limit and seed")
    return keys, [a[k] for k in keys], [b[k] for k in keys]


def fold_of(example_id: Hashable, k: int, seed: int = 0) -> int:
    """A stable fold for an id: a hash, not a position, so a fold never changes when the set grows or reorders."""
    h = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") % k


def kfold(ids: Sequence[Hashable], k: int = 2, seed: int = 0, balanced: bool = True) -> list[tuple[list, list]]:
    """``k`` (train_ids, test_ids) splits. ``balanced`` assigns folds round-robin over a seeded shuffle (equal
    sizes, good for small sets); otherwise by ``fold_of`` (stable under additions)."""
    ids = list(ids)
    if k < 2 or k > len(ids):
        raise SteerscaleError(f"k-fold needs 2 <= k <= number of examples ({len(ids)}), got k={k}")
    if len(set(map(str, ids))) != len(ids):
        raise SteerscaleError("example ids must be unique for k-fold splitting")
    if balanced:
        order = np.random.default_rng(seed).permutation(len(ids))
        fold = {ids[j]: r % k for r, j in enumerate(order)}
    else:
        fold = {i: fold_of(i, k, seed) for i in ids}
    out = []
    for f in range(k):
        test = [i for i in ids if fold[i] == f]
        out.append(([i for i in ids if fold[i] != f], test))
    return out
