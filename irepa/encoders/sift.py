"""The iREPA release's dense SIFT ("sift"), computed by kornia as the release does.

One keypoint per 16 px patch, centred at (8 + 16 j, 8 + 16 i) px, scale 16 px, turned to
its dominant gradient orientation by kornia's LAFOrienter on 20 px patches (36 bins);
a 41 x 41 patch is sampled around it from the grayscale pyramid and described by
kornia's SIFTDescriptor (4 x 4 spatial bins x 8 orientations, no RootSIFT, clip 0.2),
then L2-normalized: [B, (H/16)*(W/16), 128]. Grayscale is kornia's rgb_to_grayscale
(0.299, 0.587, 0.114) of the image in [0, 1]. This follows SIFTEncoder in
End2End-Diffusion/iREPA @99ad4ac (ldm/vision_encoder.py, run with kornia 0.8.1); the
upright SIFT written as tensor ops is "sift-upright" (classical.py).

kornia is a PyPI package; it is imported when this encoder is built, and must be the
release's 0.8.1: kornia 0.9 rewrote PatchDominantGradientOrientation (the orientation
histogram and the angle convention) and its descriptors differ by up to 0.6 (measured on
scikit-image's astronaut at 256 px), so another version is refused.
"""
from __future__ import annotations

import torch

from .base import GRID_PATCH, Encoder

SIFT_PATCH = 41          # kornia SIFTDescriptor's patch
ORIENT_PATCH = SIFT_PATCH // 2
KORNIA_VERSION = "0.8.1"  # the release's pin (environment/requirements.txt)


def _kornia():
    try:
        import kornia
        import kornia.feature
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"encoder 'sift' (the release's dense SIFT) needs kornia: pip install "
                          f"kornia=={KORNIA_VERSION}; 'sift-upright' needs nothing") from e
    if kornia.__version__ != KORNIA_VERSION:
        raise RuntimeError(f"encoder 'sift' follows kornia {KORNIA_VERSION} (the release's); kornia "
                           f"{kornia.__version__} computes other orientations and descriptors: "
                           f"pip install kornia=={KORNIA_VERSION}")
    return kornia


def grid_keypoints(H: int, W: int, step: int = GRID_PATCH) -> torch.Tensor:
    """[T, 2] (x, y) patch centres, row-major: step/2, step/2 + step, ..."""
    ys = torch.arange(step // 2, H, step, dtype=torch.float32)
    xs = torch.arange(step // 2, W, step, dtype=torch.float32)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)


class KorniaSIFT(Encoder):
    """Dense SIFT with dominant orientation on the 16 px grid (kornia): [B, T, 128]."""

    mean = None
    std = None

    def __init__(self, name: str = "sift"):
        super().__init__()
        K = _kornia()
        self.name, self.dim = name, 128
        self._K = K
        self.descriptor = K.feature.SIFTDescriptor(SIFT_PATCH, num_ang_bins=8, num_spatial_bins=4,
                                                   rootsift=False, clipval=0.2)
        self.orienter = K.feature.LAFOrienter(ORIENT_PATCH)
        self.freeze()

    def preprocess(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return images.float()  # native resolution: one keypoint per 16 px patch

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        K = self._K
        B, _, H, W = x.shape
        gray = K.color.rgb_to_grayscale(x)
        centers = grid_keypoints(H, W).to(x.device)[None].expand(B, -1, -1)
        T = centers.shape[1]
        scale = torch.full((B, T, 1, 1), float(GRID_PATCH), device=x.device)
        ori = torch.zeros(B, T, 1, device=x.device)
        lafs = self.orienter(K.feature.laf_from_center_scale_ori(centers, scale, ori), gray)
        patches = K.feature.extract_patches_from_pyramid(gray, lafs, PS=SIFT_PATCH)
        desc = self.descriptor(patches.reshape(B * T, 1, SIFT_PATCH, SIFT_PATCH)).view(B, T, 128)
        return torch.nn.functional.normalize(desc, p=2, dim=-1)
