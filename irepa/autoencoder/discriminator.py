"""PatchGAN discriminator (pix2pix / taming `NLayerDiscriminator`, BatchNorm variant).

The layout REPA-E trains and releases (sdvae-f8d4-discriminator-ckpt.pt): a stride-2
4x4 conv + LeakyReLU(0.2), then n_layers - 1 stride-2 convs (no bias) + BatchNorm +
LeakyReLU doubling the width up to 8x, one stride-1 conv + BatchNorm + LeakyReLU, and a
stride-1 conv to one logit per patch. Module indices in `main` match the taming file, so
its state dict loads as is. Init as taming's `weights_init`: conv weights N(0, 0.02)
(biases keep PyTorch's default), BatchNorm weights N(1, 0.02) and biases 0.

It stays in train mode during training (batch statistics in every call), as in REPA-E
where the loss module holding it is never switched to eval.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

DISC_FILE = "sdvae-f8d4-discriminator-ckpt.pt"


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                    nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True), nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*seq)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, 0.02, generator=generator)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.02, generator=generator)
                m.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, H, W] in [-1, 1] -> patch logits [B, 1, h, w]."""
        return self.main(x)


def build_discriminator(weights: str | os.PathLike | None = None, tiny: bool = False,
                        pretrained: bool = True) -> PatchDiscriminator:
    """REPA-E's discriminator: loaded from a local file when pretrained, else random init;
    tiny = ndf 8 (tests, the digits demo; always random init unless `weights` is given)."""
    disc = PatchDiscriminator(ndf=8 if tiny else 64)
    if not pretrained or (tiny and weights is None):
        return disc
    from irepa.encoders.base import load_checked, load_state_dict, resolve_weights
    path = resolve_weights("sdvae-f8d4-discriminator", filename=DISC_FILE, weights=weights, what="discriminator")
    if path.is_dir():
        path = path / DISC_FILE
    load_checked(disc, load_state_dict(path, prefixes=("module.", "discriminator.")), "discriminator", path)
    return disc
