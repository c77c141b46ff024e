"""MeanFlow: regress the average velocity u(z_t, r, t) = 1/(t - r) * int_r^t v dtau, as the MeanFlow
authors' JAX code computes it (Gsunshine/meanflow @d70cb55: meanflow.py, models/models_dit.py).

Same linear path as SiT, z_t = (1 - t) x + t e, v = e - x, t = 1 noise. The network is a
two-time SiT (`DiT`): `attach_h_embedder(model)` gives it a second TimestepEmbedder for the
interval h = t - r, and `average_velocity(model, z, t, h, y, drop)` calls it as
model(z, t, y, drop, extra_cond=model.h_embedder(h)): c = t_emb(t) + y_emb(y) + h_emb(h),
both times raw in [0, 1]. From the identity u = v - (t - r) du/dt, with
du/dt = v . d_z u + d_t u along the path, the target is

    u_tgt = sg(v_g - clip(t - r, 0, 1) * du/dt),   (u, du/dt) = jvp(f, (z, t, r), (v_g, 1, 0)),

f(z, t, r) = net(z, t, t - r, y): the tangent of t is 1 and that of r is 0, so h moves
with dh = 1. Loss per sample L_i = sum_{C,H,W} (u - u_tgt)^2, weighted by sg(1/(L_i + c)^p),
p = 1, c = 0.01, then the batch mean.

Draws (`sample_tr`, for the whole batch, sliceable): t, r from two sigmoid(N(-0.4, 1)) samples (t the
larger), the first int(0.75 B) entries by index get r = t; the noise; label dropout as
MeanFlow's `cond_drop`: num_drop = #(rand < 0.1) and the first num_drop entries (`first_k`)
get the null label and the unguided target v_g = v.

Guidance during training (`guidance_fn`): v_g = omega v + (1 - omega - kappa) v_unc + kappa v_cond with
v_unc / v_cond the net's instantaneous velocity (h = 0) without / with the label, under
no_grad; omega = 1 and kappa = 0 outside [t_start, t_end]. The scale baked in is
omega / (1 - kappa); samples are drawn with cfg 1.

How u and du/dt are computed (`jvp`):
- "split" (default): u and the hidden state with gradient from the usual forward (any
  attention backend, fused kernels, compiled blocks, DDP/FSDP hooks), then du/dt from
  torch.func.jvp under no_grad on the eager blocks (`eager_blocks`; irepa.forward_ad: math
  attention, eager adaLN), or through `jvp_fn`, a torch.compile'd `jvp_call` (one graph).
  Costs one extra forward, keeps no graph of the tangent pass.
- "joint": one torch.func.jvp with gradient and has_aux for the hidden state: u, du/dt and
  the hidden state all from the primal pass (what Gsunshine/py-meanflow @1f6d72d does, without
  its whole-step compile); activation checkpointing does not apply inside it.
`target_precision` "fp32" (default, as py-meanflow's forward_with_loss) runs the guidance
passes and the JVP with autocast off; "amp" keeps the caller's autocast.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from irepa import forward_ad
from irepa.models.layers import TimestepEmbedder
from irepa.sampling import guided_velocity

JVP_MODES = ("split", "joint")
TARGET_PRECISIONS = ("fp32", "amp")


@dataclass
class MeanFlowSettings:
    """The MeanFlow recipe's options (config section `meanflow`, --meanflow.<key>)."""

    p_mean: float = -0.4
    """mean of the normal under the sigmoid of both time draws (logit-normal)"""
    p_std: float = 1.0
    """std of that normal"""
    data_proportion: float = 0.75
    """share of each per-rank batch (its first entries, by index) trained with r = t"""
    norm_p: float = 1.0
    """adaptive loss weight 1 / (L + norm_eps)^norm_p per sample (0 = plain summed squared error)"""
    norm_eps: float = 0.01
    """c of the adaptive weight"""
    omega: float = 1.0
    """guidance baked in during training: v_g = omega v + (1 - omega - kappa) v_unc + kappa v_cond"""
    kappa: float = 0.0
    """the weight of the net's own conditional velocity in v_g (effective scale omega / (1 - kappa))"""
    t_start: float = 0.0
    """guidance acts for t in [t_start, t_end] (SiT time, 1 = noise); outside it v_g = v"""
    t_end: float = 1.0
    """upper end of the guidance interval"""
    jvp: str = "split"
    """split: u with gradient from the normal forward, du/dt from a no-grad JVP; joint: one JVP with gradient"""
    target_precision: str = "fp32"
    """fp32: guidance passes and the JVP with autocast off (py-meanflow; under FSDP with bf16/fp16 parameters
    it falls back to amp, with a log line); amp: under the run's autocast"""
    compile_jvp: bool | None = None
    """torch.compile the no-grad JVP of the split mode (one graph of the whole model); None = train.compile"""

    def __post_init__(self):
        if not 0.0 <= self.data_proportion <= 1.0:
            raise ValueError(f"meanflow: data_proportion must be in [0, 1], got {self.data_proportion}")
        if self.kappa < 0 or self.kappa >= 1 or self.omega <= 0:
            raise ValueError(f"meanflow: guidance needs omega > 0 and 0 <= kappa < 1, got omega={self.omega}, "
                             f"kappa={self.kappa}")
        if not 0.0 <= self.t_start <= self.t_end <= 1.0:
            raise ValueError(f"meanflow: guidance interval must satisfy 0 <= t_start <= t_end <= 1, got "
                             f"[{self.t_start}, {self.t_end}]")
        if self.jvp not in JVP_MODES or self.target_precision not in TARGET_PRECISIONS:
            raise ValueError(f"meanflow: jvp must be one of {JVP_MODES} and target_precision one of "
                             f"{TARGET_PRECISIONS}, got {self.jvp!r}, {self.target_precision!r}")
        if self.norm_eps <= 0 or self.norm_p < 0:
            raise ValueError(f"meanflow: norm_eps must be > 0 and norm_p >= 0, got {self.norm_eps}, {self.norm_p}")

    @property
    def guided(self) -> bool:
        return self.omega != 1.0 or self.kappa != 0.0

    @property
    def effective_scale(self) -> float:
        """omega' = omega / (1 - kappa): the CFG scale the model learns to produce in one call."""
        return self.omega / (1.0 - self.kappa)


# ---- draws -------------------------------------------------------------------------------

def sample_t_r(batch: int, generator: torch.Generator | None, device=None, p_mean: float = -0.4,
               p_std: float = 1.0, data_proportion: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """(t [B], r [B]) with r <= t; the first int(data_proportion * B) entries have r = t."""
    a = torch.sigmoid(p_mean + p_std * torch.randn(batch, generator=generator, device=device))
    b = torch.sigmoid(p_mean + p_std * torch.randn(batch, generator=generator, device=device))
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    same = torch.arange(batch, device=device) < int(batch * data_proportion)
    return t, torch.where(same, t, r)


def first_k(mask: torch.Tensor) -> torch.Tensor:
    """The first #(mask) entries by index, True (MeanFlow's `cond_drop` from a rand < p mask)."""
    return torch.arange(mask.shape[0], device=mask.device) < mask.sum()


def draw_times_and_noise(x: torch.Tensor, generator: torch.Generator | None, s: MeanFlowSettings
                         ) -> dict[str, torch.Tensor]:
    """{"t", "r": [B], "noise": like x}: the draws of a step after the data's (x, label dropout)."""
    t, r = sample_t_r(x.shape[0], generator, x.device, s.p_mean, s.p_std, s.data_proportion)
    return {"t": t, "r": r, "noise": torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)}


# ---- the two-time model --------------------------------------------------------------------

def attach_h_embedder(model: nn.Module) -> nn.Module:
    """Give a SiT its second TimestepEmbedder (for h = t - r), initialized like t_embedder in
    MeanFlow's DiT: N(0, 0.02) weights, zero biases. It is a submodule, so it is trained,
    EMA-averaged and checkpointed (h_embedder.* keys) with the model."""
    model.h_embedder = TimestepEmbedder(model.dim)
    with torch.no_grad():
        for lin in (model.h_embedder.mlp[0], model.h_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
    return model


def average_velocity(model, z, t, h, y, drop=None):
    """-> (u(z, t - h, t) [B, C, H, W], hidden at the alignment depth)."""
    return model(z, t, y, drop, extra_cond=model.h_embedder(h))


# ---- target --------------------------------------------------------------------------------

def _bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def _fp32_up(a: torch.Tensor) -> torch.Tensor:
    """fp32, or float64 kept (the float64 checks)."""
    return a.to(torch.promote_types(a.dtype, torch.float32))


@torch.no_grad()
def guided_target_velocity(model, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor, v: torch.Tensor,
                           null_class: int | None, s: MeanFlowSettings) -> torch.Tensor:
    """v_g (MeanFlow's guidance_fn): the conditional velocity v mixed with the net's own
    instantaneous velocities."""
    if not s.guided:
        return v
    if null_class is None:
        raise ValueError("MeanFlow guidance (omega != 1 or kappa != 0) needs a model with a null class "
                         "(model.class_dropout_prob > 0)")
    zero = torch.zeros_like(t)
    if s.kappa > 0:  # one call for both branches
        both = average_velocity(model, torch.cat([z, z]), torch.cat([t, t]), torch.cat([zero, zero]),
                                torch.cat([torch.full_like(y, null_class), y]))[0].to(v.dtype)
        v_unc, v_cond = both.chunk(2)
    else:
        v_unc, v_cond = average_velocity(model, z, t, zero, torch.full_like(y, null_class))[0].to(v.dtype), 0.0
    inside = _bcast((t >= s.t_start) & (t <= s.t_end), v)  # 1 / 0 in v's dtype: omega, kappa not rounded to fp32
    omega, kappa = 1 + (s.omega - 1) * inside, s.kappa * inside
    return omega * v + (1 - omega - kappa) * v_unc + kappa * v_cond


def _plain_call(module, *args, **kwargs):
    return module(*args, **kwargs)


@contextmanager
def eager_blocks(model):
    """Run the blocks' eager forward, without activation checkpointing, for the JVP.

    An eager torch.func.jvp cannot enter a torch.compile'd function (pytorch#128711), and
    irepa.train.parallelize compiles each block's forward in place: the instance attribute is
    taken away for the duration. A checkpoint wrapper (train.activation_checkpointing) calls
    its block directly: torch.utils.checkpoint under the JVP recomputes a different graph in
    the backward (CheckpointError). The wrapper itself stays, so FSDP's hooks on it still run."""
    blocks = list(getattr(model, "blocks", []))
    saved = [blk.__dict__.pop("forward", None) for blk in blocks]
    wrapped = [blk for blk in blocks if hasattr(blk, "checkpoint_fn")]
    fns = [blk.checkpoint_fn for blk in wrapped]
    for blk in wrapped:
        blk.checkpoint_fn = _plain_call
    try:
        yield
    finally:
        for blk, fwd in zip(blocks, saved):
            if fwd is not None:
                blk.forward = fwd
        for blk, fn in zip(wrapped, fns):
            blk.checkpoint_fn = fn


def jvp_call(model, z, t, r, y, drop, v_g, has_aux: bool):
    """(u, du/dt) or, with has_aux, (u, du/dt, hidden); the tangents are (v_g, 1, 0) for (z, t, r)."""
    def f(z_, t_, r_):
        u_, hidden = average_velocity(model, z_, t_, t_ - r_, y, drop)
        return (u_, () if hidden is None else (hidden,)) if has_aux else u_

    if has_aux and torch.is_grad_enabled() and any(hasattr(b, "checkpoint_fn") for b in getattr(model, "blocks", [])):
        forward_ad.note_fallback("activation checkpointing is off inside the joint JVP",
                                 "torch.utils.checkpoint cannot recompute a JVP; meanflow.jvp=split keeps it")
    with forward_ad.jvp_mode(), eager_blocks(model):
        out = torch.func.jvp(f, (z, t, r), (v_g, torch.ones_like(t), torch.zeros_like(r)), has_aux=has_aux)
    return (*out[:2], out[2][0] if out[2] else None) if has_aux else out


def _target_precision(device: torch.device, s: MeanFlowSettings):
    return torch.autocast(device.type, enabled=False) if s.target_precision == "fp32" else nullcontext()


def average_velocity_and_target(model, z, t, r, y, drop, v_g, s: MeanFlowSettings, jvp_fn=None):
    """z, v_g fp32; -> (u with gradient, hidden state with gradient, u_tgt fp32 detached).
    jvp_fn: replaces `jvp_call` in the split mode (a torch.compile'd copy of it)."""
    if s.jvp == "joint":
        with _target_precision(z.device, s):
            u, dudt, hidden = jvp_call(model, z, t, r, y, drop, v_g, True)
    else:
        u, hidden = average_velocity(model, z, t, t - r, y, drop)  # under the caller's autocast, like any recipe
        with torch.no_grad(), _target_precision(z.device, s):
            _, dudt = (jvp_fn or jvp_call)(model, z, t, r, y, drop, v_g, False)
    u_tgt = (v_g - _bcast((t - r).clamp(0.0, 1.0), v_g) * dudt.to(v_g.dtype)).detach()
    return u, hidden, u_tgt


def adaptive_loss(u: torch.Tensor, u_tgt: torch.Tensor, norm_p: float = 1.0, norm_eps: float = 0.01
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (mean_i L_i / sg((L_i + c)^p), L_i [B]); L_i the squared error summed over the sample, fp32."""
    per = (_fp32_up(u) - _fp32_up(u_tgt)).pow(2).flatten(1).sum(1)
    weight = (per.detach() + norm_eps).pow(norm_p)
    return (per / weight).mean(), per


def loss(model, x, y, t, r, noise, drop, s: MeanFlowSettings, null_class: int | None, jvp_fn=None):
    """One micro-batch -> (weighted loss, hidden at the alignment depth, extras): extras "mf_mse" =
    mean L_i per element and "v_mse" = |u - v|^2 per element (MeanFlow's monitor), detached.
    drop: the label-dropout mask (first_k) or None; jvp_fn: a compiled `jvp_call` (split mode)."""
    x = _fp32_up(x)
    t, r, e = (a.to(x.dtype) for a in (t, r, noise))
    z = (1 - _bcast(t, x)) * x + _bcast(t, x) * e
    v = e - x
    with _target_precision(x.device, s):
        v_g = guided_target_velocity(model, z, t, y, v, null_class, s)
    if drop is not None:
        if null_class is None:
            raise ValueError("MeanFlow label dropout needs a model with a null class (model.class_dropout_prob > 0)")
        v_g = torch.where(drop.view(-1, *([1] * (v.dim() - 1))), v, v_g)  # dropped: null label, unguided target
    u, hidden, u_tgt = average_velocity_and_target(model, z, t, r, y, drop, v_g, s, jvp_fn)
    out, per = adaptive_loss(u, u_tgt, s.norm_p, s.norm_eps)
    extras = {"mf_mse": per.detach().mean() / u[0].numel(), "v_mse": (_fp32_up(u.detach()) - v).pow(2).mean()}
    return out, hidden, extras


# ---- sampling --------------------------------------------------------------------------------

def time_grid(steps: int, times=None) -> list[float]:
    """1 = t_0 > ... > t_N = 0: uniform by default (the 4-NFE spacing iREPA used is unpublished)."""
    if times is not None:
        ts = [float(v) for v in times]
        if len(ts) < 2 or any(a <= b for a, b in zip(ts, ts[1:])) or ts[0] > 1 or ts[-1] < 0:
            raise ValueError(f"MeanFlow times must decrease strictly within [0, 1], got {ts}")
        return ts
    if steps < 1:
        raise ValueError(f"MeanFlow sampling needs steps >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()


@torch.no_grad()
def sample(model, noise: torch.Tensor, labels: torch.Tensor | None, steps: int = 1, times=None, cfg: float = 1.0,
           interval: tuple[float, float] = (0.0, 1.0), null_class: int | None = None) -> torch.Tensor:
    """z_{i+1} = z_i - (t_i - t_{i+1}) u(z_i, t_i, h = t_i - t_{i+1}): `steps` model calls (x2 with cfg != 1).

    The state is float64 (as irepa.sampling); the model sees the noise's dtype. Guidance is
    trained in, so cfg stays 1 for guided runs; cfg != 1 mixes null-class and conditional u.
    """
    ts = time_grid(steps, times)
    x = noise.to(torch.float64)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        h = t_cur - t_next

        def u_fn(xm, tt, y, h=h):
            return average_velocity(model, xm, tt, torch.full_like(tt, h), y)[0]

        guide = interval[0] <= t_cur <= interval[1]  # SiT time, as irepa.sampling's "sit" rule
        x = x - h * guided_velocity(u_fn, x, t_cur, labels, cfg, guide, null_class, noise.dtype)
    return x.to(noise.dtype)
