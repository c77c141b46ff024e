"""Inception-v3 as the FID/ADM evaluators use it, in torch, for the pt_inception weights.

The architecture is the TF "2015-12-05" graph that FID, sFID, IS and precision/recall are
defined on, with module names matching `pt_inception-2015-12-05-6726825d.pth` (the
pytorch-fid port): Conv2d_1a_3x3 ... Mixed_7c, fc (2048 -> 1008). Differences from the
ImageNet torchvision model, all from the TF graph: average pools in the A/C/E blocks do
not count padding, Mixed_7c's pool branch is a max pool, BN eps 1e-3, no aux head.

Preprocessing follows the graph ADM feeds (input at "ExpandDims"): float pixels in
[0, 255] are resized to 299x299 with TF1's legacy bilinear resize (no half-pixel
centers; `tf1_resize_bilinear`), then (x - 128) / 128.

Outputs of `forward` (dict):
  pool    [B, 2048]  pool_3, for FID, precision/recall and IS
  spatial [B, 2023]  mixed_6/conv (Mixed_6d.branch1x1 after ReLU), first 7 channels,
                     flattened channels-last (17 x 17 x 7) as ADM does, for sFID
  logits  [B, 1008]  pool @ fc.weight.T, no bias: ADM reads softmax/logits/MatMul
Weights are never downloaded: `load_inception` reads a local file and names the file it
expected when it is missing.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from irepa.errors import InputError, InputNotFound

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "IREPA_INCEPTION_WEIGHTS"
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):  # Mixed_5b/c/d, 35x35
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class BlockB(nn.Module):  # Mixed_6a, 35 -> 17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):  # Mixed_6b..e, 17x17, factorized 7x7
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x, taps: dict | None = None, name: str = ""):
        b1 = self.branch1x1(x)
        if taps is not None:
            taps[name] = b1
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
            bd = m(bd)
        return torch.cat([b1, b7, bd, self.branch_pool(_avg3(x))], 1)


class BlockD(nn.Module):  # Mixed_7a, 17 -> 8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):  # Mixed_7b/c, 8x8, expanded filter bank
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x),
                          torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
                          torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1),
                          self.branch_pool(pooled)], 1)


def _interp_matrix(n_out: int, n_in: int, device, dtype) -> torch.Tensor:
    """[n_out, n_in] weights of TF1 legacy bilinear resize: src = dst * n_in / n_out."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = src - i0.double()
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), i0] += 1 - w1
    m[torch.arange(n_out), i1] += w1
    return m.to(device=device, dtype=dtype)


def tf1_resize_bilinear(x_BCHW: torch.Tensor, size: int) -> torch.Tensor:
    """tf.image.resize_bilinear(align_corners=False) of TF1, which the Inception graph runs."""
    H, W = x_BCHW.shape[-2:]
    if (H, W) == (size, size):
        return x_BCHW
    mh = _interp_matrix(size, H, x_BCHW.device, x_BCHW.dtype)
    mw = _interp_matrix(size, W, x_BCHW.device, x_BCHW.dtype)
    return torch.einsum("oh,bchw,pw->bcop", mh, x_BCHW, mw)


class InceptionV3(nn.Module):
    """FID Inception-v3; `forward(images)` takes uint8 [B, H, W, 3] or float [B, 3, H, W] in [0, 255]."""

    def __init__(self, resize_to: int = 299):
        super().__init__()
        self.resize_to = resize_to  # 299 is the metric; smaller sizes (>= 75) only make tests fast
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, NUM_LOGITS)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            if images.dim() != 4 or images.shape[-1] != 3:
                raise ValueError(f"uint8 images must be [B, H, W, 3], got {tuple(images.shape)}")
            images = images.permute(0, 3, 1, 2)
        elif images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"float images must be [B, 3, H, W] in [0, 255], got {tuple(images.shape)}")
        x = tf1_resize_bilinear(images.float(), self.resize_to)
        return (x - 128.0) / 128.0

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.preprocess(images).to(self.fc.weight.dtype)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)
        taps: dict[str, torch.Tensor] = {}
        x = self.Mixed_6c(self.Mixed_6b(x))
        x = self.Mixed_6e(self.Mixed_6d(x, taps, "mixed_6"))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = x.mean(dim=(2, 3))
        spatial = taps["mixed_6"][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        return {"pool": pool, "spatial": spatial, "logits": pool @ self.fc.weight.t()}


def default_weight_paths() -> list[Path]:
    """Where `load_inception` looks, in order: $IREPA_INCEPTION_WEIGHTS, then the caches."""
    out = []
    if os.environ.get(WEIGHTS_ENV):
        out.append(Path(os.environ[WEIGHTS_ENV]))
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    out += [Path.home() / ".cache" / "irepa" / WEIGHTS_NAME, torch_home / "hub" / "checkpoints" / WEIGHTS_NAME]
    return out


def find_weights(path: str | Path | None = None) -> Path | None:
    """The weights file `load_inception(path)` would read, or None when there is none."""
    candidates = [Path(path)] if path else default_weight_paths()
    return next((p for p in candidates if p.is_file()), None)


def load_inception(path: str | Path | None = None, device="cpu") -> InceptionV3:
    """InceptionV3 in eval mode with weights from a local state-dict file (never downloaded).

    A missing file is an InputNotFound naming where it was looked for; a file that is not the
    weights (another kind of file, a truncated one, another network's state dict) an InputError."""
    from irepa.filekind import require_torch

    found = find_weights(path)
    if found is None:
        candidates = [Path(path)] if path else default_weight_paths()
        raise InputNotFound(
            f"Inception weights not found; expected {WEIGHTS_NAME} (the pytorch-fid port of the TF "
            f"2015-12-05 graph) at one of: {', '.join(str(p) for p in candidates)}. Copy the file there "
            f"or set ${WEIGHTS_ENV}; it is never downloaded at run time.")
    require_torch(found, f"the Inception weights ({WEIGHTS_NAME}, a torch state dict)")
    try:
        sd = torch.load(found, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download
        raise InputError(f"{found}: cannot read it as a torch state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); expected {WEIGHTS_NAME}") from None
    if not isinstance(sd, dict):
        raise InputError(f"{found}: expected a state dict, got {type(sd).__name__}")
    net = InceptionV3()
    sd = {k: v for k, v in sd.items() if not k.startswith("AuxLogits.")}
    try:
        missing, unexpected = net.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise InputError(f"{found}: not an FID Inception-v3 state dict ({str(e).splitlines()[0]}...)") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise InputError(f"{found}: not an FID Inception-v3 state dict (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return net.to(device).eval().requires_grad_(False)
