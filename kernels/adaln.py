"""Fused adaLN: LayerNorm without affine over the last dim, then per-sample modulation.

Contract (irepa.adaln.modulate_norm_ref): x [B, T, D], shift, scale [B, D] ->
    out = (x - mu) * rstd * (1 + scale[b]) + shift[b],   rstd = 1 / sqrt(var + eps),
mu, var: mean and biased variance of the row x[b, t, :] (F.layer_norm). Math in fp32,
one rounding at the store; the output dtype is the promotion of the three input dtypes.

Design:
  _adaln_fwd_kernel, grid (cdiv(T, ROWS), B): a [ROWS, BLOCK_D] tile of one sample, the
  whole row in registers (exact two-pass mean / variance), shift and scale loaded once
  per program. Saves mean and rstd per row ([B*T] fp32 each).
  _adaln_bwd_kernel, grid (n_chunks, B): each program walks a chunk of rows of one sample.
Backward math. With xhat = (x - mu) * rstd and dxhat = dy * (1 + scale):
    dx = rstd * (dxhat - mean_D(dxhat) - xhat * mean_D(dxhat * xhat))
    dshift[b] = sum_t dy,   dscale[b] = sum_t dy * xhat
The per-sample sums over T are accumulated in registers per chunk and written as fp32
partials [B, n_chunks, D] that one small torch sum reduces (deterministic, no atomics);
n_chunks is picked so that B * n_chunks fills the GPU. Saved for backward: x, scale and
the per-row statistics; xhat is recomputed (eager keeps the normalized x as well).

Limits: D <= 16384 (one row in registers; longer rows use the reference), any B and T,
any strides (views such as adaLN chunks of a [B, 6D] tensor go straight in). Not twice
differentiable. No forward-AD rule: a custom op under torch.func.jvp would return a zero
tangent without an error, so under forward AD (irepa.forward_ad) the reference runs. Under autocast the reference's layer_norm runs in fp32 while this op keeps
the input dtype. CPU tensors go to the reference unless TRITON_INTERPRET=1 was set when
this module was imported and is set at the call. Block sizes are untuned heuristics.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from irepa import forward_ad
from irepa.adaln import modulate_norm_ref as _ref

MAX_D = 16384
# @triton.jit reads TRITON_INTERPRET once, at decoration: remember what these kernels are
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_triton(t: Tensor) -> bool:
    if t.shape[-1] > MAX_D:
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and INTERPRETED and os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _adaln_fwd_kernel(
    x_ptr,                      # [B, T, D], strides (s_xb, s_xt, s_xd)
    shift_ptr, scale_ptr,       # [B, D], strides (s_hb, s_hd), (s_cb, s_cd)
    out_ptr,                    # [B, T, D] contiguous out
    mean_ptr, rstd_ptr,         # [B * T] fp32 out
    T, D, eps,
    s_xb, s_xt, s_xd, s_hb, s_hd, s_cb, s_cd,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    offs_t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    mask_d = offs_d < D
    mask = mask_t[:, None] & mask_d[None, :]
    t64 = offs_t.to(tl.int64)[:, None]
    d64 = offs_d.to(tl.int64)
    x = tl.load(x_ptr + b * s_xb + t64 * s_xt + d64[None, :] * s_xd, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(xc * xc, axis=1) / D + eps)
    shift = tl.load(shift_ptr + b * s_hb + d64 * s_hd, mask=mask_d, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * s_cb + d64 * s_cd, mask=mask_d, other=0.0).to(tl.float32)
    out = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    row = b * T + offs_t
    tl.store(out_ptr + row.to(tl.int64)[:, None] * D + d64[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean, mask=mask_t)
    tl.store(rstd_ptr + row, rstd, mask=mask_t)


@triton.jit
def _adaln_bwd_kernel(
    dy_ptr,                     # [B, T, D], strides (s_gb, s_gt, s_gd)
    x_ptr,                      # [B, T, D], strides (s_xb, s_xt, s_xd)
    scale_ptr,                  # [B, D], strides (s_cb, s_cd)
    mean_ptr, rstd_ptr,         # [B * T] fp32
    dx_ptr,                     # [B, T, D] out, strides (s_db, s_dt, s_dd)
    part_ptr,                   # [2, B, n_chunks, D] fp32 out: dshift, dscale partials
    B, T, D, rows_per_chunk,
    s_gb, s_gt, s_gd, s_xb, s_xt, s_xd, s_cb, s_cd, s_db, s_dt, s_dd,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    chunk = tl.program_id(0)
    n_chunks = tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    d64 = offs_d.to(tl.int64)[None, :]
    scale1 = 1.0 + tl.load(scale_ptr + b * s_cb + offs_d.to(tl.int64) * s_cd, mask=mask_d, other=0.0).to(tl.float32)
    acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
    t_start = chunk * rows_per_chunk
    t_end = tl.minimum(t_start + rows_per_chunk, T)
    for t0 in range(t_start, t_end, ROWS):
        offs_t = t0 + tl.arange(0, ROWS)
        mask_t = offs_t < t_end
        mask = mask_t[:, None] & mask_d[None, :]
        t64 = offs_t.to(tl.int64)[:, None]
        dy = tl.load(dy_ptr + b * s_gb + t64 * s_gt + d64 * s_gd, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + b * s_xb + t64 * s_xt + d64 * s_xd, mask=mask, other=0.0).to(tl.float32)
        row = b * T + offs_t
        mean = tl.load(mean_ptr + row, mask=mask_t, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=mask_t, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dxhat = dy * scale1[None, :]
        c1 = tl.sum(dxhat * xhat, axis=1) / D
        c2 = tl.sum(dxhat, axis=1) / D
        dx = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(dx_ptr + b * s_db + t64 * s_dt + d64 * s_dd, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        acc_shift += tl.sum(dy, axis=0)
        acc_scale += tl.sum(dy * xhat, axis=0)
    part = part_ptr + (b * n_chunks + chunk) * D + offs_d
    tl.store(part, acc_shift, mask=mask_d)
    tl.store(part + B * n_chunks * D, acc_scale, mask=mask_d)


# ---- launchers -------------------------------------------------------------------------

def _empty(shape, dtype, device) -> Tensor:
    """Output allocation; tests swap it for a NaN-filled one to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


def _blocks(T: int, D: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_D, num_warps): whole rows, ~4K elements per tile."""
    block_d = triton.next_power_of_2(D)
    rows = max(1, min(triton.next_power_of_2(T), 4096 // block_d))
    return rows, block_d, 8 if rows * block_d >= 4096 else 4


def _num_chunks(x: Tensor, B: int, T: int, rows: int) -> int:
    """Chunks of T per sample in the backward: about 4 programs per SM in all."""
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2
    return max(1, min(triton.cdiv(4 * sms, B), triton.cdiv(T, rows)))


def _forward(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    B, T, D = x.shape
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, shift.dtype), scale.dtype)
    out = _empty((B, T, D), out_dtype, x.device)
    mean = _empty((B * T,), torch.float32, x.device)
    rstd = _empty((B * T,), torch.float32, x.device)
    rows, block_d, warps = _blocks(T, D)
    _adaln_fwd_kernel[(triton.cdiv(T, rows), B)](
        x, shift, scale, out, mean, rstd, T, D, eps, *x.stride(), *shift.stride(), *scale.stride(),
        ROWS=rows, BLOCK_D=block_d, num_warps=warps)
    return out, mean, rstd


def _backward(dy: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B, T, D = x.shape
    dx = _empty((B, T, D), x.dtype, x.device)
    rows, block_d, warps = _blocks(T, D)
    n_chunks = _num_chunks(x, B, T, rows)
    rows_per_chunk = triton.cdiv(triton.cdiv(T, n_chunks), rows) * rows
    n_chunks = triton.cdiv(T, rows_per_chunk)
    part = _empty((2, B, n_chunks, D), torch.float32, x.device)
    _adaln_bwd_kernel[(n_chunks, B)](
        dy, x, scale, mean, rstd, dx, part, B, T, D, rows_per_chunk,
        *dy.stride(), *x.stride(), *scale.stride(), *dx.stride(),
        ROWS=rows, BLOCK_D=block_d, num_warps=warps)
    return dx, part[0].sum(dim=1), part[1].sum(dim=1)  # two sums: outputs must not alias


# ---- torch.library registration -----------------------------------------------------------

@torch.library.custom_op("irepa::adaln_fwd", mutates_args=())
def _adaln_fwd_op(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> out [B, T, D], mean [B*T] fp32, rstd [B*T] fp32."""
    return _forward(x, shift, scale, eps)


@_adaln_fwd_op.register_fake
def _(x, shift, scale, eps):
    B, T, D = x.shape
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, shift.dtype), scale.dtype)
    stat = x.new_empty((B * T,), dtype=torch.float32)
    return x.new_empty((B, T, D), dtype=out_dtype), stat, torch.empty_like(stat)


@torch.library.custom_op("irepa::adaln_bwd", mutates_args=())
def _adaln_bwd_op(dy: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> dx [B, T, D] (x.dtype), dshift, dscale [B, D] fp32."""
    return _backward(dy, x, scale, mean, rstd)


@_adaln_bwd_op.register_fake
def _(dy, x, scale, mean, rstd):
    B, T, D = x.shape
    return (x.new_empty((B, T, D)), x.new_empty((B, D), dtype=torch.float32),
            x.new_empty((B, D), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, shift, scale, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.shift_dtype = shift.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _backward_autograd(ctx, grad_out, _grad_mean, _grad_rstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = _adaln_bwd_op(grad_out, x, scale, mean, rstd)
    return dx, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None


_adaln_fwd_op.register_autograd(_backward_autograd, setup_context=_setup_context)


def fused_adaln(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """Fused `modulate_norm_ref`: LayerNorm(x) * (1 + scale) + shift, shift/scale per sample."""
    if x.dim() != 3 or shift.shape != (x.shape[0], x.shape[2]) or scale.shape != shift.shape:
        raise ValueError(f"fused_adaln: expected x [B, T, D] with shift, scale [B, D]; got x {tuple(x.shape)}, "
                         f"shift {tuple(shift.shape)}, scale {tuple(scale.shape)}")
    if not _use_triton(x):
        return _ref(x, shift, scale, eps)
    if forward_ad.active(x, shift, scale):
        forward_ad.note_fallback("adaLN uses the eager reference", "the fused kernel has no forward-AD rule")
        return _ref(x, shift, scale, eps)
    return _adaln_fwd_op(x, shift, scale, float(eps))[0]
