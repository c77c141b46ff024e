"""Cosine-similarity maps from anchor patches, before and after irepa.align.spatial_norm.

Features with a large component shared by all tokens have cosines near 1 everywhere;
spatial norm removes it and exposes the local contrast. plot_spatialnorm draws, per
encoder, a row of maps before and a row after, each beside the image with its anchors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from irepa.align import spatial_norm, token_grid
from irepa.analysis.correlation import agg_pyplot
from irepa.analysis.features import EncoderFn
from irepa.analysis.spatial import cosine_gram


def default_anchors(side: int) -> list[tuple[int, int]]:
    """The center and two off-center patches of a side x side token grid."""
    return [(side // 2, side // 2), (side // 4, side // 4), (side // 4, 3 * side // 4)]


def anchor_maps(feats_1TE: torch.Tensor, anchors: Sequence[tuple[int, int]],
                gamma: float | None) -> torch.Tensor:
    """Cosine similarity of each anchor token to every token -> [A, side, side];
    gamma None uses the features as they are, a float applies spatial_norm first."""
    side = token_grid(feats_1TE.shape[1], "anchor_maps")
    f = spatial_norm(feats_1TE, gamma) if gamma is not None else feats_1TE.float()
    K = cosine_gram(f)[0]
    for r, c in anchors:
        if not (0 <= r < side and 0 <= c < side):
            raise ValueError(f"anchor ({r}, {c}) is outside the {side}x{side} token grid")
    return torch.stack([K[r * side + c].view(side, side) for r, c in anchors])


def encoder_anchor_maps(encoders: Mapping[str, EncoderFn], image_13RR: torch.Tensor,
                        anchors: Sequence[tuple[int, int]], gamma: float,
                        device: str = "cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{encoder: (maps before, maps after spatial norm)}, each [A, side, side] on the CPU."""
    maps = {}
    for name, enc in encoders.items():
        f = enc(image_13RR.to(device)).float().cpu()
        maps[name] = (anchor_maps(f, anchors, None), anchor_maps(f, anchors, gamma))
    return maps


def plot_spatialnorm(image: torch.Tensor, maps: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                     anchors: Sequence[tuple[int, int]], gamma: float, path: Path) -> None:
    """Grid: per encoder a row before and a row after spatial norm; the image with anchors first."""
    plt = agg_pyplot()
    A = len(anchors)
    nrows = 2 * len(maps)
    fig, axes = plt.subplots(nrows, A + 1, figsize=(2.2 * (A + 1), 2.2 * nrows), squeeze=False)
    px = image.shape[-1]
    for i, (name, (before, after)) in enumerate(maps.items()):
        side = before.shape[-1]
        for j, (label, m) in enumerate((("before", before), (f"spatial norm g={gamma}", after))):
            row = axes[2 * i + j]
            row[0].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            scale = px / side
            for k, (r, c) in enumerate(anchors):
                row[0].plot((c + 0.5) * scale, (r + 0.5) * scale, "o", ms=5, mfc=f"C{k}", mec="w")
            row[0].set_title(f"{name}: {label}", fontsize=8)
            for k, (r, c) in enumerate(anchors):
                ax = row[k + 1]
                ax.imshow(m[k].numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
                ax.plot(c, r, "o", ms=4, mfc=f"C{k}", mec="k")
                ax.set_title(f"anchor ({r},{c}) mean {m[k].mean():.2f}", fontsize=7)
            for ax in row:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
