"""FID, sFID, Inception Score, precision and recall as the ADM evaluation suite defines them.

Definitions (guided-diffusion's evaluations/evaluator.py, Dhariwal & Nichol 2021):
- FID: Frechet distance between Gaussians fitted (mean, unbiased covariance) to the
  2048-d pool_3 features of the reference batch and of the samples.
- sFID: the same on the spatial mixed_6/conv features (first 7 channels, 17x17x7).
- IS: exp(E_x KL(p(y|x) || p(y))) over splits of 5000 samples, softmax over the 1008
  Inception logits, mean over splits.
- Precision / recall (Kynkaanniemi et al. 2019): k-NN manifolds (k = 3) on pool_3
  features with squared Euclidean distances; precision = fraction of samples inside the
  reference manifold, recall = fraction of reference images inside the sample manifold.
  Distances are computed as ADM does by default (`pr_dtype="float16"`: fp16 arithmetic in
  10000 x 10000 blocks, a block recomputed in fp32 where fp16 overflows); "float32" computes
  them in fp32. The choice is not below rounding: fp16's ~3 significant digits (on norms
  larger than the distances) move points across k-NN radii, and a distance tied with a radius
  counts as inside; on 2,000 synthetic 2048-d features fp16 gives precision higher by 0.0005
  to 0.0075 and recall by 0 to 0.004.
A reference .npz holds images under 'arr_0' and may hold precomputed 'mu', 'sigma',
'mu_s', 'sigma_s' (ADM's VIRTUAL_imagenet256 batches); the stats are then used as given
and the images only serve precision/recall.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .inception import InceptionV3, load_inception
from .npz import iter_npz_array, npz_array_info, npz_keys

from irepa.errors import InputError, InputNotFound


# ---------------------------------------------------------------- Frechet distance
def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))): a symmetric eigenproblem, stable
    where scipy's sqrtm of the non-symmetric product needs ADM's eps fallback.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"statistics disagree: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    r1 = _sqrt_psd(s1)
    ev = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = np.sqrt(np.clip(ev, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


@dataclass
class Stats:
    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, acts: np.ndarray) -> "Stats":
        acts = np.asarray(acts, np.float64)
        if acts.ndim != 2 or acts.shape[0] < 2:
            raise ValueError(f"need activations [N >= 2, D], got {acts.shape}")
        return cls(acts.mean(0), np.cov(acts, rowvar=False))

    def fd(self, other: "Stats") -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


# ---------------------------------------------------------------- Inception Score
def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    p = torch.from_numpy(np.asarray(logits, np.float64)).softmax(-1).numpy()
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = part * (np.log(part + 1e-30) - np.log(part.mean(0, keepdims=True) + 1e-30))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


# ---------------------------------------------------------------- precision / recall
def _sq_dists_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # ADM's order of operations, (|a|^2 - 2 a.b) + |b|^2; it matters once rounded to fp16
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.t() + (b * b).sum(1)[None]
    return d.clamp_min_(0)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16, held in fp32 (which holds every fp16 value exactly)."""
    return x.half().float()


def _sq_dists_fp16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ADM's fp16 distance block (guided-diffusion 22e0df8, evaluations/evaluator.py,
    DistanceBlock and _batch_pairwise_distances), emulated in fp32 on any device.

    ADM casts both batches to fp16 and evaluates (|u|^2 - 2 u.v) + |v|^2 in TensorFlow fp16 on
    GPU. Each elementwise op (square, -, +, max 0) is one IEEE fp16 op; an fp32 op on fp16
    values rounded to fp16 is exactly that op (fp32's 24 bits >= 2 * 11 + 2, so the double
    rounding is innocuous). The matmul: TF runs fp16 GEMMs through cuBLAS with fp32 compute
    (TF_FP16_MATMUL_USE_FP32_COMPUTE defaults to true, tensorflow/core/util/matmul_autotune.cc)
    and an fp16 output: products of fp16 values are exact in fp32, so an fp32 matmul of the
    fp16 values rounded to fp16 is it, up to fp32 summation order (which flips ~1 in 6000
    entries by one fp16 step). The row norms are fp16 sums (`_tf_gpu_row_sum`). A block with
    any non-finite value (fp16 overflows above 65504) is recomputed in fp32, as ADM's tf.cond
    does (there TF >= 2.4 on Ampere+ GPUs would use TF32; we keep full fp32).
    Checked against ADM's own DistanceBlock run by TensorFlow 2.21 on CPU: given TF's norms,
    every block agrees bit for bit but for that GEMM summation order (TF's CPU kernels sum the
    norms in another fp16 order than its GPU ones, which no CPU run shows).
    """
    a16, b16 = _fp16(a), _fp16(b)
    na = _tf_gpu_row_sum(_fp16(a16 * a16))[:, None]
    nb = _tf_gpu_row_sum(_fp16(b16 * b16))[None]
    d = _fp16_(a16 @ b16.t())  # in place from here: a block is 10000 x 10000
    d = _fp16_(_fp16_(d.mul_(-2).add_(na)).add_(nb)).clamp_min_(0)
    return d if bool(torch.isfinite(d).all()) else _sq_dists_fp32(a, b)


def _tf_gpu_row_sum(x: torch.Tensor) -> torch.Tensor:
    """Row sums [N] of fp16 values x [N, D] as TF's reduce_sum adds fp16 on GPU: in fp16, each
    addition rounded, in the order of tensorflow/core/kernels/reduction_gpu_kernels.cu.h (Sum<half>;
    only the mean accumulates in fp32). Rows under 1024 columns: one warp per row, lane l adding
    columns l, l + 32, ... in turn, then a shuffle-down tree over the 32 lanes. Wider rows (ADM's
    2048-d features): CUB's segmented reduce, 256 threads each adding columns t, t + 256, ... in
    turn (rows up to one CUB tile), a shuffle tree in each warp, then the 8 warp sums in turn.
    Summing in fp32 instead moves a 2048-d norm by up to 2 fp16 steps, in ~40% of rows."""
    n, d = x.shape
    threads = 32 if d < 1024 else 256
    cols = torch.nn.functional.pad(x, (0, (-d) % threads)).view(n, -1, threads)  # + 0 is exact
    acc = cols[:, 0]
    for k in range(1, cols.shape[1]):
        acc = _fp16(acc + cols[:, k])
    warps = acc.view(n, -1, 32)
    while warps.shape[-1] > 1:  # shuffle-down by 1, 2, 4, 8, 16: lane 0 pairs neighbours, level by level
        warps = _fp16(warps[..., 0::2] + warps[..., 1::2])
    total = warps[:, 0, 0]
    for w in range(1, warps.shape[1]):
        total = _fp16(total + warps[:, w, 0])
    return total


def _fp16_(x: torch.Tensor) -> torch.Tensor:
    return x.copy_(x.half())


_SQ_DISTS = {"float16": _sq_dists_fp16, "float32": _sq_dists_fp32}
PR_DTYPES = tuple(_SQ_DISTS)


def check_pr_dtype(dtype: str) -> str:
    """`dtype` if precision/recall can compute its distances in it, else an InputError."""
    if dtype not in _SQ_DISTS:
        raise InputError(f"precision/recall dtype must be one of {', '.join(PR_DTYPES)}, got {dtype!r}")
    return dtype


def _sq_dists_fn(dtype: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return _SQ_DISTS[check_pr_dtype(dtype)]


def manifold_radii(feats: torch.Tensor, k: int = 3, batch: int = 10000, dtype: str = "float16") -> torch.Tensor:
    """Squared distance of every point to its k-th nearest neighbour (itself excluded) [N].

    As ADM: the (k+1)-th smallest entry of the point's row of distances, itself included,
    the rows in `batch` x `batch` blocks of `dtype` distances.
    """
    if feats.shape[0] <= k:
        raise ValueError(f"k-NN radii need more than k={k} points, got {feats.shape[0]}")
    sq_dists = _sq_dists_fn(dtype)
    out = []
    for i in range(0, len(feats), batch):
        rows = feats[i:i + batch]
        best = None  # running k+1 smallest per row (self included, at ~0)
        for j in range(0, len(feats), batch):
            d = sq_dists(rows, feats[j:j + batch])
            cand = d if best is None else torch.cat([best, d], 1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values
        out.append(best[:, k])
    return torch.cat(out)


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = 3, batch: int = 10000,
                     device="cpu", dtype: str = "float16") -> tuple[float, float]:
    """ADM's improved precision and recall on feature sets [N, D] (k-NN manifolds).

    dtype "float16" (default) computes the distances as ADM's evaluator does; "float32" in fp32.
    """
    sq_dists = _sq_dists_fn(dtype)
    r = torch.as_tensor(np.asarray(ref), dtype=torch.float32, device=device)
    s = torch.as_tensor(np.asarray(samples), dtype=torch.float32, device=device)
    with _fp32_matmuls():
        rad_r, rad_s = manifold_radii(r, k, batch, dtype), manifold_radii(s, k, batch, dtype)
        s_in_r = torch.zeros(len(s), dtype=torch.bool, device=device)
        r_in_s = torch.zeros(len(r), dtype=torch.bool, device=device)
        for i in range(0, len(r), batch):
            for j in range(0, len(s), batch):
                d = sq_dists(r[i:i + batch], s[j:j + batch])
                s_in_r[j:j + batch] |= (d <= rad_r[i:i + batch, None]).any(0)
                r_in_s[i:i + batch] |= (d <= rad_s[None, j:j + batch]).any(1)
    return s_in_r.double().mean().item(), r_in_s.double().mean().item()


@contextmanager
def _fp32_matmuls():
    """CUDA matmuls in full fp32 for the duration, whatever TF32 setting the caller made."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# ---------------------------------------------------------------- activations
@torch.no_grad()
def activations(net: InceptionV3, batches: Iterable, device="cpu") -> dict[str, np.ndarray]:
    """Run Inception over image batches (uint8 [B, H, W, 3] arrays or tensors) -> pool/spatial/logits."""
    out: dict[str, list] = {"pool": [], "spatial": [], "logits": []}
    for b in batches:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # the metric is defined in fp32
            feats = net(b.to(device) if torch.is_tensor(b) else torch.from_numpy(np.array(b)).to(device))
        for key in out:
            out[key].append(feats[key].double().cpu().numpy())
    if not out["pool"]:
        raise InputError("no images to evaluate")
    return {k: np.concatenate(v) for k, v in out.items()}


def check_images(path: str | Path) -> tuple[int, ...]:
    """Shape of the ADM image batch in `path` (uint8 [N, H, W, 3] under arr_0), or an error naming it."""
    shape, dtype = npz_array_info(path, "arr_0")
    if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
        raise InputError(f"{path}: 'arr_0' must be uint8 [N, H, W, 3] (ADM format), got {dtype} {shape}")
    return shape


def check_reference(path: str | Path) -> bool:
    """Error unless `path` holds images or mu/sigma statistics; True when it holds images."""
    keys = set(npz_keys(path))
    if "arr_0" in keys:
        check_images(path)
    elif not {"mu", "sigma"} <= keys:
        raise InputError(f"{path}: needs images under 'arr_0' or statistics 'mu'/'sigma' (has {sorted(keys)})")
    return "arr_0" in keys


def npz_activations(net: InceptionV3, path: str | Path, batch: int = 100, device="cpu") -> dict[str, np.ndarray]:
    check_images(path)
    return activations(net, iter_npz_array(path, "arr_0", batch), device)


@dataclass
class Reference:
    """A reference batch: FID/sFID statistics, plus pool features when images are present."""
    pool: Stats
    spatial: Stats | None
    pool_acts: np.ndarray | None


def load_reference(net: InceptionV3 | None, path: str | Path, batch: int = 100, device="cpu") -> Reference:
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"reference batch not found: {path}")
    keys = set(npz_keys(path))
    acts = npz_activations(net, path, batch, device) if "arr_0" in keys and net is not None else None
    with np.load(path) as z:
        if "mu" in keys and "sigma" in keys:
            pool = Stats(z["mu"], z["sigma"])
            spatial = Stats(z["mu_s"], z["sigma_s"]) if "mu_s" in keys and "sigma_s" in keys else None
        elif acts is not None:
            pool, spatial = Stats.of(acts["pool"]), Stats.of(acts["spatial"])
        else:
            raise InputError(f"{path}: needs images under 'arr_0' or statistics 'mu'/'sigma' (has {sorted(keys)})")
    if spatial is None and acts is not None:
        spatial = Stats.of(acts["spatial"])
    return Reference(pool, spatial, None if acts is None else acts["pool"])


def evaluate(ref: Reference, sample_acts: dict[str, np.ndarray], k: int = 3, pr_batch: int = 10000,
             device="cpu", pr_dtype: str = "float16") -> dict[str, float]:
    """The ADM suite on sample activations against a reference: fid, sfid, is, precision, recall.

    pr_dtype: the arithmetic of precision/recall's distances, "float16" (ADM's) or "float32".
    """
    check_pr_dtype(pr_dtype)  # before the Frechet distances, not after
    res = {"num_samples": int(len(sample_acts["pool"])),
           "inception_score": inception_score(sample_acts["logits"]),
           "fid": ref.pool.fd(Stats.of(sample_acts["pool"]))}
    if ref.spatial is not None:
        res["sfid"] = ref.spatial.fd(Stats.of(sample_acts["spatial"]))
    if ref.pool_acts is not None:
        res["precision"], res["recall"] = precision_recall(ref.pool_acts, sample_acts["pool"], k, pr_batch, device,
                                                            pr_dtype)
    return res


def evaluate_npz(ref_path: str | Path, sample_path: str | Path, weights: str | Path | None = None,
                 batch: int = 100, device="cpu", pr_dtype: str = "float16") -> dict[str, float]:
    check_pr_dtype(pr_dtype)
    net = load_inception(weights, device)
    ref = load_reference(net, ref_path, batch, device)
    return evaluate(ref, npz_activations(net, sample_path, batch, device), device=device, pr_dtype=pr_dtype)


# ---------------------------------------------------------------- online FID for training
_NETS: dict[tuple, InceptionV3] = {}


def reference_stats(path: str | Path, weights=None, device="cpu") -> Stats:
    """Pool statistics of a reference .npz (precomputed mu/sigma or from its images)."""
    keys = set(npz_keys(path))
    net = None if {"mu", "sigma"} <= keys else _cached_net(weights, device)
    return load_reference(net, path, device=device).pool


def _cached_net(weights, device) -> InceptionV3:
    key = (str(weights), str(device))
    if key not in _NETS:
        _NETS[key] = load_inception(weights, device)
    return _NETS[key]


@torch.no_grad()
def online_fid(sample_fn: Callable[[int], torch.Tensor], ref_stats: Stats, n: int = 5000, batch: int = 250,
               weights: str | Path | None = None, device="cpu", net: InceptionV3 | None = None,
               quantize: str = "round") -> float:
    """FID of `n` fresh samples against `ref_stats` (a small-N, biased-upward training monitor).

    sample_fn(b) -> b images, float [b, 3, H, W] in [0, 1] or uint8 [b, H, W, 3]. Call it on
    every rank with a rank-dependent seed and reduce, or on rank 0 only; it does not sync.
    Float images become 0..255 by `quantize` (irepa.grid.quantize_unit: the recipe's sample_quantize).
    """
    from irepa.grid import quantize_unit

    net = net or _cached_net(weights, device)
    pools, done = [], 0
    while done < n:
        imgs = sample_fn(min(batch, n - done))
        if imgs.dtype != torch.uint8:
            imgs = quantize_unit(imgs.float(), quantize).float()
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            pools.append(net(imgs.to(device))["pool"].double().cpu().numpy())
        done += imgs.shape[0]
    return ref_stats.fd(Stats.of(np.concatenate(pools)))
