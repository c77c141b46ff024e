"""irepa.metrics.spatial (= irepa.analysis.spatial) against direct per-pair loops, plus known cases
(End2End-Diffusion/iREPA metrics/spatial_metrics.py@99ad4ac)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from irepa.metrics import spatial as S


# ---------------- direct references: python loops over pairs, float64 ----------------

def _cos_and_dist(x: np.ndarray):
    T = x.shape[0]
    side = math.isqrt(T)
    n = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    K = n @ n.T
    pos = [(t // side, t % side) for t in range(T)]
    return K, pos, side


def _pairs(T):
    return ((t, u) for t in range(T) for u in range(T) if t != u)


def ref_lds(x, variant):
    K, pos, side = _cos_and_dist(x)
    near, far = [], []
    for t, u in _pairs(len(x)):
        d = abs(pos[t][0] - pos[u][0]) + abs(pos[t][1] - pos[u][1])
        if variant == "code":
            is_near, is_far = d == 1, d >= 6
        else:
            is_near, is_far = d < side / 2, d >= side / 2
        if is_near:
            near.append(K[t, u])
        if is_far:
            far.append(K[t, u])
    return np.mean(near) - np.mean(far)


def ref_cds(x):
    K, pos, _ = _cos_and_dist(x)
    by_d = {}
    for t, u in _pairs(len(x)):
        d = abs(pos[t][0] - pos[u][0]) + abs(pos[t][1] - pos[u][1])
        if 1 <= d <= 8:
            by_d.setdefault(d, []).append(K[t, u])
    ds = sorted(by_d)
    slope = np.polyfit(ds, [np.mean(by_d[d]) for d in ds], 1)[0]
    return -slope


def ref_srss(x, fg):
    """metrics/spatial_metrics.py@99ad4ac metric_srss (d_pos 1, d_neg 6) as a loop: NaN only with
    < 2 foreground or < 1 background token, or no anchor with both kinds of pairs."""
    K, pos, _ = _cos_and_dist(x)
    T = len(x)
    if fg.sum() < 2 or (~fg).sum() < 1:
        return math.nan
    vals = []
    for a in range(T):
        if not fg[a]:
            continue
        near, far = [], []
        for u in range(T):
            d = abs(pos[a][0] - pos[u][0]) + abs(pos[a][1] - pos[u][1])
            if d == 1 and fg[u]:
                near.append(K[a, u])
            if d >= 6 and not fg[u]:
                far.append(K[a, u])
        if near and far:
            vals.append(np.mean(near) - np.mean(far))
    return np.mean(vals) if vals else math.nan


def ref_rmsc(x):
    n = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = n.mean(0)
    return math.sqrt(np.mean([np.sum((n[t] - c) ** 2) for t in range(len(n))]))


def smooth_field(B, side, D, sigma=2.0, seed=0):
    """Spatially correlated features: white noise blurred by a Gaussian, unit variance."""
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(-6, 7, dtype=torch.float32)
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k = k / k.norm()  # separable blur of unit-variance noise keeps unit variance
    x = torch.randn(B * D, 1, side + 12, side + 12, generator=g)
    x = F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))  # valid: no wrap-around
    return x.view(B, D, side * side).transpose(1, 2).contiguous()


# ---------------- against the loops ----------------

@pytest.mark.parametrize("shape", [(3, 8, 8, 12), (1, 16, 16, 32)])
def test_lds_cds_rmsc_match_loops(shape):
    B, H, W, D = shape
    x = torch.randn(B, H * W, D) + 0.3 * torch.randn(B, 1, D)  # a shared component: K not ~0
    got = {"code": S.lds(x, "code"), "paper": S.lds(x, "paper"), "cds": S.cds(x), "rmsc": S.rmsc(x)}
    for b in range(B):
        xb = x[b].double().numpy()
        assert got["code"][b].item() == pytest.approx(ref_lds(xb, "code"), abs=1e-5)
        assert got["paper"][b].item() == pytest.approx(ref_lds(xb, "paper"), abs=1e-5)
        assert got["cds"][b].item() == pytest.approx(ref_cds(xb), abs=1e-5)
        assert got["rmsc"][b].item() == pytest.approx(ref_rmsc(xb), abs=1e-5)
    assert all(v.shape == (B,) and v.dtype == torch.float32 for v in got.values())


def test_srss_matches_loop_8x8():
    """On an 8x8 grid (64 tokens) SRSS is defined wherever the release's metric_srss defines it:
    two adjacent foreground tokens with background 6 away suffice; one foreground token does not."""
    B, side, D = 6, 8, 16
    x = torch.randn(B, side * side, D) + 0.5 * torch.randn(B, 1, D)
    fg = torch.zeros(B, side, side, dtype=torch.bool)
    fg[0, 2:6, 1:7] = True          # a block
    fg[1] = torch.rand(side, side) > 0.5  # scattered: some anchors lack fg neighbours
    fg[2, :, :4] = True             # half
    fg[3, 0, 0] = True              # one foreground token -> NaN
    fg[4, 0, 0:2] = True            # two adjacent foreground tokens, background at d >= 6: defined
    fg[5] = True                    # no background -> NaN
    got = S.srss(x, fg.flatten(1))
    for b in range(B):
        want = ref_srss(x[b].double().numpy(), fg[b].flatten().numpy())
        if math.isnan(want):
            assert math.isnan(got[b].item())
        else:
            assert got[b].item() == pytest.approx(want, abs=1e-5)
    assert [math.isnan(v) for v in got.tolist()] == [False, False, False, True, False, True]


def test_srss_matches_loop_16x16_pixel_mask():
    side, D = 16, 24
    x = smooth_field(1, side, D, seed=3) + 0.2 * torch.randn(1, side * side, D)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    pix = ((yy - 30) ** 2 + (xx - 34) ** 2 < 22 ** 2)[None]  # [1, 64, 64] disc, pooled 4x4 -> grid
    fg = S.grid_mask(pix, side)
    assert 64 <= int(fg.sum()) <= side * side - 64
    got = S.srss(x, pix)
    want = ref_srss(x[0].double().numpy(), fg[0].numpy())
    assert got[0].item() == pytest.approx(want, abs=1e-5)


def test_spatial_metrics_shares_gram_and_agrees():
    x = torch.randn(2, 64, 8)
    m = torch.rand(2, 64) > 0.5
    allm = S.spatial_metrics(x, m)
    torch.testing.assert_close(allm["lds"], S.lds(x))
    torch.testing.assert_close(allm["lds_paper"], S.lds(x, "paper"))
    torch.testing.assert_close(allm["cds"], S.cds(x))
    torch.testing.assert_close(allm["rmsc"], S.rmsc(x))
    torch.testing.assert_close(allm["srss"], S.srss(x, m), equal_nan=True)


def test_pixel_masks_are_max_pooled_to_tokens():
    """metrics/spatial_metrics_comparison.py@99ad4ac: (mask > 0) then max_pool2d(16, 16): a token
    is foreground if any of its pixels is. "area" pooling (>= half the pixels) stays an option."""
    side, px = 4, 16
    pix = torch.zeros(2, side * px, side * px)
    pix[0, 0, 0] = 1.0                      # one pixel of token (0, 0)
    pix[0, 20:40, 20:40] = 1.0              # a square across tokens (1,1), (1,2), (2,1), (2,2)
    pix[1, 16:32, 16:24] = 0.3              # half of token (1, 1), a soft value
    want = torch.zeros(2, side, side, dtype=torch.bool)
    for b in range(2):
        for r in range(side):
            for c in range(side):
                want[b, r, c] = bool((pix[b, r * px:(r + 1) * px, c * px:(c + 1) * px] > 0).any())
    assert torch.equal(S.grid_mask(pix, side), want.flatten(1))
    assert want[0, 0, 0] and want[0, 1, 1] and want[0, 2, 2] and want[1, 1, 1] and int(want[1].sum()) == 1
    area = S.grid_mask(pix > 0, side, pooling="area")
    assert not area[0, 0] and area[0, 1 * side + 1] and area[1, 1 * side + 1]  # 1/256 < half; 128/256 = half
    assert torch.equal(S.grid_mask(torch.tensor([[0.0, 0.2, 1.0, 0.0]]), 2), torch.tensor([[False, True, True, False]]))
    with pytest.raises(ValueError, match="pooling"):
        S.grid_mask(pix, side, pooling="mean")


def test_mask_filter_is_the_release_dataset_filter():
    """load_and_filter_masks@99ad4ac keeps an image when its max-pooled token mask has >= 64
    foreground and >= 64 background tokens; SRSS itself stays defined below that."""
    fg = torch.zeros(3, 256, dtype=torch.bool)
    fg[0, :64] = True    # 64 / 192: kept
    fg[1, :63] = True    # 63 foreground: dropped
    fg[2, :193] = True   # 63 background: dropped
    assert S.mask_filter(fg).tolist() == [True, False, False]
    assert S.mask_filter(fg, 63).tolist() == [True, True, True]
    x = smooth_field(3, 16, 8)
    assert not torch.isnan(S.srss(x, fg)).any()


# ---------------- known cases ----------------

def test_known_cases_sign_and_order():
    B, side, D = 4, 16, 32
    const = torch.randn(1, 1, D).expand(B, side * side, D).contiguous()
    smooth = smooth_field(B, side, D)
    white = torch.randn(B, side * side, D)
    feats = {"const": const, "smooth": smooth, "white": white}
    for a in (0.5, 1.0, 2.0):  # local structure diluted by more and more white noise
        feats[f"mix{a}"] = smooth + a * white
    mean = {k: {n: v.mean().item() for n, v in S.spatial_metrics(f).items()} for k, f in feats.items()}
    for n in ("lds", "lds_paper", "cds", "rmsc"):
        assert abs(mean["const"][n]) < 1e-5, n          # every token identical: nothing spatial
    for n in ("lds", "lds_paper", "cds"):
        assert abs(mean["white"][n]) < 0.03, n          # no spatial structure
        assert mean["smooth"][n] > 0.1, n               # similarity decays with distance
        order = [mean[k][n] for k in ("smooth", "mix0.5", "mix1.0", "mix2.0", "white")]
        assert order == sorted(order, reverse=True), (n, order)
    # RMSC: spread of the normalized tokens; identical < correlated < independent (~sqrt(1 - 1/T))
    assert mean["const"]["rmsc"] < mean["smooth"]["rmsc"] < mean["white"]["rmsc"]
    assert mean["white"]["rmsc"] == pytest.approx(math.sqrt(1 - 1 / side ** 2), abs=0.02)


def test_srss_known_cases():
    side, D = 16, 32
    fg = torch.zeros(1, side, side, dtype=torch.bool)
    fg[0, 3:13, 3:13] = True  # 100 fg, 156 bg tokens
    a, b = torch.randn(D), torch.randn(D)
    region = torch.where(fg.flatten(1)[..., None], a, b) + 0.3 * torch.randn(1, side * side, D)
    white = torch.randn(1, side * side, D)
    const = a.expand(1, side * side, D)
    assert S.srss(region, fg).item() > 0.5
    assert abs(S.srss(white, fg).item()) < 0.05
    assert abs(S.srss(const, fg).item()) < 1e-5
    assert math.isnan(S.srss(region, torch.zeros_like(fg)).item())  # no foreground


def test_bad_input():
    with pytest.raises(ValueError, match="square grid"):
        S.lds(torch.randn(1, 15, 4))
    with pytest.raises(ValueError, match="B, T, D"):
        S.rmsc(torch.randn(16, 4))
    with pytest.raises(ValueError, match="variant"):
        S.lds(torch.randn(1, 16, 4), "both")
    with pytest.raises(ValueError, match="masks"):
        S.srss(torch.randn(2, 16, 4), torch.ones(1, 16))


def test_small_grid_nan_where_undefined():
    x = torch.randn(2, 4, 8)  # 2x2 grid: no pair at d >= 6
    assert torch.isnan(S.lds(x)).all()
    assert torch.isfinite(S.cds(x)).all()  # d = 1, 2 present


def test_nan_mean_and_correlation():
    assert S.nan_mean(torch.tensor([1.0, math.nan, 3.0])) == (2.0, 2)
    assert math.isnan(S.nan_mean([math.nan])[0])
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, math.nan])
    y = np.array([10.0, 8.0, 7.5, 3.0, 1.0, 2.0])
    r = S.correlation(x, y)
    assert r["n"] == 5 and r["pearson_r"] < -0.95 and r["spearman_r"] == pytest.approx(-1.0)
    r2 = S.correlation(np.arange(6.0), np.exp(np.arange(6.0)))
    assert r2["spearman_r"] == pytest.approx(1.0) and r2["pearson_r"] < 0.99
    assert math.isnan(S.correlation([1.0, 2.0], [3.0, 4.0])["pearson_r"])
