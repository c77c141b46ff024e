"""Attention backends agree with SDPA and with a float64 naive attention.

On CPU only SDPA (and the dispatch rules) can run; the flash-attn and xformers checks
need CUDA and the package, and skip otherwise. Tolerances follow the three-way rule: a
backend's error against float64 may be at most a small multiple of SDPA's own error in
the same dtype, plus an atol per dtype. Inputs are fresh random each run.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from irepa.models import attention as A

SHAPES = [(2, 4, 64, 32), (1, 3, 257, 64), (3, 2, 17, 128)]  # B, H, T, Dh (odd T included)
CUDA = torch.cuda.is_available()


def naive(q, k, v):
    q, k, v = (t.double() for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return w @ v


def _qkv(shape, dtype, device, requires_grad=False):
    return [torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad) for _ in range(3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_sdpa_matches_float64_naive(shape):
    q, k, v = _qkv(shape, torch.float32, "cpu", requires_grad=True)
    out = A.attention(q, k, v, "sdpa")
    torch.testing.assert_close(out.double(), naive(q, k, v), atol=2e-5, rtol=1e-4)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(naive(q64, k64, v64), (q64, k64, v64), do.double())
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)


def test_cpu_dispatch():
    assert A.resolve_backend("auto") in A.available_backends()
    if not CUDA:
        assert A.available_backends() == ["sdpa"] and A.resolve_backend("auto") == "sdpa"
        with pytest.raises(ValueError, match="not available"):
            A.resolve_backend("flash")
    with pytest.raises(ValueError, match="unknown attention backend"):
        A.resolve_backend("ring")
    q, k, v = _qkv((1, 2, 9, 16), torch.float32, "cpu")
    torch.testing.assert_close(A.attention(q, k, v, "sdpa"), F.scaled_dot_product_attention(q, k, v))


def _three_way(backend, dtype, shape):
    if backend not in A.available_backends():
        pytest.skip(f"{backend} not installed")
    q, k, v = _qkv(shape, dtype, "cuda", requires_grad=True)
    out = A.attention(q, k, v, backend)
    base = F.scaled_dot_product_attention(q, k, v)
    ref = naive(q, k, v)
    atol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    err, base_err = (out.double() - ref).abs().max(), (base.double() - ref).abs().max()
    assert torch.isfinite(out).all() and err <= 2 * base_err + atol, (err, base_err)
    do = torch.randn_like(out)
    g_out = torch.autograd.grad(out, (q, k, v), do)
    g_base = torch.autograd.grad(base, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    g_ref = torch.autograd.grad(naive(q64, k64, v64), (q64, k64, v64), do.double())
    for a, b, r in zip(g_out, g_base, g_ref):
        assert (a.double() - r).abs().max() <= 2 * (b.double() - r).abs().max() + 4 * atol


@pytest.mark.skipif(not CUDA, reason="flash-attn needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_flash_matches_float64(dtype, shape):
    _three_way("flash", dtype, shape)


@pytest.mark.skipif(not CUDA, reason="xformers needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_xformers_matches_float64(dtype, shape):
    _three_way("xformers", dtype, shape)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash", "xformers"])
def test_sit_forward_same_with_every_backend(backend):
    from irepa import models
    if backend not in A.available_backends():
        pytest.skip(f"{backend} not installed")
    torch.manual_seed(0)
    ref = models.build("SiT-T/2", input_size=16, num_classes=10, attn_backend="sdpa").cuda()
    other = models.build("SiT-T/2", input_size=16, num_classes=10, attn_backend=backend).cuda()
    with torch.no_grad():  # adaLN-Zero init would make every block the identity: randomize
        for p in ref.parameters():
            p.normal_(0, 0.05)
    other.load_state_dict(ref.state_dict())
    x, t, y = torch.randn(4, 4, 16, 16, device="cuda"), torch.rand(4, device="cuda"), torch.arange(4, device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        a, b = ref(x, t, y)[1], other(x, t, y)[1]
    torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)
