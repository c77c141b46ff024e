"""HOG, dense SIFT and VGG16 pool4 against independent computations on real images."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from irepa import encoders
from irepa.encoders.classical import GRAY_WEIGHTS, VGG16Pool4, rgb_to_gray


def _astronaut() -> torch.Tensor:
    from skimage import data
    return torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].double() / 255  # [1, 3, 512, 512]


def _camera_rgb() -> torch.Tensor:
    from skimage import data
    g = torch.from_numpy(data.camera()).double() / 255
    return g[None, None].expand(1, 3, -1, -1).contiguous()


def _gray(img: torch.Tensor) -> np.ndarray:
    return rgb_to_gray(img, torch.tensor(GRAY_WEIGHTS, dtype=img.dtype))[0].numpy()


def _skimage_hog_tokens(gray: np.ndarray) -> torch.Tensor:
    from skimage.feature import hog
    blocks = hog(gray, orientations=8, pixels_per_cell=(4, 4), cells_per_block=(4, 4),
                 block_norm="L2-Hys", feature_vector=False)  # overlapping blocks, stride one cell
    ours = blocks[::4, ::4]  # the non-overlapping 16 px blocks
    return torch.from_numpy(np.ascontiguousarray(ours)).reshape(1, -1, 128)


def _edge_ambiguous_patches(gray: np.ndarray) -> set[int]:
    """Tokens holding a pixel whose orientation is within 1e-9 degrees of a bin edge.

    There a one-ulp atan2 difference between numpy and torch decides the bin, so the
    token may legitimately differ from scikit-image's.
    """
    from skimage.feature._hog import _hog_channel_gradient
    g_row, g_col = _hog_channel_gradient(gray)
    angle = np.rad2deg(np.arctan2(g_row, g_col)) % 180
    dist = np.abs(angle[..., None] - np.arange(9) * 22.5).min(-1)
    near = (dist < 1e-9) & (np.hypot(g_row, g_col) > 0)
    rows, cols = np.nonzero(near)
    W = gray.shape[1] // 16
    return {int(r // 16 * W + c // 16) for r, c in zip(rows, cols)}


@pytest.mark.parametrize("image", ["astronaut", "camera"])
def test_hog_matches_skimage_float64(image):
    img = _astronaut() if image == "astronaut" else _camera_rgb()
    out = encoders.build("hog").double()(img)
    assert out.shape == (1, 1024, 128)  # 512 px -> 32x32 tokens
    gray = _gray(img)
    ref = _skimage_hog_tokens(gray)
    # scikit-image accumulates cells in float32, hence 1e-6 rather than fp64 round-off
    per_token = (out - ref).abs().amax(-1)[0]
    differing = {int(t) for t in torch.nonzero(per_token > 1e-6).flatten()}
    assert len(differing) <= 10
    assert differing <= _edge_ambiguous_patches(gray)


def test_hog_float32_close_to_skimage():
    img = _astronaut()
    out = encoders.build("hog")(img.float()).double()
    ref = _skimage_hog_tokens(_gray(img))
    per_token = (out - ref).abs().amax(-1)
    # fp32 gray values move some gradients that sit on a bin edge into the neighbour bin
    assert (per_token < 1e-3).float().mean() > 0.8
    assert (out - ref).abs().mean() < 1e-3


def test_hog_contract_128px_digits_size():
    hog = encoders.build("hog")
    assert hog.dim == 128 and hog.name == "hog" and not hog.training
    x = torch.rand(3, 3, 128, 128)
    y = hog(x)
    assert y.shape == (3, 64, 128) and y.dtype == torch.float32
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(3, 64), atol=1e-4, rtol=0)
    torch.testing.assert_close(hog(x[1:2]), y[1:2])  # batch independent
    assert (y >= 0).all()


def test_bad_input_names_the_problem():
    hog = encoders.build("hog")
    with pytest.raises(ValueError, match="multiple of 16"):
        hog(torch.rand(1, 3, 120, 128))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        hog(torch.rand(1, 1, 128, 128))


def _sift_loop(gray: np.ndarray, i: int, j: int) -> np.ndarray:
    """Reference SIFT descriptor of the 16 px patch (i, j), written as plain loops."""
    H, W = gray.shape
    hist = np.zeros((4, 4, 8))
    sigma = 8.0
    for py in range(16):
        for px in range(16):
            r, c = 16 * i + py, 16 * j + px
            gr = gray[r + 1, c] - gray[r - 1, c] if 0 < r < H - 1 else 0.0
            gc = gray[r, c + 1] - gray[r, c - 1] if 0 < c < W - 1 else 0.0
            mag = math.hypot(gc, gr)
            if mag == 0:
                continue
            theta = math.atan2(gr, gc) % (2 * math.pi)
            b = theta / (2 * math.pi / 8)
            b0 = math.floor(b)
            fb = b - b0
            # pixel centre relative to the patch, Gaussian window around the patch centre
            u, v = py + 0.5, px + 0.5
            w = math.exp(-((u - 8) ** 2 + (v - 8) ** 2) / (2 * sigma ** 2)) * mag
            for cy in range(4):
                wy = max(0.0, 1 - abs(u - (4 * cy + 2)) / 4)
                for cx in range(4):
                    wx = max(0.0, 1 - abs(v - (4 * cx + 2)) / 4)
                    if wy * wx == 0:
                        continue
                    hist[cy, cx, b0 % 8] += w * wy * wx * (1 - fb)
                    hist[cy, cx, (b0 + 1) % 8] += w * wy * wx * fb
    d = hist.reshape(-1)
    d = d / math.sqrt((d ** 2).sum() + 1e-14)
    d = np.minimum(d, 0.2)
    return d / math.sqrt((d ** 2).sum() + 1e-14)


def test_sift_matches_direct_loop():
    img = _camera_rgb()[..., 200:264, 180:260]  # 64 x 80 crop: 4 x 5 patches of a real image
    out = encoders.build("sift").double()(img)
    assert out.shape == (1, 20, 128)
    gray = _gray(img)
    ref = np.stack([_sift_loop(gray, i, j) for i in range(4) for j in range(5)])
    torch.testing.assert_close(out[0], torch.from_numpy(ref), atol=1e-9, rtol=0)


def test_sift_512px_unit_norm():
    img = _astronaut().float()
    out = encoders.build("sift")(img)
    assert out.shape == (1, 1024, 128)
    norms = out.norm(dim=-1)
    flat = norms < 1e-6  # gradient-free patches (the black background) give a zero descriptor
    assert flat.float().mean() < 0.1
    torch.testing.assert_close(norms[~flat], torch.ones_like(norms[~flat]), atol=1e-4, rtol=0)
    assert (out >= 0).all() and (out <= 1).all()


def test_vgg16_tiny_shapes_and_frozen():
    enc = encoders.build("vgg16", tiny=True)
    assert not any(p.requires_grad for p in enc.parameters())
    y = enc(torch.rand(2, 3, 256, 256))
    assert y.shape == (2, 256, enc.dim) and enc.dim == 512 // 16
    assert encoders.get_spec("vgg16").dim == 512
    assert enc(torch.rand(1, 3, 512, 512)).shape == (1, 1024, enc.dim)
    enc.train()
    assert not enc.training


def test_vgg16_loads_torchvision_layout(tmp_path):
    src = VGG16Pool4("vgg16", width_div=16).eval()
    sd = {k: v for k, v in src.state_dict().items()}
    sd["features.24.weight"] = torch.zeros(1)  # layers past pool4 and the classifier are ignored
    sd["classifier.0.weight"] = torch.zeros(1)
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(sd, path)
    enc = encoders.build("vgg16", tiny=True, weights=path)
    x = torch.rand(1, 3, 64, 64)
    ref = src.tokens(src.preprocess(x, (4, 4)))
    torch.testing.assert_close(enc(x), ref)


def test_vgg16_missing_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("IREPA_ENCODER_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth") as e:
        encoders.build("vgg16")
    assert str(tmp_path) in str(e.value)
