"""HOG, dense SIFT and VGG16 pool4 against independent computations on real images."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from irepa import encoders
from irepa.encoders.classical import GRAY_WEIGHTS, VGG16Pool4, central_gradients, rgb_to_gray


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


def _skimage_gradients(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from skimage.feature._hog import _hog_channel_gradient
    return _hog_channel_gradient(gray)


def _numpy_bins(g_row: np.ndarray, g_col: np.ndarray) -> np.ndarray:
    """scikit-image's orientation rule with numpy's atan2: bin i holds [i, i+1) * 22.5 degrees."""
    angle = np.rad2deg(np.arctan2(g_row, g_col)) % 180
    return np.clip(np.searchsorted(np.arange(9) * 22.5, angle, side="right") - 1, 0, 7)


def _bin_disagreements(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pixels where our torch binning and numpy's differ [K, 2], numpy's angle there [K]).

    Only the atan2 implementation differs between the two (same gradients, same rule); it
    may round a gradient that lies exactly on a bin edge (45 degrees is common in 8-bit
    images) to either side, depending on the CPU's vector math library.
    """
    hog = encoders.build("hog-patch").double()
    g_row, g_col = _skimage_gradients(gray)
    ours = hog.orientation_bins(torch.from_numpy(g_row)[None], torch.from_numpy(g_col)[None])[0].numpy()
    differ = (ours != _numpy_bins(g_row, g_col)) & (np.hypot(g_row, g_col) > 0)
    angle = np.rad2deg(np.arctan2(g_row, g_col)) % 180
    return np.argwhere(differ), angle[differ]


def _tokens_of(pixels: np.ndarray, width: int) -> set[int]:
    return {int(r // 16 * (width // 16) + c // 16) for r, c in pixels}


@pytest.mark.parametrize("image", ["astronaut", "camera"])
def test_hog_accumulation_matches_skimage_exactly(image):
    """Given the same orientation bins, every token equals scikit-image's (gradients, cell
    votes, block layout and L2-Hys) on a real image; no token is exempt."""
    img = _astronaut() if image == "astronaut" else _camera_rgb()
    gray = _gray(img)
    hog = encoders.build("hog-patch").double()
    g_row, g_col = central_gradients(torch.from_numpy(gray)[None])
    ref_row, ref_col = _skimage_gradients(gray)
    assert torch.equal(g_row[0], torch.from_numpy(ref_row)) and torch.equal(g_col[0], torch.from_numpy(ref_col))
    bins = torch.from_numpy(_numpy_bins(ref_row, ref_col))[None]
    out = hog.blocks(torch.hypot(g_col, g_row), bins)
    # scikit-image accumulates cells in float32, hence 1e-6 rather than fp64 round-off
    torch.testing.assert_close(out, _skimage_hog_tokens(gray), atol=1e-6, rtol=0)


@pytest.mark.parametrize("image", ["astronaut", "camera"])
def test_hog_orientation_bins_differ_only_on_exact_edges(image):
    """Our bins equal numpy's at every pixel, except where the angle lies on a bin edge to
    within a few ulps (an atan2 rounding tie), and there the two pick neighbouring bins."""
    img = _astronaut() if image == "astronaut" else _camera_rgb()
    pixels, angle = _bin_disagreements(_gray(img))
    to_edge = np.abs(angle - np.round(angle / 22.5) * 22.5)  # 180 == 0 on the half circle
    assert (to_edge < 1e-12).all(), f"bins differ {to_edge.max():.3g} degrees from an edge at {pixels[:5]}"


@pytest.mark.parametrize("image", ["astronaut", "camera"])
def test_hog_matches_skimage_float64(image):
    """End to end against scikit-image: every token matches, except tokens holding a pixel
    whose bin is an atan2 tie (test_hog_orientation_bins_differ_only_on_exact_edges)."""
    img = _astronaut() if image == "astronaut" else _camera_rgb()
    out = encoders.build("hog-patch").double()(img)
    assert out.shape == (1, 1024, 128)  # 512 px -> 32x32 tokens
    gray = _gray(img)
    per_token = (out - _skimage_hog_tokens(gray)).abs().amax(-1)[0]
    differing = {int(t) for t in torch.nonzero(per_token > 1e-6).flatten()}
    ties = _tokens_of(_bin_disagreements(gray)[0], gray.shape[1])
    assert differing <= ties, f"tokens {sorted(differing - ties)[:10]} differ with no atan2 tie in them"


def test_hog_float32_close_to_skimage():
    img = _astronaut()
    out = encoders.build("hog-patch")(img.float()).double()
    ref = _skimage_hog_tokens(_gray(img))
    per_token = (out - ref).abs().amax(-1)
    # fp32 gray values move some gradients that sit on a bin edge into the neighbour bin
    assert (per_token < 1e-3).float().mean() > 0.8
    assert (out - ref).abs().mean() < 1e-3


def test_hog_contract_128px_digits_size():
    hog = encoders.build("hog-patch")
    assert hog.dim == 128 and hog.name == "hog-patch" and not hog.training
    x = torch.rand(3, 3, 128, 128)
    y = hog(x)
    assert y.shape == (3, 64, 128) and y.dtype == torch.float32
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(3, 64), atol=1e-4, rtol=0)
    torch.testing.assert_close(hog(x[1:2]), y[1:2])  # batch independent
    assert (y >= 0).all()


def test_bad_input_names_the_problem():
    hog = encoders.build("hog-patch")
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


def test_sift_upright_matches_direct_loop():
    img = _camera_rgb()[..., 200:264, 180:260]  # 64 x 80 crop: 4 x 5 patches of a real image
    out = encoders.build("sift-upright").double()(img)
    assert out.shape == (1, 20, 128)
    gray = _gray(img)
    ref = np.stack([_sift_loop(gray, i, j) for i in range(4) for j in range(5)])
    torch.testing.assert_close(out[0], torch.from_numpy(ref), atol=1e-9, rtol=0)


def test_sift_upright_512px_unit_norm():
    img = _astronaut().float()
    out = encoders.build("sift-upright")(img)
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
    with pytest.raises(FileNotFoundError, match="vgg16_features-amdegroot-88682ab5.pth") as e:
        encoders.build("vgg16")
    assert str(tmp_path) in str(e.value)
