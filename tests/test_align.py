"""irepa.align against float64 formulas written out independently."""
import numpy as np
import pytest
import torch

from irepa.align import AlignmentHead, ConvProjector, MLPProjector, alignment_loss, spatial_norm


def _spatial_norm_np(y, gamma, eps=1e-6):
    y = y.astype(np.float64)
    mean = y.mean(axis=1, keepdims=True)
    std = np.sqrt(((y - mean) ** 2).sum(axis=1, keepdims=True) / (y.shape[1] - 1))
    return (y - gamma * mean) / (std + eps)


def _loss_np(z, y, gamma):
    z = z.astype(np.float64)
    t = _spatial_norm_np(y, gamma) if gamma is not None else y.astype(np.float64)
    zn = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    tn = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
    return -(zn * tn).sum(-1).mean()


@pytest.mark.parametrize("shape", [(2, 16, 8), (1, 257, 1000), (3, 64, 33)])
@pytest.mark.parametrize("gamma", [0.0, 0.6, 1.0])
def test_spatial_norm_matches_float64(shape, gamma):
    y = torch.randn(shape) * 3 + torch.randn(1, 1, shape[2])
    out = spatial_norm(y, gamma)
    ref = _spatial_norm_np(y.numpy(), gamma)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gamma", [None, 0.6, 0.8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_alignment_loss_matches_float64(gamma, dtype):
    z, y = torch.randn(3, 36, 24).to(dtype), torch.randn(3, 36, 24).to(dtype)
    got = alignment_loss(z, y, gamma)
    ref = _loss_np(z.float().numpy(), y.float().numpy(), gamma)
    assert got.dtype == torch.float32
    assert abs(got.item() - ref) < 1e-5


def test_alignment_loss_gradient_only_to_projection():
    z = torch.randn(2, 16, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 16, 8, dtype=torch.float64, requires_grad=True)
    alignment_loss(z, y, 0.6).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert y.grad is None
    # d/dz of -mean cos is the float64 analytic gradient
    z2 = z.detach().clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda a: alignment_loss(a, y.detach(), 0.6), (z2,))


def test_loss_is_minus_one_when_aligned():
    y = torch.randn(2, 16, 8)
    assert torch.isclose(alignment_loss(spatial_norm(y, 0.6), y, 0.6), torch.tensor(-1.0), atol=1e-6)


def test_conv_projector_non_square_tokens_raises():
    proj = ConvProjector(8, 4)
    with pytest.raises(ValueError, match="do not form a square grid"):
        proj(torch.randn(2, 15, 8))
    assert proj(torch.randn(2, 16, 8)).shape == (2, 16, 4)


def test_conv_projector_is_3x3_on_row_major_grid():
    proj = ConvProjector(1, 1)
    with torch.no_grad():
        proj.conv.weight.zero_()
        proj.conv.weight[0, 0, 1, 2] = 1.0  # picks the right neighbour
        proj.conv.bias.zero_()
    h = torch.arange(16.0).view(1, 16, 1)
    out = proj(h).view(4, 4)
    grid = h.view(4, 4)
    assert torch.equal(out[:, :3], grid[:, 1:]) and torch.equal(out[:, 3], torch.zeros(4))


def test_mlp_projector_shape_and_head_average():
    mlp = MLPProjector(8, 5, hidden_dim=16)
    assert mlp(torch.randn(2, 9, 8)).shape == (2, 9, 5)
    head = AlignmentHead(8, [5, 7], projector="mlp", gamma=None, hidden_dim=16)
    h, ys = torch.randn(2, 9, 8), [torch.randn(2, 9, 5), torch.randn(2, 9, 7)]
    expected = torch.stack([alignment_loss(p(h), y, None) for p, y in zip(head.projectors, ys)]).mean()
    assert torch.allclose(head(h, ys), expected)
    with pytest.raises(ValueError, match="does not match encoder features"):
        head(h, [torch.randn(2, 9, 6), ys[1]])


def test_conv_kernel_size_is_a_config_field_threaded_to_the_head():
    """align.proj_kernel_size (default 3, the paper's) reaches every ConvProjector; 1 is the LDM
    release's flag default (ldm/train.py@99ad4ac: --proj-kwargs-kernel-size 1), a per-token
    linear map; even or non-positive sizes are refused where they are set."""
    from irepa.recipes import resolve
    from irepa.train.build import build_head

    assert resolve("sit-xl2-irepa").align.proj_kernel_size == 3
    for k in (1, 3, 5):
        cfg = resolve("digits-sit-irepa", {"align.proj_kernel_size": k})
        head = build_head(cfg, 16, [8, 4], fused=False)
        assert [tuple(p.conv.weight.shape) for p in head.projectors] == [(8, 16, k, k), (4, 16, k, k)]
    one = ConvProjector(6, 5, kernel_size=1)
    h = torch.randn(2, 16, 6)
    want = h @ one.conv.weight[:, :, 0, 0].T + one.conv.bias
    torch.testing.assert_close(one(h), want)
    for bad in (0, 2, -1, 2.0):
        with pytest.raises(ValueError, match="proj_kernel_size must be a positive odd integer"):
            resolve("digits-sit-irepa", {"align.proj_kernel_size": bad})
        with pytest.raises(ValueError, match="kernel_size must be a positive odd integer"):
            ConvProjector(4, 4, kernel_size=bad)
