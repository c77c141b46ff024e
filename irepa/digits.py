"""The embedded dataset: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes).

It ships with scikit-learn, so the whole pipeline runs for real on a machine with no
network. Images are upsampled to `resolution` RGB (grayscale replicated) in [0, 1], the
layout every encoder takes. The diffusion model trains on a "pixel codec" of them
(irepa.codec.DigitsCodec): the image box-filtered down by 8 (like the SD-VAE's f8) and
mapped to [-1, 1], one channel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_CLASSES = 10


def load_digits_images(resolution: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """-> images [N, 3, R, R] float32 in [0, 1], labels [N] int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div(16.0)[:, None]  # [N, 1, 8, 8]
    x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False).clamp(0, 1)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(d.target).long()
