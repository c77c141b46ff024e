"""Spatial-structure metrics of encoder patch tokens, as the iREPA release defines them
(End2End-Diffusion/iREPA metrics/spatial_metrics.py@99ad4ac).

Every metric takes patch tokens [B, T, D] on a row-major sqrt(T) x sqrt(T) grid (no CLS or
register tokens) and returns one value per image, [B], in fp32. K(t, u) is the cosine
similarity of tokens t and u, d(t, u) the Manhattan distance |drow| + |dcol| on the grid.

- lds:  mean K over near pairs - mean K over far pairs. variant "code" (the reference
        release): near d == 1, far d >= 6. variant "paper": near 0 < d < H/2, far
        d >= H/2 (self pairs, d == 0, are never counted).
- cds:  minus the least-squares slope of g(delta) = mean K at d == delta, delta = 1..8
        (distances the grid does not have are left out of the fit).
- srss: needs a foreground mask per image, pooled to the grid by max pooling (a token is
        foreground if any of its pixels is, as the release's comparison script pools).
        Per foreground anchor: mean K to foreground tokens at d == 1 minus mean K to
        background tokens at d >= 6; averaged over anchors that have both. NaN only where
        the mask has < 2 foreground or < 1 background token, or no anchor has both (the
        release's metric_srss). The release's comparison script also drops images with < 64
        foreground or background tokens before any metric: that is a dataset filter, not
        part of the metric (`mask_filter`, used by irepa.analysis).
- rmsc: sqrt(mean_t ||n_t - mean_u n_u||^2), n_t the L2-normalized token.
- global_share: ||mean_t y_t||^2 / mean_t ||y_t||^2 of the raw tokens, the share of their
        energy in the per-image mean token (what spatial normalization removes): 1 when every
        token is the same, about 1/T for zero-mean noise. Not a spatial metric of the paper; it
        measures the global component they are contrasted with.

Means over pairs pool all (ordered) pairs of one image, so each image weighs the same
in the average over images; `nan_mean` averages per-image values, skipping NaN.

Implementation: one Gram matrix per image (bmm of normalized tokens), and every
distance-bin mean as one matmul of the flattened Gram matrix [B, T*T] with a fixed
[T*T, bins] weight matrix (each column the bin's indicator divided by its pair count),
built once per (grid side, bins, device) and cached; those bin sums accumulate in fp64
(cheap: bins are few). On GPU, enable fp32 matmuls
(torch.backends.cuda.matmul.allow_tf32 = False) if the run set TF32: cosines near 1
lose ~1e-3 under TF32.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from irepa.align import token_grid

NEAR = 1  # release code: 4-neighbours
FAR = 6  # release code and SRSS: pairs at d >= 6
CDS_MAX_DISTANCE = 8
SRSS_MIN_FOREGROUND, SRSS_MIN_BACKGROUND = 2, 1  # metric_srss@99ad4ac: NaN below these
RELEASE_MASK_FILTER = 64  # spatial_metrics_comparison.py@99ad4ac: num_target_count
POOLINGS = ("max", "area")
VARIANTS = ("code", "paper")
METRICS = ("lds", "lds_paper", "cds", "srss", "rmsc", "global_share")


@functools.lru_cache(maxsize=64)
def manhattan_distances(side: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[T, T] int64 Manhattan distances between the cells of a side x side grid."""
    r = torch.arange(side, device=device)
    rows, cols = r.repeat_interleave(side), r.repeat(side)
    return (rows[:, None] - rows[None, :]).abs() + (cols[:, None] - cols[None, :]).abs()


def _bins(side: int, name: str) -> list[tuple[int, float]]:
    """Distance bins as [lo, hi) intervals for the metric `name` on a side x side grid."""
    if name == "lds_code":
        return [(NEAR, NEAR + 1), (FAR, math.inf)]
    if name == "lds_paper":
        half = side / 2
        return [(1, half), (half, math.inf)]
    if name == "cds":
        return [(delta, delta + 1) for delta in range(1, CDS_MAX_DISTANCE + 1)]
    raise ValueError(f"unknown distance bins {name!r}")


@functools.lru_cache(maxsize=64)
def _bin_weights(side: int, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> weights [T*T, bins] fp64 (indicator / pair count) and counts [bins] int64."""
    d = manhattan_distances(side, device).flatten()
    masks = [(d >= lo) & (d < hi) for lo, hi in _bins(side, name)]
    ind = torch.stack(masks, dim=1).double()
    counts = ind.sum(0)
    return ind / counts.clamp(min=1), counts.long()


def _check_feats(feats: torch.Tensor, where: str) -> int:
    if feats.dim() != 3:
        raise ValueError(f"{where}: expected patch tokens [B, T, D], got shape {tuple(feats.shape)}")
    return token_grid(feats.shape[1], where)


def cosine_gram(feats: torch.Tensor) -> torch.Tensor:
    """[B, T, D] -> K [B, T, T] fp32, cosine similarity of every pair of tokens (zero tokens give 0)."""
    n = F.normalize(feats.float(), dim=-1, eps=1e-12)
    return torch.bmm(n, n.transpose(1, 2))


def _bin_means(K: torch.Tensor, side: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of K per distance bin: [B, bins] (NaN for bins with no pairs) and counts [bins]."""
    w, counts = _bin_weights(side, name, K.device)
    # fp64 accumulation: a bin holds up to T*T pairs, and an fp32 sum of ~65K cosines near 1
    # drifts by ~1e-3, as large as the LDS differences between encoders
    g = (K.flatten(1).double() @ w).float()
    return g.masked_fill(counts == 0, math.nan), counts


def lds_from_gram(K: torch.Tensor, side: int, variant: str = "code") -> torch.Tensor:
    if variant not in VARIANTS:
        raise ValueError(f"lds variant must be one of {VARIANTS}, got {variant!r}")
    g, _ = _bin_means(K, side, f"lds_{variant}")
    return g[:, 0] - g[:, 1]


def cds_from_gram(K: torch.Tensor, side: int) -> torch.Tensor:
    g, counts = _bin_means(K, side, "cds")
    present = counts > 0
    if int(present.sum()) < 2:
        return torch.full((K.shape[0],), math.nan, device=K.device)
    g = g[:, present]
    x = torch.arange(1, CDS_MAX_DISTANCE + 1, device=K.device, dtype=g.dtype)[present]
    x0 = x - x.mean()
    slope = (g - g.mean(dim=1, keepdim=True)) @ x0 / (x0 @ x0)
    return -slope


def grid_mask(masks: torch.Tensor, side: int, pooling: str = "max", fraction: float = 0.5) -> torch.Tensor:
    """Foreground masks pooled to the token grid -> bool [B, side*side].

    masks: [B, T] (already on the grid), [B, h, w] or [B, 1, h, w] at any resolution (bool,
    or numbers where non-zero is foreground for "max" and the foreground share for "area").
    pooling "max" (default; metrics/spatial_metrics_comparison.py@99ad4ac, max_pool2d over
    each token's pixels): a token is foreground if any of its pixels is. "area": if at
    least `fraction` of its pixels are. Sizes that are not multiples of the grid use
    adaptive pooling windows.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"mask pooling must be one of {POOLINGS}, got {pooling!r}")
    m = masks.float()
    if m.dim() == 2:
        if m.shape[1] != side * side:
            raise ValueError(f"grid masks have {m.shape[1]} tokens, features have {side * side}")
        return m != 0 if pooling == "max" else m >= fraction
    if m.dim() == 3:
        m = m[:, None]
    if m.dim() != 4 or m.shape[1] != 1:
        raise ValueError(f"masks must be [B, T], [B, h, w] or [B, 1, h, w], got {tuple(masks.shape)}")
    if pooling == "max":
        return (F.adaptive_max_pool2d((m != 0).float(), side) > 0).flatten(1)
    return (F.adaptive_avg_pool2d(m, side) >= fraction).flatten(1)


def mask_filter(fg: torch.Tensor, min_tokens: int = RELEASE_MASK_FILTER) -> torch.Tensor:
    """bool [B]: images whose token mask fg [B, T] has >= min_tokens foreground and >=
    min_tokens background tokens. A dataset filter, applied before any metric as the
    release's comparison script does (load_and_filter_masks, 64 tokens); not part of SRSS."""
    n_fg = fg.sum(1)
    return (n_fg >= min_tokens) & (fg.shape[1] - n_fg >= min_tokens)


def srss_from_gram(K: torch.Tensor, side: int, fg: torch.Tensor) -> torch.Tensor:
    """fg: bool [B, T] foreground tokens (see `grid_mask`)."""
    d = manhattan_distances(side, K.device)
    near, far = (d == NEAR).float(), (d >= FAR).float()
    fgf = fg.float()
    bgf = 1.0 - fgf
    # per anchor a: sum_u K[a,u] near[a,u] fg[u] and its count (near, far are symmetric)
    near_sum = torch.bmm(K * near, fgf[:, :, None])[:, :, 0]
    far_sum = torch.bmm(K * far, bgf[:, :, None])[:, :, 0]
    near_cnt, far_cnt = fgf @ near, bgf @ far
    ok = fg & (near_cnt > 0) & (far_cnt > 0)
    per_anchor = near_sum / near_cnt.clamp(min=1) - far_sum / far_cnt.clamp(min=1)
    n_ok = ok.sum(1)
    value = (per_anchor * ok).sum(1) / n_ok.clamp(min=1)
    n_fg = fg.sum(1)
    keep = (n_fg >= SRSS_MIN_FOREGROUND) & (fg.shape[1] - n_fg >= SRSS_MIN_BACKGROUND) & (n_ok > 0)
    return torch.where(keep, value, torch.full_like(value, math.nan))


def lds(feats: torch.Tensor, variant: str = "code") -> torch.Tensor:
    """Local-vs-distant similarity per image, [B, T, D] -> [B]."""
    side = _check_feats(feats, "lds")
    return lds_from_gram(cosine_gram(feats), side, variant)


def cds(feats: torch.Tensor) -> torch.Tensor:
    """Correlation-decay slope per image (minus the slope of mean K vs d = 1..8), [B, T, D] -> [B]."""
    side = _check_feats(feats, "cds")
    return cds_from_gram(cosine_gram(feats), side)


def srss(feats: torch.Tensor, masks: torch.Tensor, pooling: str = "max", fraction: float = 0.5) -> torch.Tensor:
    """Semantic-region self-similarity per image, NaN where the mask has < 2 fg or < 1 bg token
    (or no anchor has both kinds of pairs); masks pooled to the grid by `grid_mask`."""
    side = _check_feats(feats, "srss")
    fg = _grid_mask_for(feats, masks, side, pooling, fraction)
    return srss_from_gram(cosine_gram(feats), side, fg)


def _grid_mask_for(feats: torch.Tensor, masks: torch.Tensor, side: int, pooling: str = "max",
                   fraction: float = 0.5) -> torch.Tensor:
    if masks.shape[0] != feats.shape[0]:
        raise ValueError(f"srss: {masks.shape[0]} masks for {feats.shape[0]} images")
    return grid_mask(masks.to(feats.device), side, pooling, fraction)


def rmsc(feats: torch.Tensor) -> torch.Tensor:
    """RMS spatial contrast per image: sqrt(mean_t ||n_t - mean_u n_u||^2), [B, T, D] -> [B]."""
    _check_feats(feats, "rmsc")
    n = F.normalize(feats.float(), dim=-1, eps=1e-12)
    return (n - n.mean(dim=1, keepdim=True)).square().sum(-1).mean(1).sqrt()


def global_share(feats: torch.Tensor) -> torch.Tensor:
    """Share of the tokens' energy in their per-image mean, [B, T, D] -> [B] (fp64 sums, fp32 out)."""
    _check_feats(feats, "global_share")
    y = feats.double()
    return (y.mean(1).square().sum(-1) / y.square().sum(-1).mean(1).clamp(min=1e-300)).float()


@torch.no_grad()
def spatial_metrics(feats: torch.Tensor, masks: torch.Tensor | None = None,
                    pooling: str = "max") -> dict[str, torch.Tensor]:
    """All metrics from one Gram matrix: {"lds", "lds_paper", "cds", "rmsc", "global_share"[, "srss"]}, each [B]."""
    side = _check_feats(feats, "spatial_metrics")
    K = cosine_gram(feats)
    out = {
        "lds": lds_from_gram(K, side, "code"),
        "lds_paper": lds_from_gram(K, side, "paper"),
        "cds": cds_from_gram(K, side),
        "rmsc": rmsc(feats),
        "global_share": global_share(feats),
    }
    if masks is not None:
        out["srss"] = srss_from_gram(K, side, _grid_mask_for(feats, masks, side, pooling))
    return out


def nan_mean(values: torch.Tensor | Sequence[float]) -> tuple[float, int]:
    """Mean over the finite entries and how many there were; (nan, 0) when none."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    ok = torch.isfinite(v)
    n = int(ok.sum())
    return (float(v[ok].mean()) if n else math.nan), n


def correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman r (with p-values) over the pairs where both are finite."""
    from scipy import stats

    a = torch.as_tensor(x, dtype=torch.float64)
    b = torch.as_tensor(y, dtype=torch.float64)
    ok = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[ok].numpy(), b[ok].numpy()
    n = len(a)
    if n < 3 or a.std() == 0 or b.std() == 0:
        return {"n": n, "pearson_r": math.nan, "pearson_p": math.nan,
                "spearman_r": math.nan, "spearman_p": math.nan}
    p, s = stats.pearsonr(a, b), stats.spearmanr(a, b)
    return {"n": n, "pearson_r": float(p[0]), "pearson_p": float(p[1]),
            "spearman_r": float(s[0]), "spearman_p": float(s[1])}
