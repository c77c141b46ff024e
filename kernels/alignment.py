"""Fused iREPA alignment loss: spatial norm + per-token cosine; the gradient is made in the forward.

Contract (same as irepa.align.alignment_loss): z, y [B, T, E] -> fp32 scalar
    L = -(1/N) * sum_{b,t} <z, y'> / (max(|z|, 1e-12) * max(|y'|, 1e-12)),   N = B*T,
    y' = (y - gamma * mu) / (sigma + 1e-6)   if gamma is not None, else y' = y,
mu, sigma: mean and unbiased std of y over T per (b, channel). Every norm, dot and
statistic is accumulated in fp32 whatever the input dtype (bf16, fp16, fp32).

Design. The loss is a scalar, so dL/dz is fixed up to the factor dL/dloss as soon as the
forward has seen z and y: the forward computes it and the backward only scales it. The
op then keeps one [B, T, E] tensor in z's dtype for backward, not z and y.
  1. _channel_stats_kernel, grid (cdiv(E, BLOCK_E), B), only with gamma: one sweep over T.
     Each [BLOCK_T, BLOCK_E] tile is reduced exactly (mean, then squared deviations from
     it, in registers) and tiles are merged with Chan's parallel-variance formula, so a
     large channel offset does not cancel. Output: the per-(b, e) affine of the target,
     y' = y * a + c with a = 1/(sigma + 1e-6), c = -gamma * mu * a, [2, B, E] fp32 (a
     temporary of the forward).
  2. _token_fwd_kernel, grid (cdiv(T, BLOCK_T), B): a block of tokens of one sample. Loop 1
     over E accumulates <z,z>, <y',y'>, <z,y'> and writes cos per token; loss = -sum(cos)/N.
     With WRITE_GRAD, loop 2 re-reads the same rows (2 x 24 KiB per program at E = 768,
     bf16, just loaded: meant to come from L2, not yet measured on an H100) and writes the
     gradient direction w in z's dtype and rz per token in fp32.
  3. _token_bwd_kernel, same grid: dz = (-dL/dloss / N) * rz * w, fp32 math, z's dtype.
Gradient math. With rz = 1/max(|z|, eps), ry = 1/max(|y'|, eps), u = y' * ry (the unit
target, a constant: the target is under no_grad in the reference):
    d cos / dz = rz * u - [|z| >= eps] * cos * rz^2 * z = rz * w,
    w = u - [|z| >= eps] * cos * rz * z
(clamp_min blocks the norm's derivative below eps, as its autograd does). w is the part
of the unit target orthogonal to z, |w| <= 1 per token whatever the scale of z or N; the
scale rz / N stays in fp32. Storing dL/dz itself would not do in fp16: at B = T = 256
with unit-variance z its elements are ~1e-8, under fp16's smallest subnormal (6e-8), so
they would flush to zero before a GradScaler's factor (dL/dloss) reaches them; eager
autograd applies that factor in fp32 before its one cast to z's dtype, and so does step 3.
Saved for backward: w [B, T, E] in z's dtype and layout (z's stride order: the conv
projector's [B, E, T] -> [B, T, E] view gives a gradient with that layout) and rz [N]
fp32, 2 + 4/E bytes per element in bf16. Eager autograd keeps fp32 copies of z and of the
normalized target instead (8 bytes per element).
need_grad: the public function passes torch.is_grad_enabled() and z.requires_grad; without
it (eval, forward-only) loop 2 does not run and w, rz are empty: nothing extra is
allocated, written or saved.

Ideal HBM traffic per element (bf16, 2 bytes): forward 4 x 2 (y for the statistics, z and
y for the tokens, write w; one less without gamma, one less forward-only), backward 2 x 2
(read w, write dz). rz, cos and the statistics are O(B*T + B*E).

Limits: 3-D inputs of equal shape, any B, T, E (T >= 2 with gamma, as the reference),
any strides (the kernels take strides), int64 addressing. The gradient is rounded twice
to z's dtype (w in the forward, dz = scale * w in the backward) where eager rounds once:
one extra rounding, about 0.5 ulp of z's dtype more error (none in fp32 beyond fp32
rounding). Calling the op itself with need_grad=False and then asking for dL/dz raises.
Not twice differentiable. CPU tensors go to the eager reference unless TRITON_INTERPRET=1
was set when this module was imported and is set at the call (that is how the tests run
it). Block sizes are heuristics, not yet tuned on an H100.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from irepa import forward_ad
from irepa.align import COSINE_EPS, alignment_loss

SPATIAL_EPS = 1e-6  # spatial_norm's eps on the std
# @triton.jit reads TRITON_INTERPRET once, at decoration: remember what these kernels are
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_triton(t: Tensor) -> bool:
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and INTERPRETED and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _ref(z: Tensor, y: Tensor, gamma: float | None = None) -> Tensor:
    """The reference math in max(fp32, input dtype): float64 inputs give a float64 oracle."""
    dt = torch.promote_types(torch.promote_types(z.dtype, y.dtype), torch.float32)
    with torch.no_grad():
        y_ = y.to(dt)
        if gamma is not None:
            y_ = (y_ - gamma * y_.mean(1, keepdim=True)) / (y_.std(1, keepdim=True) + SPATIAL_EPS)
        u = y_ / y_.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    z_ = z.to(dt)
    z_n = z_ / z_.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    return -(z_n * u).sum(-1).mean()


@triton.jit
def _channel_stats_kernel(
    y_ptr,                      # [B, T, E], strides (s_yb, s_yt, s_ye)
    chan_ptr,                   # [2, B, E] fp32 out: a, c with y' = y * a + c
    B, T, E, gamma, eps_std,
    s_yb, s_yt, s_ye,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid_e = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    col = y_ptr + b * s_yb + offs_e.to(tl.int64)[None, :] * s_ye          # [1, BLOCK_E]
    mean = tl.zeros([BLOCK_E], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_E], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < T)[:, None] & mask_e[None, :]
        tile = tl.load(col + offs_t.to(tl.int64)[:, None] * s_yt, mask=mask, other=0.0).to(tl.float32)
        n_a = t0 * 1.0  # tokens merged so far (a scalar: `* 1.0` works compiled and interpreted)
        n_b = tl.minimum(T - t0, BLOCK_T) * 1.0
        mean_b = tl.sum(tile, axis=0) / n_b
        dev = tl.where(mask, tile - mean_b[None, :], 0.0)
        n = n_a + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n)
        m2 = m2 + tl.sum(dev * dev, axis=0) + delta * delta * (n_a * n_b / n)
    a = 1.0 / (tl.sqrt_rn(m2 / (T - 1)) + eps_std)
    out = chan_ptr + b * E + offs_e
    tl.store(out, a, mask=mask_e)
    tl.store(out + B * E, -gamma * mean * a, mask=mask_e)


@triton.jit
def _token_fwd_kernel(
    z_ptr, y_ptr,               # [B, T, E], strides (s_zb, s_zt, s_ze), (s_yb, s_yt, s_ye)
    chan_ptr,                   # [2, B, E] fp32 (read only if HAS_NORM)
    cos_ptr,                    # [N] fp32 out, N = B * T
    rz_ptr,                     # [N] fp32 out if WRITE_GRAD: 1 / max(|z|, eps)
    w_ptr,                      # [B, T, E] out if WRITE_GRAD, z's dtype, strides (s_wb, s_wt, s_we)
    B, T, E, eps,
    s_zb, s_zt, s_ze, s_yb, s_yt, s_ye, s_wb, s_wt, s_we,
    HAS_NORM: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    t64 = offs_t.to(tl.int64)[:, None]
    z_rows = z_ptr + b * s_zb + t64 * s_zt                                 # [BLOCK_T, 1]
    y_rows = y_ptr + b * s_yb + t64 * s_yt
    zz = tl.zeros([BLOCK_T], dtype=tl.float32)
    yy = tl.zeros([BLOCK_T], dtype=tl.float32)
    zy = tl.zeros([BLOCK_T], dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < E
        mask = mask_t[:, None] & mask_e[None, :]
        e64 = offs_e.to(tl.int64)[None, :]
        zt = tl.load(z_rows + e64 * s_ze, mask=mask, other=0.0).to(tl.float32)
        yt = tl.load(y_rows + e64 * s_ye, mask=mask, other=0.0).to(tl.float32)
        if HAS_NORM:
            a = tl.load(chan_ptr + b * E + offs_e, mask=mask_e, other=0.0)
            c = tl.load(chan_ptr + B * E + b * E + offs_e, mask=mask_e, other=0.0)
            yt = tl.where(mask, yt * a[None, :] + c[None, :], 0.0)
        zz += tl.sum(zt * zt, axis=1)
        yy += tl.sum(yt * yt, axis=1)
        zy += tl.sum(zt * yt, axis=1)
    nz = tl.sqrt_rn(zz)
    rz = 1.0 / tl.maximum(nz, eps)
    ry = 1.0 / tl.maximum(tl.sqrt_rn(yy), eps)
    cos = zy * rz * ry
    row = b * T + offs_t
    tl.store(cos_ptr + row, cos, mask=mask_t)
    if WRITE_GRAD:
        # d cos / dz = rz * w, w = y' * ry - [|z| >= eps] * cos * rz * z (see the header)
        tl.store(rz_ptr + row, rz, mask=mask_t)
        # rows past T have ry = 1/eps: zero them so their (unstored) w stays finite
        k_y = tl.where(mask_t, ry, 0.0)[:, None]
        k_z = tl.where(mask_t & (nz >= eps), cos * rz, 0.0)[:, None]
        w_rows = w_ptr + b * s_wb + t64 * s_wt
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask_e = offs_e < E
            mask = mask_t[:, None] & mask_e[None, :]
            e64 = offs_e.to(tl.int64)[None, :]
            zt = tl.load(z_rows + e64 * s_ze, mask=mask, other=0.0).to(tl.float32)
            yt = tl.load(y_rows + e64 * s_ye, mask=mask, other=0.0).to(tl.float32)
            if HAS_NORM:
                a = tl.load(chan_ptr + b * E + offs_e, mask=mask_e, other=0.0)
                c = tl.load(chan_ptr + B * E + b * E + offs_e, mask=mask_e, other=0.0)
                yt = yt * a[None, :] + c[None, :]
            w = k_y * yt - k_z * zt
            tl.store(w_rows + e64 * s_we, w.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _token_bwd_kernel(
    grad_ptr,                   # [] fp32: dL/dloss
    w_ptr,                      # [B, T, E] z's dtype: gradient direction, strides (s_b, s_t, s_e)
    rz_ptr,                     # [N] fp32: 1 / max(|z|, eps)
    dz_ptr,                     # [B, T, E] out, z's dtype, the same strides as w
    T, E, inv_n,
    s_b, s_t, s_e,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    g = -tl.load(grad_ptr) * inv_n
    k = (tl.load(rz_ptr + b * T + offs_t, mask=mask_t, other=0.0) * g)[:, None]
    rows = b * s_b + offs_t.to(tl.int64)[:, None] * s_t                   # [BLOCK_T, 1]
    for e0 in range(0, E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask = mask_t[:, None] & (offs_e < E)[None, :]
        offs = rows + offs_e.to(tl.int64)[None, :] * s_e
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dz_ptr + offs, (k * w).to(dz_ptr.dtype.element_ty), mask=mask)


# ---- launchers -------------------------------------------------------------------------

def _empty(shape, dtype, device) -> Tensor:
    """fp32 buffer allocation; tests swap it for a NaN-filled one to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_like(t: Tensor) -> Tensor:
    """A [B, T, E] buffer in t's dtype and stride order (dense); tests poison it like _empty."""
    return torch.empty_like(t, memory_format=torch.preserve_format)


def _token_blocks(T: int, E: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_E, num_warps): a ~4K-element tile per tensor, loop over E (256-wide
    chunks waste no lanes at E = 768 or 1536, unlike one padded 1024/2048 block)."""
    block_e = min(triton.next_power_of_2(E), 256)
    block_t = max(1, min(triton.next_power_of_2(T), 4096 // block_e))
    return block_t, block_e, 8 if block_t * block_e >= 4096 else 4


def _forward(z: Tensor, y: Tensor, gamma: float | None, need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    B, T, E = z.shape
    dev, f32 = z.device, torch.float32
    if gamma is not None:
        chan = _empty((2, B, E), f32, dev)
        block_e = min(triton.next_power_of_2(E), 128)
        _channel_stats_kernel[(triton.cdiv(E, block_e), B)](
            y, chan, B, T, E, float(gamma), SPATIAL_EPS, *y.stride(),
            BLOCK_T=32, BLOCK_E=block_e, num_warps=4)
    else:
        chan = torch.empty((2, 0, 0), dtype=f32, device=dev)
    cos = _empty((B * T,), f32, dev)
    if need_grad:
        w, rz = _empty_like(z), _empty((B * T,), f32, dev)
        w_arg, rz_arg = w, rz
    else:  # nothing allocated; the kernel gets valid pointers it never writes through
        w, rz = z.new_empty((0,)), cos.new_empty((0,))
        w_arg, rz_arg = z, cos
    block_t, block_e, warps = _token_blocks(T, E)
    _token_fwd_kernel[(triton.cdiv(T, block_t), B)](
        z, y, chan, cos, rz_arg, w_arg, B, T, E, COSINE_EPS, *z.stride(), *y.stride(), *w_arg.stride(),
        HAS_NORM=gamma is not None, WRITE_GRAD=need_grad, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=warps)
    return -(cos.sum() / (B * T)), w, rz


def _backward(grad: Tensor, w: Tensor, rz: Tensor) -> Tensor:
    B, T, E = w.shape
    dz = _empty_like(w)
    assert dz.stride() == w.stride(), "w is dense, so empty_like keeps its strides"
    block_t, block_e, warps = _token_blocks(T, E)
    _token_bwd_kernel[(triton.cdiv(T, block_t), B)](
        grad.to(torch.float32), w, rz, dz, T, E, 1.0 / (B * T), *w.stride(),
        BLOCK_T=block_t, BLOCK_E=block_e, num_warps=warps)
    return dz


# ---- torch.library registration -----------------------------------------------------------

@torch.library.custom_op("irepa::alignment_loss_fwd", mutates_args=())
def _alignment_fwd_op(z: Tensor, y: Tensor, gamma: Optional[float], need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> loss [] fp32, w [B, T, E] (z's dtype and stride order), rz [B*T] fp32;
    without need_grad w and rz are empty [0] tensors."""
    return _forward(z, y, gamma, need_grad)


@_alignment_fwd_op.register_fake
def _(z, y, gamma, need_grad):
    B, T, E = z.shape
    loss = z.new_empty((), dtype=torch.float32)
    if not need_grad:
        return loss, z.new_empty((0,)), z.new_empty((0,), dtype=torch.float32)
    return loss, torch.empty_like(z, memory_format=torch.preserve_format), z.new_empty((B * T,), dtype=torch.float32)


@torch.library.custom_op("irepa::alignment_loss_bwd", mutates_args=())
def _alignment_bwd_op(grad: Tensor, w: Tensor, rz: Tensor) -> Tensor:
    return _backward(grad, w, rz)


@_alignment_bwd_op.register_fake
def _(grad, w, rz):
    return torch.empty_like(w, memory_format=torch.preserve_format)


def _setup_context(ctx, inputs, output):
    _, w, rz = output
    ctx.save_for_backward(w, rz)  # neither z nor y: the gradient is already made
    ctx.need_grad = inputs[3]
    ctx.mark_non_differentiable(w, rz)


def _backward_autograd(ctx, grad_loss, _grad_w, _grad_rz):
    w, rz = ctx.saved_tensors
    dz = None
    if ctx.needs_input_grad[0]:
        if not ctx.need_grad:
            raise RuntimeError("irepa::alignment_loss_fwd ran with need_grad=False, so it stored no "
                               "gradient for z; call fused_alignment_loss, which sets the flag")
        dz = _alignment_bwd_op(grad_loss, w, rz)
    return dz, None, None, None  # the target never gets a gradient, as in the reference


_alignment_fwd_op.register_autograd(_backward_autograd, setup_context=_setup_context)


def fused_alignment_loss(z: Tensor, y: Tensor, gamma: float | None = None) -> Tensor:
    """Fused `irepa.align.alignment_loss`: same contract, Triton forward and backward. The
    gradient for z is computed and stored only when autograd will want it."""
    if z.dim() != 3 or z.shape != y.shape:
        raise ValueError(f"fused_alignment_loss: projection {tuple(z.shape)} and target {tuple(y.shape)} "
                         f"must both be [B, T, E] of the same shape")
    if gamma is not None and z.shape[1] < 2:
        raise ValueError(f"spatial_norm needs at least 2 tokens for an unbiased std, got T={z.shape[1]}")
    if z.device != y.device:
        raise ValueError(f"fused_alignment_loss: z on {z.device} but y on {y.device}")
    if not _use_triton(z) or forward_ad.active(z, y):  # custom op: no forward-AD rule (irepa.forward_ad)
        return alignment_loss(z, y, gamma)
    need_grad = torch.is_grad_enabled() and z.requires_grad
    return _alignment_fwd_op(z, y, None if gamma is None else float(gamma), need_grad)[0]
