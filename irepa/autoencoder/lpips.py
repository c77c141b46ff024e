"""LPIPS (Zhang et al. 2018), VGG16 variant: the perceptual term of the VAE loss.

Distance of two image batches in [-1, 1]: shift/scale each channel (LPIPS' ScalingLayer
constants), VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, each unit-
normalized over channels (norm + 1e-10), squared difference, a learned non-negative 1x1
"linear" head per tap, mean over space, sum over taps -> [B].

Weights are read from local files only, with the encoders' lookup rules
(irepa.encoders.base.resolve_weights):
- the VGG16 backbone: torchvision's ImageNet file vgg16-397923af.pth, the same file the
  "vgg16" encoder loads ($IREPA_ENCODER_VGG16, $IREPA_ENCODER_DIR/vgg16-397923af.pth, ...);
- the five heads: LPIPS v0.1 `vgg.pth` (keys lin{k}.model.1.weight, shape [1, C, 1, 1];
  the file the `lpips` PyPI package ships in lpips/weights/v0.1/, also the taming /
  REPA-E file) from $IREPA_ENCODER_LPIPS_VGG, $IREPA_ENCODER_DIR/lpips-vgg or
  /vgg.pth, or an installed `lpips` package.
`tiny=True` builds a random-init network with 1/16 widths (tests, the digits demo).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn as nn

from irepa.encoders.base import load_state_dict, resolve_weights
from irepa.encoders.classical import VGG16_FILE, VGG16_RELU5_3, vgg16_features

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
TAPS = (3, 8, 15, 22, 29)  # relu1_2 ... relu5_3 in torchvision's vgg16().features
TAP_CHANNELS = (64, 128, 256, 512, 512)
HEADS_FILE = "vgg.pth"


class LPIPS(nn.Module):
    def __init__(self, width_div: int = 1):
        super().__init__()
        self.features, _ = vgg16_features(VGG16_RELU5_3, width_div)
        self.heads = nn.ModuleList(nn.Conv2d(c // width_div, 1, 1, bias=False) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # frozen metric: always eval

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features[:TAPS[-1] + 1]):
            h = layer(h)
            if i in TAPS:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y [B, 3, H, W] in [-1, 1] -> distance [B]. Gradients reach the inputs only."""
        B = x.shape[0]
        taps = self._taps(torch.cat([x, y]))  # one pass over both: the same math, half the launches
        total = x.new_zeros(B)
        for f, head in zip(taps, self.heads):
            f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = (f[:B] - f[B:]).pow(2)
            total = total + head(d).mean((1, 2, 3))
        return total

    def load(self, vgg_path: Path, heads_path: Path) -> "LPIPS":
        vgg = {k: v for k, v in load_state_dict(vgg_path).items() if k.startswith("features.")}
        own = {k: v for k, v in self.state_dict().items() if k.startswith("features.")}
        missing = sorted(set(own) - set(vgg))
        if missing:
            raise ValueError(f"LPIPS: {vgg_path} lacks VGG16 tensors {missing[:4]} (expected torchvision's "
                             f"{VGG16_FILE})")
        heads = load_state_dict(heads_path)
        mapped = {}
        for k in range(len(TAPS)):
            key = f"lin{k}.model.1.weight"
            if key not in heads:
                raise ValueError(f"LPIPS: {heads_path} has no {key!r} (expected the LPIPS v0.1 vgg.pth heads)")
            mapped[f"heads.{k}.weight"] = heads[key]
        sd = {**vgg, **mapped}
        for k, v in sd.items():
            if v.shape != self.state_dict()[k].shape:
                raise ValueError(f"LPIPS: {k} has shape {tuple(v.shape)} in the file, {tuple(self.state_dict()[k].shape)} "
                                 f"in the model")
        self.load_state_dict(sd, strict=True)
        return self


def _lpips_package_heads() -> Path | None:
    spec = importlib.util.find_spec("lpips")  # located, not imported (it imports torchvision)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / HEADS_FILE
    return p if p.is_file() else None


def resolve_lpips_heads(weights: str | os.PathLike | None = None) -> Path:
    found = resolve_weights("lpips-vgg", filename=HEADS_FILE, weights=weights, must_exist=False, what="LPIPS heads")
    if found is None:
        found = _lpips_package_heads()
    if found is None:  # the full message, naming every place tried
        return resolve_weights("lpips-vgg", filename=HEADS_FILE, weights=weights, what="LPIPS heads")
    return found / HEADS_FILE if found.is_dir() else found


def build_lpips(vgg_weights: str | os.PathLike | None = None, head_weights: str | os.PathLike | None = None,
                tiny: bool = False, seed: int = 0) -> LPIPS:
    """The frozen LPIPS network from local files, or (tiny) a seeded random-init narrow one."""
    if tiny:
        g = torch.Generator().manual_seed(seed)
        net = LPIPS(width_div=16)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
            for h in net.heads:  # LPIPS heads are non-negative
                h.weight.abs_()
        return net
    vgg = resolve_weights("vgg16", filename=VGG16_FILE, weights=vgg_weights, what="LPIPS backbone")
    if vgg.is_dir():
        vgg = vgg / VGG16_FILE
    if not vgg.is_file():
        raise FileNotFoundError(f"LPIPS backbone: expected {vgg} (torchvision's VGG16 ImageNet weights)")
    return LPIPS().load(vgg, resolve_lpips_heads(head_weights))
