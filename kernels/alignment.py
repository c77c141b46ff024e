"""Fused iREPA alignment loss: spatial norm + per-token cosine, forward and backward.

Contract (same as irepa.align.alignment_loss): z, y [B, T, E] -> fp32 scalar
    L = -(1/N) * sum_{b,t} <z, y'> / (max(|z|, 1e-12) * max(|y'|, 1e-12)),   N = B*T,
    y' = (y - gamma * mu) / (sigma + 1e-6)   if gamma is not None, else y' = y,
mu, sigma: mean and unbiased std of y over T per (b, channel). Every norm, dot and
statistic is accumulated in fp32 whatever the input dtype (bf16, fp16, fp32).

Design (two passes forward, one backward; no [B, T, E] intermediate ever stored):
  1. _channel_stats_kernel, grid (cdiv(E, BLOCK_E), B), only with gamma: one sweep over T.
     Each [BLOCK_T, BLOCK_E] tile is reduced exactly (mean, then squared deviations from
     it, in registers) and tiles are merged with Chan's parallel-variance formula, so a
     large channel offset does not cancel. Output: the per-(b, e) affine of the target,
     y' = y * a + c with a = 1/(sigma + 1e-6), c = -gamma * mu * a, [2, B, E] fp32.
  2. _token_fwd_kernel, grid (cdiv(T, BLOCK_T), B): a block of tokens of one sample, loop
     over E accumulating <z,z>, <y',y'>, <z,y'>. Writes cos per token (for the loss) and
     two backward coefficients per token (below). loss = -sum(cos) / N.
  3. _token_bwd_kernel, same grid: recompute y' from y and (a, c); then elementwise.
Backward math. With rz = 1/max(|z|, eps), ry = 1/max(|y'|, eps), u = y' * ry (the unit
target, a constant: the target is under no_grad in the reference) and g = -dL_out / N:
    d cos / dz = rz * u - [|z| >= eps] * cos * rz^2 * z
(the second term is the derivative of the norm, which clamp_min blocks below eps, as
its autograd does), hence dz = g * (k_y * y' - k_z * z) with the per-token coefficients
    k_y = rz * ry,   k_z = [|z| >= eps] * cos * rz^2      saved as coef [2, N] fp32.
Saved for backward: inputs z and y, coef [2, N] and chan [2, B, E] (fp32 statistics).
Eager autograd keeps fp32 copies of z and of the normalized target instead.

Ideal HBM traffic per element (bf16): forward 3 x 2 bytes (y for the statistics, z and y
for the tokens; 2 x 2 without gamma), backward 3 x 2 bytes (read z and y, write dz).

Limits: 3-D inputs of equal shape, any B, T, E (T >= 2 with gamma, as the reference),
any strides (the kernels take strides; dz gets z's layout), int64 addressing. Not twice
differentiable. CPU tensors go to the eager reference unless TRITON_INTERPRET=1 was set
when this module was imported and is set at the call (that is how the tests run it).
Block sizes are heuristics, not yet tuned on an H100.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

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
    coef_ptr,                   # [2, N] fp32 out: k_y, k_z
    B, T, E, eps,
    s_zb, s_zt, s_ze, s_yb, s_yt, s_ye,
    HAS_NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
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
    N = B * T
    tl.store(cos_ptr + row, cos, mask=mask_t)
    tl.store(coef_ptr + row, rz * ry, mask=mask_t)
    tl.store(coef_ptr + N + row, tl.where(nz >= eps, cos * rz * rz, 0.0), mask=mask_t)


@triton.jit
def _token_bwd_kernel(
    grad_ptr,                   # [] fp32: dL/dloss
    z_ptr, y_ptr,               # [B, T, E], strides as in the forward
    chan_ptr,                   # [2, B, E] fp32 (read only if HAS_NORM)
    coef_ptr,                   # [2, N] fp32: k_y, k_z
    dz_ptr,                     # [B, T, E] out, strides (s_db, s_dt, s_de)
    B, T, E, inv_n,
    s_zb, s_zt, s_ze, s_yb, s_yt, s_ye, s_db, s_dt, s_de,
    HAS_NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    g = -tl.load(grad_ptr) * inv_n
    row = b * T + offs_t
    k_y = (tl.load(coef_ptr + row, mask=mask_t, other=0.0) * g)[:, None]
    k_z = (tl.load(coef_ptr + B * T + row, mask=mask_t, other=0.0) * g)[:, None]
    t64 = offs_t.to(tl.int64)[:, None]
    z_rows = z_ptr + b * s_zb + t64 * s_zt
    y_rows = y_ptr + b * s_yb + t64 * s_yt
    d_rows = dz_ptr + b * s_db + t64 * s_dt
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
        dz = k_y * yt - k_z * zt
        tl.store(d_rows + e64 * s_de, dz.to(dz_ptr.dtype.element_ty), mask=mask)


# ---- launchers -------------------------------------------------------------------------

def _empty(shape, dtype, device) -> Tensor:
    """Output allocation; tests swap it for a NaN-filled one to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


def _token_blocks(T: int, E: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_E, num_warps): a ~4K-element tile per tensor, loop over E (256-wide
    chunks waste no lanes at E = 768 or 1536, unlike one padded 1024/2048 block)."""
    block_e = min(triton.next_power_of_2(E), 256)
    block_t = max(1, min(triton.next_power_of_2(T), 4096 // block_e))
    return block_t, block_e, 8 if block_t * block_e >= 4096 else 4


def _forward(z: Tensor, y: Tensor, gamma: float | None) -> tuple[Tensor, Tensor, Tensor]:
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
    coef = _empty((2, B * T), f32, dev)
    block_t, block_e, warps = _token_blocks(T, E)
    _token_fwd_kernel[(triton.cdiv(T, block_t), B)](
        z, y, chan, cos, coef, B, T, E, COSINE_EPS, *z.stride(), *y.stride(),
        HAS_NORM=gamma is not None, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=warps)
    return -(cos.sum() / (B * T)), coef, chan


def _backward(grad: Tensor, z: Tensor, y: Tensor, coef: Tensor, chan: Tensor, has_norm: bool) -> Tensor:
    B, T, E = z.shape
    if z.stride(2) != 1 and z.transpose(1, 2).is_contiguous():
        # keep the caller's layout: the conv projector hands over a [B, E, T] -> [B, T, E] view
        dz = _empty((B, E, T), z.dtype, z.device).transpose(1, 2)
    else:
        dz = _empty((B, T, E), z.dtype, z.device)
    block_t, block_e, warps = _token_blocks(T, E)
    _token_bwd_kernel[(triton.cdiv(T, block_t), B)](
        grad.to(torch.float32), z, y, chan, coef, dz, B, T, E, 1.0 / (B * T),
        *z.stride(), *y.stride(), *dz.stride(),
        HAS_NORM=has_norm, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=warps)
    return dz


# ---- torch.library registration -----------------------------------------------------------

@torch.library.custom_op("irepa::alignment_loss_fwd", mutates_args=())
def _alignment_fwd_op(z: Tensor, y: Tensor, gamma: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    """-> loss [] fp32, coef [2, B*T] fp32, chan [2, B, E] fp32 ([2, 0, 0] without gamma)."""
    return _forward(z, y, gamma)


@_alignment_fwd_op.register_fake
def _(z, y, gamma):
    B, T, E = z.shape
    chan_shape = (2, B, E) if gamma is not None else (2, 0, 0)
    return (z.new_empty((), dtype=torch.float32), z.new_empty((2, B * T), dtype=torch.float32),
            z.new_empty(chan_shape, dtype=torch.float32))


@torch.library.custom_op("irepa::alignment_loss_bwd", mutates_args=())
def _alignment_bwd_op(grad: Tensor, z: Tensor, y: Tensor, coef: Tensor, chan: Tensor, has_norm: bool) -> Tensor:
    return _backward(grad, z, y, coef, chan, has_norm)


@_alignment_bwd_op.register_fake
def _(grad, z, y, coef, chan, has_norm):
    return torch.empty_like(z)


def _setup_context(ctx, inputs, output):
    z, y, gamma = inputs
    _, coef, chan = output
    ctx.save_for_backward(z, y, coef, chan)
    ctx.has_norm = gamma is not None
    ctx.mark_non_differentiable(coef, chan)


def _backward_autograd(ctx, grad_loss, _grad_coef, _grad_chan):
    z, y, coef, chan = ctx.saved_tensors
    dz = None
    if ctx.needs_input_grad[0]:
        dz = _alignment_bwd_op(grad_loss, z, y, coef, chan, ctx.has_norm)
    return dz, None, None  # the target never gets a gradient, as in the reference


_alignment_fwd_op.register_autograd(_backward_autograd, setup_context=_setup_context)


def fused_alignment_loss(z: Tensor, y: Tensor, gamma: float | None = None) -> Tensor:
    """Fused `irepa.align.alignment_loss`: same contract, Triton forward and backward."""
    if z.dim() != 3 or z.shape != y.shape:
        raise ValueError(f"fused_alignment_loss: projection {tuple(z.shape)} and target {tuple(y.shape)} "
                         f"must both be [B, T, E] of the same shape")
    if gamma is not None and z.shape[1] < 2:
        raise ValueError(f"spatial_norm needs at least 2 tokens for an unbiased std, got T={z.shape[1]}")
    if z.device != y.device:
        raise ValueError(f"fused_alignment_loss: z on {z.device} but y on {y.device}")
    if not _use_triton(z):
        return alignment_loss(z, y, gamma)
    return _alignment_fwd_op(z, y, None if gamma is None else float(gamma))[0]
