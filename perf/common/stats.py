"""Quantiles of timing samples (nearest rank: every figure is a time that was measured)."""
from __future__ import annotations


def quantile(xs, q: float) -> float:
    xs = sorted(xs)
    if not xs:
        raise ValueError("quantile of no samples")
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def quantiles(xs, qs=(0.5, 0.2, 0.8)) -> tuple[float, ...]:
    """(median, p20, p80) by default: the three figures every timing row carries."""
    return tuple(quantile(xs, q) for q in qs)
