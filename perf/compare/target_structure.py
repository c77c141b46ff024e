"""How much of an alignment target is the per-image global component that iREPA's spatial
normalization removes, and how local it is, on the embedded digits (docs/digits-study.md).

  python perf/compare/target_structure.py              # the digits presets' encoder
  python perf/compare/target_structure.py hog-dense sift   # others; 400 digits at 128 px, the presets' input

Per encoder, for the raw tokens (REPA's target) and after irepa.align.spatial_norm with
gamma 0.6 / 0.8 / 1.0 (iREPA's): the share of token energy in the per-image token mean
(mean over images of |mean_T y|^2 / mean_T |y_t|^2), and the mean cosine similarity of
neighbouring tokens (Manhattan distance 1) and of far ones (distance >= grid side).
"""
from __future__ import annotations

import sys

import torch

from irepa import encoders
from irepa.align import spatial_norm
from irepa.analysis.features import digits_set
from irepa.analysis.spatial import global_share


def describe(y: torch.Tensor) -> tuple[float, float, float]:
    """(global-mean energy share, neighbour cosine, far cosine) of tokens y [B, T, E] on a square grid."""
    share = global_share(y).mean().item()
    u = torch.nn.functional.normalize(y, dim=-1)
    k = u @ u.transpose(1, 2)
    side = int(round(y.shape[1] ** 0.5))
    i = torch.arange(y.shape[1])
    dist = (i[:, None] // side - i[None] // side).abs() + (i[:, None] % side - i[None] % side).abs()
    return share, k[:, dist == 1].mean().item(), k[:, dist >= side].mean().item()


def main(names: list[str], count: int = 400, resolution: int = 128) -> None:
    images = digits_set(resolution=resolution, limit=count)
    x = images.load(list(range(images.count)))
    print(f"{images.count} digits at {resolution} px")
    print("| encoder | target | global-mean energy share | cosine, neighbours | cosine, far | gap |")
    print("|---|---|---|---|---|---|")
    for name in names:
        with torch.no_grad():
            y = encoders.build(name, device="cpu")(x).float()
        for label, t in [("raw (REPA)", y)] + [(f"spatial_norm {g}", spatial_norm(y, g)) for g in (0.6, 0.8, 1.0)]:
            share, near, far = describe(t)
            print(f"| {name} | {label} | {share:.3f} | {near:.3f} | {far:.3f} | {near - far:.3f} |")


if __name__ == "__main__":
    from irepa.recipes import resolve
    main(sys.argv[1:] or list(resolve("digits-sit-irepa").align.encoders))
