"""Classical spatial features as alignment targets: HOG, dense HOG, upright SIFT, raw patches, VGG16 pool4.

The iREPA paper (arXiv 2512.10794) shows that features with strong spatial structure
but no learned semantics still help REPA. All three give one 128-d (HOG, SIFT) or 512-d
(VGG16 pool4) token per 16 px patch of the model input, so no resize is needed.

HOG and SIFT are weight free and written as batched tensor ops (GPU and torch.compile
friendly); they compute in fp32 (fp64 if the encoder is moved to float64, which the
tests use to compare against scikit-image bit for bit).

- Patch HOG ("hog-patch", ours, the digits presets' target) per 16 px patch = one block of 4x4 cells of 4 px with 8 unsigned orientation bins,
  L2-Hys block normalization; this is exactly scikit-image's
  hog(gray, orientations=8, pixels_per_cell=(4, 4), cells_per_block=(4, 4),
  block_norm="L2-Hys") taken at every 4th block (the non-overlapping ones).
- Dense HOG ("hog", alias "hog-dense": the iREPA release's HOGVisionEncoder with its default
  g16_d128): scikit-image's hog(gray, orientations=8, pixels_per_cell=(2, 2),
  cells_per_block=(4, 4), block_norm="L2-Hys") at every block (stride one 2 px cell,
  (H/2 - 3)^2 blocks of 128), each block L2-normalized again, then the block map resized
  bilinearly (no antialias) to the H/16 x W/16 grid; gray = 0.2126 R + 0.7152 G + 0.0722 B.
- Upright dense SIFT ("sift-upright"; the release's "sift" is kornia's, sift.py) per 16 px
  patch (Lowe's descriptor, upright, no scale space): 4x4 spatial
  bins x 8 signed orientations, Gaussian window sigma = 8 px, trilinear (bilinear in
  space, linear in angle) vote spreading, L2 normalize -> clip 0.2 -> L2 normalize.
- Raw patches ("raw-patch", ours): the gray pixels of each 16 px patch as its token
  (256 values in [0, 1], row-major within the patch), no learned or hand-made feature.
- VGG16 conv1_1..pool4 (torchvision layer indices), ImageNet normalization, stride 16,
  512 channels. The release loads torchvision's VGG16_Weights.IMAGENET1K_FEATURES
  (vgg16_features-amdegroot-88682ab5.pth, whose classifier is NaN) and still normalizes
  with ImageNet mean / std (not that file's 0-255 scaling); the classification file
  vgg16-397923af.pth has the same layout and loads with --weights.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import GRID_PATCH, Encoder, grid_to_tokens, load_checked, load_state_dict, resolve_weights

GRAY_WEIGHTS = (0.2125, 0.7154, 0.0721)  # scikit-image rgb2gray (ITU-R BT.709)


def rgb_to_gray(x_B3HW: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, H, W] luminance."""
    return (x_B3HW * weights.view(1, 3, 1, 1)).sum(1)


def central_gradients(gray_BHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalized central differences, zero on the border rows/cols (scikit-image's rule)."""
    g_row = F.pad(gray_BHW[:, 2:, :] - gray_BHW[:, :-2, :], (0, 0, 1, 1))
    g_col = F.pad(gray_BHW[:, :, 2:] - gray_BHW[:, :, :-2], (1, 1, 0, 0))
    return g_row, g_col


def _normalize_l2_hys(v: torch.Tensor, clip: float, eps: float) -> torch.Tensor:
    v = v / torch.sqrt((v * v).sum(-1, keepdim=True) + eps * eps)
    v = v.clamp(max=clip)
    return v / torch.sqrt((v * v).sum(-1, keepdim=True) + eps * eps)


class _WeightFree(Encoder):
    """Shared plumbing: grayscale weights kept as a buffer so .to(float64) switches precision."""

    mean = None
    std = None

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.register_buffer("gray_weights", torch.tensor(GRAY_WEIGHTS), persistent=False)
        self.freeze()

    def compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.gray_weights.dtype == torch.float64 else torch.float32

    def preprocess(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return images.to(self.compute_dtype())  # native resolution: one token per 16 px patch

    def gray(self, x: torch.Tensor) -> torch.Tensor:
        # from the Python floats, not the buffer: a float32 buffer cast to float64 is not 0.2125
        return rgb_to_gray(x, torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device))


class HOG(_WeightFree):
    """Histogram of oriented gradients, one L2-Hys block per 16 px patch: [B, T, 128]."""

    def __init__(self, name: str = "hog-patch", cell: int = 4, orientations: int = 8,
                 clip: float = 0.2, eps: float = 1e-5):
        super().__init__(name)
        if GRID_PATCH % cell:
            raise ValueError(f"HOG cell size {cell} must divide the {GRID_PATCH} px patch")
        self.cell, self.orientations, self.clip, self.eps = cell, orientations, clip, eps
        self.cells = GRID_PATCH // cell
        self.dim = self.cells * self.cells * orientations
        edges = torch.arange(orientations + 1, dtype=torch.float64) * (180.0 / orientations)
        self.register_buffer("edges", edges, persistent=False)

    def orientation_bins(self, g_row: torch.Tensor, g_col: torch.Tensor) -> torch.Tensor:
        """Unsigned orientation, hard voting: bin i holds [i, i+1) * 180/n degrees.

        Same float ops as scikit-image (atan2 in degrees, mod 180, compare with the
        edges); a gradient within an ulp of an edge (e.g. exactly 45 degrees, common in
        8-bit images) may land on either side depending on the atan2 implementation.
        """
        angle = torch.rad2deg(torch.atan2(g_row, g_col)) % 180.0
        edges = self.edges.to(angle.dtype)
        return (torch.bucketize(angle, edges, right=True) - 1).clamp_(0, self.orientations - 1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        g_row, g_col = central_gradients(self.gray(x))
        return self.blocks(torch.hypot(g_col, g_row), self.orientation_bins(g_row, g_col))

    def blocks(self, mag: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        """Gradient magnitudes and orientation bins [B, H, W] -> L2-Hys blocks [B, T, dim]."""
        B, H, W = mag.shape
        votes = torch.zeros(B, self.orientations, H, W, dtype=mag.dtype, device=mag.device)
        votes.scatter_(1, bins.unsqueeze(1), mag.unsqueeze(1))
        cells = F.avg_pool2d(votes, self.cell)  # [B, n, H/cell, W/cell], mean over cell pixels
        gh, gw, c = H // GRID_PATCH, W // GRID_PATCH, self.cells
        blocks = cells.view(B, self.orientations, gh, c, gw, c).permute(0, 2, 4, 3, 5, 1)
        blocks = blocks.reshape(B, gh * gw, self.dim)  # per patch: (cell row, cell col, orientation)
        return _normalize_l2_hys(blocks, self.clip, self.eps)


RELEASE_GRAY = (0.2126, 0.7152, 0.0722)  # the release's HOGVisionEncoder (BT.709)


class DenseHOG(HOG):
    """The release's HOG: 2 px cells, every 4x4-cell block, resized to the token grid.

    Precision as the release's scikit-image call: gray and gradients in float32 (the
    release hands hog() a float32 image of 0-255 values / 255), orientations, magnitudes
    and block norms in float64 (scikit-image's histogram code converts the gradients),
    then float32 for the final L2 normalization and the bilinear resize.
    """

    def __init__(self, name: str = "hog"):
        super().__init__(name, cell=2)
        self.block_cells = 4
        self.dim = self.block_cells * self.block_cells * self.orientations

    def gray(self, x: torch.Tensor) -> torch.Tensor:
        v = x.clamp(0, 1) * 255  # exact 0..255 for 8-bit images, as the release's raw pixels
        w = RELEASE_GRAY
        return ((w[0] * v[:, 0] + w[1] * v[:, 1] + w[2] * v[:, 2]) / 255.0).clamp(0, 1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        g_row, g_col = central_gradients(self.gray(x))
        g_row, g_col = g_row.double(), g_col.double()
        return self.blocks(torch.hypot(g_col, g_row), self.orientation_bins(g_row, g_col)).to(x.dtype)

    def blocks(self, mag: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        B, H, W = mag.shape
        votes = torch.zeros(B, self.orientations, H, W, dtype=mag.dtype, device=mag.device)
        votes.scatter_(1, bins.unsqueeze(1), mag.unsqueeze(1))
        cells = F.avg_pool2d(votes, self.cell)                       # [B, n, H/2, W/2]
        k, n = self.block_cells, self.orientations
        hb, wb = cells.shape[-2] - k + 1, cells.shape[-1] - k + 1
        blocks = F.unfold(cells, k)                                  # [B, n*k*k, hb*wb], (orientation, row, col)
        blocks = blocks.view(B, n, k, k, hb * wb).permute(0, 4, 2, 3, 1).reshape(B, hb * wb, self.dim)
        blocks = F.normalize(_normalize_l2_hys(blocks, self.clip, self.eps).float(), dim=-1)
        grid = (H // GRID_PATCH, W // GRID_PATCH)
        fmap = blocks.transpose(1, 2).reshape(B, self.dim, hb, wb)
        fmap = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)
        return grid_to_tokens(fmap)


def sift_spatial_weights(patch: int = GRID_PATCH, bins: int = 4, sigma: float | None = None) -> torch.Tensor:
    """[patch, bins] per-axis weight of pixel u to spatial bin c: Gaussian x bilinear.

    Pixel centres sit at u + 0.5, bin centres at (c + 0.5) * patch / bins; bilinear weight
    max(0, 1 - |distance| / bin width); Gaussian window centred on the patch, sigma =
    patch / 2 (Lowe's half the descriptor width).
    """
    sigma = patch / 2 if sigma is None else sigma
    width = patch / bins
    u = torch.arange(patch, dtype=torch.float64) + 0.5
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) * width
    bilinear = (1 - (u[:, None] - centres[None, :]).abs() / width).clamp(min=0)
    gauss = torch.exp(-((u - patch / 2) ** 2) / (2 * sigma * sigma))
    return gauss[:, None] * bilinear


class DenseSIFT(_WeightFree):
    """Upright SIFT descriptor on every 16 px patch: [B, T, 128], unit L2 norm."""

    def __init__(self, name: str = "sift", bins: int = 4, orientations: int = 8, clip: float = 0.2, eps: float = 1e-7):
        super().__init__(name)
        self.bins, self.orientations, self.clip, self.eps = bins, orientations, clip, eps
        self.dim = bins * bins * orientations
        self.register_buffer("spatial", sift_spatial_weights(GRID_PATCH, bins), persistent=False)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        n = self.orientations
        g_row, g_col = central_gradients(self.gray(x))
        mag = torch.hypot(g_col, g_row)
        pos = torch.remainder(torch.atan2(g_row, g_col), 2 * math.pi) * (n / (2 * math.pi))
        lo = pos.floor()
        frac = pos - lo
        lo = lo.long() % n
        votes = torch.zeros(B, n, H, W, dtype=mag.dtype, device=mag.device)
        votes.scatter_add_(1, lo.unsqueeze(1), (mag * (1 - frac)).unsqueeze(1))
        votes.scatter_add_(1, ((lo + 1) % n).unsqueeze(1), (mag * frac).unsqueeze(1))
        gh, gw, p = H // GRID_PATCH, W // GRID_PATCH, GRID_PATCH
        A = self.spatial.to(mag.dtype)
        hist = torch.einsum("bohpwq,pc,qd->bhwcdo", votes.view(B, n, gh, p, gw, p), A, A)
        return _normalize_l2_hys(hist.reshape(B, gh * gw, self.dim), self.clip, self.eps)


class RawPatch(_WeightFree):
    """The gray pixels of each 16 px patch: [B, T, 256]."""

    dim = GRID_PATCH * GRID_PATCH

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        gray = self.gray(x)[:, None]  # [B, 1, H, W]
        return F.unfold(gray, GRID_PATCH, stride=GRID_PATCH).transpose(1, 2)


VGG16_POOL4 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M")
VGG16_RELU5_3 = VGG16_POOL4 + (512, 512, 512)  # through conv5_3 + ReLU (LPIPS' last tap)
VGG16_FILE = "vgg16-397923af.pth"  # torchvision IMAGENET1K_V1 (the LPIPS backbone; the vgg16 encoder loads the release's file)


def vgg16_features(spec=VGG16_POOL4, width_div: int = 1) -> tuple[nn.Sequential, int]:
    """torchvision's vgg16().features layers for `spec` (same indices, so its weight file loads
    as is); width_div > 1 narrows every conv (tests). -> (layers, output channels)."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in spec:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            c_out = v // width_div
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]
            c_in = c_out
    return nn.Sequential(*layers), c_in


class VGG16Pool4(Encoder):
    """VGG16 up to pool4 (stride 16): [B, T, 512]. Layer indices follow torchvision."""

    def __init__(self, name: str = "vgg16", width_div: int = 1):
        super().__init__()
        self.name = name
        self.features, self.dim = vgg16_features(VGG16_POOL4, width_div)

    def load(self, path: Path) -> "VGG16Pool4":
        sd = load_state_dict(path)
        load_checked(self, sd, self.name, path)
        return self

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return grid_to_tokens(self.features(x))


def build_vgg16(spec, tiny: bool = False, weights=None) -> VGG16Pool4:
    """tiny: 1/16 channel widths (random init, or `weights` loaded into that shape for tests)."""
    if tiny:
        model = VGG16Pool4(spec.name, width_div=16).apply_spec(spec)
        return (model.load(Path(weights)) if weights is not None else model).freeze()
    path = resolve_weights(spec.name, filename=spec.source, weights=weights)
    if path.is_dir():
        path = path / spec.source
        if not path.exists():
            raise FileNotFoundError(f"encoder {spec.name!r}: expected {path} (torchvision's VGG16 "
                                    f"IMAGENET1K_FEATURES weights)")
    return VGG16Pool4(spec.name).apply_spec(spec).load(path).freeze()
