"""Image grids as PNG (no torchvision): [N, 3, H, W] in [0, 1] -> one tiled image."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def make_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2, min_side: int = 64) -> np.ndarray:
    """-> uint8 [rows*(H+pad)+pad, nrow*(W+pad)+pad, 3]; tiny images are upscaled (nearest)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"make_grid expects [N, 1|3, H, W], got {tuple(images.shape)}")
    x = images.detach().float().cpu().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] < min_side:
        x = torch.nn.functional.interpolate(x, scale_factor=max(1, min_side // x.shape[-1]), mode="nearest")
    n, _, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.ones(3, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = x[i]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(make_grid(images, nrow)).save(tmp)
    os.replace(tmp, path)
    return path
