"""Correlation across a handful of targets: Pearson and Spearman r with a bootstrap interval and
a permutation p-value.

With 5-15 targets the usual t-based p-value of r leans on normality that a few points cannot
show, so each coefficient comes with
- a percentile bootstrap interval: the targets resampled with replacement (pairs kept), r of
  each resample (resamples whose x or y is constant have no r and are left out), the
  (alpha/2, 1 - alpha/2) percentiles;
- a two-sided permutation p-value: the share of pairings (y permuted against x) whose |r| is at
  least the observed |r|; every pairing when n! <= `permutations` (exact), else that many
  random ones, counted as (hits + 1) / (draws + 1) so that p is never 0.
Spearman's rho is Pearson's r of the average ranks (scipy.stats.spearmanr's definition).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.stats import rankdata

TIE = 1e-12  # relative tolerance: a permuted |r| equal to the observed one up to round-off counts as a hit


def pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of x, y [..., n] (NaN where a row is constant)."""
    xc = x - x.mean(-1, keepdims=True)
    yc = y - y.mean(-1, keepdims=True)
    den = np.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(-1) / den
    return np.where(den > 0, np.clip(r, -1.0, 1.0), np.nan)


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return pearson_rows(rankdata(x, axis=-1), rankdata(y, axis=-1))


METHODS = {"pearson": pearson_rows, "spearman": spearman_rows}


def bootstrap_interval(x, y, method: str = "pearson", resamples: int = 10_000, alpha: float = 0.05,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of r over paired bootstrap resamples (rng: numpy default_rng(seed),
    indices rng.integers(0, n, (resamples, n)))."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    idx = np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))
    r = METHODS[method](x[idx], y[idx])
    r = r[np.isfinite(r)]
    if len(r) == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(r, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def permutation_p(x, y, method: str = "pearson", permutations: int = 20_000, seed: int = 0) -> tuple[float, bool]:
    """(two-sided p of |r| under random pairings, whether every pairing was counted)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    fn = METHODS[method]
    observed = abs(float(fn(x, y)))
    exact = math.factorial(n) <= permutations
    if exact:
        order = np.array(list(itertools.permutations(range(n))))
    else:
        rng = np.random.default_rng(seed)
        order = np.argsort(rng.random((permutations, n)), axis=1)
    null = np.abs(fn(np.broadcast_to(x, order.shape), y[order]))
    hits = int(np.count_nonzero(null >= observed * (1 - TIE)))
    return (hits / len(order), True) if exact else ((hits + 1) / (len(order) + 1), False)


def correlate(x, y, resamples: int = 10_000, permutations: int = 20_000, alpha: float = 0.05,
              seed: int = 0) -> dict:
    """Pearson and Spearman r of the finite pairs, each with its bootstrap interval and permutation p.
    r and all else are NaN below 3 pairs or when x or y is constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    out: dict = {"n": int(len(x))}
    for method, fn in METHODS.items():
        r = float(fn(x, y)) if len(x) >= 3 else math.nan
        if math.isnan(r):
            out.update({method: math.nan, f"{method}_lo": math.nan, f"{method}_hi": math.nan,
                        f"{method}_p": math.nan})
            continue
        lo, hi = bootstrap_interval(x, y, method, resamples, alpha, seed)
        p, exact = permutation_p(x, y, method, permutations, seed)
        out.update({method: r, f"{method}_lo": lo, f"{method}_hi": hi, f"{method}_p": p})
        out["p_exact"] = exact
    return out
