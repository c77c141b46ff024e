"""Forward-mode AD (torch.func.jvp) through the model's building blocks (irepa.forward_ad).

Each path is compared against torch.func.jvp of an explicit float64 reference written here;
the PyTorch facts the fallbacks rest on are checked too, so a PyTorch that changes them
fails here and the docstring of irepa.forward_ad gets updated.
"""
import os

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from irepa import forward_ad
from irepa.align import alignment_loss
from irepa.models.attention import attention, math_attention
from irepa.models.layers import modulate_norm_ref

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _naive_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v


def _rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("op", ["_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                                "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"])
def test_fused_sdpa_kernels_have_no_forward_ad(op):
    """The fact behind the math fallback, checked on meta tensors (no GPU needed): the autograd
    kernel refuses forward AD before any device code runs."""
    fn = {"_scaled_dot_product_efficient_attention": lambda q, k, v: torch.ops.aten.__getattr__(op)(q, k, v, None, False),
          "_scaled_dot_product_cudnn_attention": lambda q, k, v: torch.ops.aten.__getattr__(op)(q, k, v, None, False)
          }.get(op, lambda q, k, v: torch.ops.aten.__getattr__(op)(q, k, v))
    q, k, v = (torch.randn(1, 2, 4, 8, device="meta", dtype=torch.float16) for _ in range(3))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward AD"):
        fn(fwAD.make_dual(q, torch.randn_like(q)), k, v)
    with fwAD.dual_level():  # the math backend has the formula
        out = torch.ops.aten._scaled_dot_product_attention_math(fwAD.make_dual(q, torch.randn_like(q)), k, v)[0]
        assert fwAD.unpack_dual(out).tangent is not None


def test_cpu_sdpa_default_refuses_jvp_and_attention_falls_back(capsys):
    q, k, v, tq, tk, tv = (_rand(2, 3, 7, 8) for _ in range(6))
    with pytest.raises(NotImplementedError):
        torch.func.jvp(F.scaled_dot_product_attention, (q.float(), k.float(), v.float()),
                       (tq.float(), tk.float(), tv.float()))
    forward_ad._noted.clear()
    out, tan = torch.func.jvp(lambda a, b, c: attention(a, b, c, "sdpa"), (q, k, v), (tq, tk, tv))
    ref, ref_tan = torch.func.jvp(_naive_attention, (q, k, v), (tq, tk, tv))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tan, ref_tan, rtol=1e-12, atol=1e-12)
    torch.func.jvp(lambda a, b, c: attention(a, b, c, "sdpa"), (q, k, v), (tq, tk, tv))
    err = capsys.readouterr().err
    assert err.count("forward-mode AD (JVP): attention uses explicit math softmax attention") == 1
    # outside a JVP the fast path is untouched, and the fallback matches it in fp32
    qf, kf, vf = q.float(), k.float(), v.float()
    torch.testing.assert_close(math_attention(qf, kf, vf), attention(qf, kf, vf, "sdpa"), rtol=1e-5, atol=1e-6)


def test_math_attention_softmax_precision_in_bf16():
    """bf16 inputs: softmax in fp32, error against float64 within bf16 rounding of the output."""
    q, k, v = (_rand(2, 2, 33, 16) for _ in range(3))
    ref = _naive_attention(q, k, v)
    out = math_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() < 3e-2


@pytest.mark.skipif(not INTERPRETED, reason="the fused path runs on CPU tensors only under TRITON_INTERPRET=1")
def test_fused_adaln_custom_op_under_jvp():
    """The raw custom op silently drops the tangent; the public fused_adaln takes the reference."""
    from irepa.kernels import adaln
    from irepa.kernels import fused_adaln
    x, shift, scale = _rand(2, 5, 32, dtype=torch.float32), _rand(2, 32, dtype=torch.float32), _rand(2, 32, dtype=torch.float32)
    tx, ts, tc = torch.randn_like(x), torch.randn_like(shift), torch.randn_like(scale)
    ref, ref_tan = torch.func.jvp(lambda a, b, c: modulate_norm_ref(a.double(), b.double(), c.double()),
                                  (x, shift, scale), (tx, ts, tc))
    _, raw_tan = torch.func.jvp(lambda a, b, c: adaln._adaln_fwd_op(a, b, c, 1e-6)[0], (x, shift, scale), (tx, ts, tc))
    assert (raw_tan.double() - ref_tan).abs().max() > 0.1  # the silent failure the fallback exists for
    out, tan = torch.func.jvp(fused_adaln, (x, shift, scale), (tx, ts, tc))
    torch.testing.assert_close(tan.double(), ref_tan, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    ref_x_tan = torch.func.jvp(lambda a: modulate_norm_ref(a.double(), shift.double(), scale.double()),
                               (x,), (tx,))[1]
    with fwAD.dual_level():  # the dual-tensor API is detected too
        dual_tan = fwAD.unpack_dual(fused_adaln(fwAD.make_dual(x, tx), shift, scale)).tangent
    torch.testing.assert_close(dual_tan.double(), ref_x_tan, rtol=1e-4, atol=1e-4)
    # outside forward AD the kernel still runs
    calls = []
    orig = adaln._forward
    adaln._forward = lambda *a: calls.append(1) or orig(*a)
    try:
        fused_adaln(x, shift, scale)
    finally:
        adaln._forward = orig
    assert calls == [1]


@pytest.mark.skipif(not INTERPRETED, reason="the fused path runs on CPU tensors only under TRITON_INTERPRET=1")
def test_fused_alignment_loss_under_jvp():
    from irepa.kernels import fused_alignment_loss
    z, y, tz = _rand(2, 16, 24, dtype=torch.float32), _rand(2, 16, 24, dtype=torch.float32), _rand(2, 16, 24, dtype=torch.float32)
    _, tan = torch.func.jvp(lambda a: fused_alignment_loss(a, y, 0.6), (z,), (tz,))
    _, ref = torch.func.jvp(lambda a: alignment_loss(a.double(), y.double(), 0.6), (z,), (tz,))
    torch.testing.assert_close(tan.double(), ref, rtol=1e-4, atol=1e-6)


def test_active_flags():
    assert not forward_ad.active(torch.zeros(1))
    with forward_ad.jvp_mode():
        assert forward_ad.active()
    seen = []
    torch.func.jvp(lambda a: seen.append(forward_ad.active(a)) or a, (torch.zeros(1),), (torch.ones(1),))
    assert seen == [True]
