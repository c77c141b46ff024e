"""Control targets that separate an encoder's global information from its spatial structure.

Any registered encoder name takes one of these suffixes (registry.get_spec resolves them):

- `<name>+global`: every token is the image's mean token of <name> (for a network read by global
  average pooling, the pooled feature its classifier sees), broadcast to the whole grid. The
  mean-pooled features, and so a linear probe on them, are exactly <name>'s; all tokens of an
  image are equal, so LDS, CDS, SRSS and RMSC are 0 (no spatial structure at all).
- `<name>+perm`: <name>'s tokens put in a random order drawn per image, fixed by the image's
  pixels (the same image always gets the same order, two images almost never share one). The
  set of tokens, their mean and the probe stay <name>'s; which token sits where is destroyed.
"""
from __future__ import annotations

import hashlib

import torch

from .base import Encoder

CONTROLS = {
    "global": "every token = the image's mean token (global only, no spatial structure)",
    "perm": "tokens permuted by a random order fixed per image (global content kept, layout destroyed)",
}


def split_control(name: str) -> tuple[str, str] | None:
    """"hog-patch+perm" -> ("hog-patch", "perm"); None for a name without a control suffix."""
    base, sep, kind = name.rpartition("+")
    return (base, kind) if sep and base and kind in CONTROLS else None


def image_seed(image: torch.Tensor) -> int:
    """A seed fixed by an image's pixels as 8-bit values (what prepared data holds), so float
    round-off of the same picture gives the same seed."""
    q = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().contiguous()
    return int.from_bytes(hashlib.sha256(q.numpy().tobytes()).digest()[:8], "little")


def image_permutations(images: torch.Tensor, tokens: int) -> torch.Tensor:
    """[B, tokens] int64: one random order of the tokens per image, seeded by `image_seed`."""
    return torch.stack([torch.randperm(tokens, generator=torch.Generator().manual_seed(image_seed(x)))
                        for x in images]).to(images.device)


class ControlTarget(Encoder):
    """`base`'s tokens, globalised (kind "global") or permuted per image (kind "perm")."""

    def __init__(self, name: str, base: Encoder, kind: str):
        super().__init__()
        if kind not in CONTROLS:
            raise ValueError(f"unknown control {kind!r}; known: {list(CONTROLS)}")
        self.name, self.base, self.kind = name, base, kind
        self.dim, self.patch = base.dim, base.patch
        self.freeze()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        y = self.base(images)
        if self.kind == "global":
            return y.mean(1, keepdim=True).expand_as(y).contiguous()
        perm = image_permutations(images, y.shape[1])
        return torch.gather(y, 1, perm[:, :, None].expand_as(y))
