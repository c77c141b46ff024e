"""irepa.grid, the one image-grid writer (trainer sample grids, launch/sample.py's grid.png)."""
import numpy as np
import pytest
import torch
from PIL import Image

from irepa.grid import make_grid, save_grid, to_uint8_nhwc


def test_float_gray_float_rgb_and_uint8_give_the_same_grid(tmp_path):
    g = torch.Generator().manual_seed(0)
    gray = torch.rand(5, 1, 8, 8, generator=g)
    u8 = (gray * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    a, b, c = make_grid(gray, nrow=3), make_grid(gray.expand(-1, 3, -1, -1), nrow=3), make_grid(u8, nrow=3)
    assert np.array_equal(a, b) and np.array_equal(a, c)
    side = 8 * 8  # 8 px images are upscaled 8x to the 64 px minimum
    assert a.shape == (2 * (side + 2) + 2, 3 * (side + 2) + 2, 3)
    assert (a[:2] == 255).all() and np.array_equal(a[2:2 + side:8, 2:2 + side:8, 0], u8[0, :, :, 0])
    path = save_grid(gray, tmp_path / "s" / "g.png")  # default: a square of ceil(sqrt(5)) = 3 per row
    assert np.array_equal(np.asarray(Image.open(path)), a) and [p.name for p in (tmp_path / "s").iterdir()] == ["g.png"]


def test_bad_layouts_are_named():
    with pytest.raises(ValueError, match=r"\[N, 1\|3, H, W\]"):
        to_uint8_nhwc(torch.rand(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        to_uint8_nhwc(np.zeros((2, 3, 4, 4), np.uint8))


def test_quantize_rules():
    """"round" is the nearest uint8 (JiT's np.round(clip(255 x))); "truncate" drops the
    fraction of clamp(255 x, 0, 255) as iREPA's ldm/generate.py@99ad4ac does."""
    from irepa.grid import quantize_unit
    x = torch.tensor([-0.1, 0.0, 0.4 / 255, 0.6 / 255, 1.5 / 255, 254.7 / 255, 1.0, 1.2])
    assert quantize_unit(x, "round").tolist() == [0, 0, 0, 1, 2, 255, 255, 255]
    assert quantize_unit(x, "truncate").tolist() == [0, 0, 0, 0, 1, 254, 255, 255]
    img = x[None, None, None, :].expand(1, 3, 1, -1)
    assert to_uint8_nhwc(img, "truncate")[0, 0, :, 0].tolist() == [0, 0, 0, 0, 1, 254, 255, 255]
    with pytest.raises(ValueError, match="quantize must be one of"):
        quantize_unit(x, "floor")
