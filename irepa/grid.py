"""Image grids as PNG (no torchvision): the trainer's sample grids and launch/sample.py's grid.png.

`save_grid(images, path, nrow)` takes float images [N, C, H, W] in [0, 1] (C = 1 or 3, torch
or numpy) or uint8 [N, H, W, 3] (an ADM sample batch) and writes one tiled PNG atomically:
`nrow` images per row (default: a square), 2 px gaps, images smaller than `min_side` pixels
upscaled by an integer factor (nearest) so that 8 px digits stay visible.

Float images become uint8 by `quantize`: "round" (nearest) or "truncate" (255 x clamped, then
cast, as the iREPA and REPA-E LDM releases write their FID samples); each recipe names the
rule its release uses (Recipe.sample_quantize) for launch/sample.py's ADM batches.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch


QUANTIZE = ("round", "truncate")


def quantize_unit(x: torch.Tensor, quantize: str = "round") -> torch.Tensor:
    """Float values in [0, 1] -> uint8 0..255 by `quantize` (QUANTIZE)."""
    if quantize == "round":
        return (x * 255).round().clamp(0, 255).to(torch.uint8)
    if quantize == "truncate":
        return (x * 255).clamp(0, 255).to(torch.uint8)  # the cast drops the fraction
    raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")


def to_uint8_nhwc(images, quantize: str = "round") -> np.ndarray:
    """Float [N, C, H, W] in [0, 1] (C = 1 or 3; torch or numpy) or uint8 [N, H, W, 3] -> uint8 [N, H, W, 3]."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be [N, H, W, 3], got {images.shape}")
        return images
    x = torch.as_tensor(images).detach().float().cpu()
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"float images must be [N, 1|3, H, W], got {tuple(x.shape)}")
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return quantize_unit(x, quantize).permute(0, 2, 3, 1).contiguous().numpy()


def make_grid(images, nrow: int | None = None, pad: int = 2, min_side: int = 64) -> np.ndarray:
    """-> uint8 [rows * (H + pad) + pad, nrow * (W + pad) + pad, 3], white gaps."""
    x = to_uint8_nhwc(images)
    n, h, w, _ = x.shape
    if h < min_side:
        f = max(1, min_side // h)
        x = x.repeat(f, axis=1).repeat(f, axis=2)
        h, w = h * f, w * f
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = x[i]
    return grid


def save_grid(images, path: str | Path, nrow: int | None = None) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}.png")
    Image.fromarray(make_grid(images, nrow)).save(tmp)
    os.replace(tmp, path)
    return path
