"""SiT flow matching on the linear path x_t = (1 - t) x + t e (t = 1 is noise).

The network regresses the velocity d x_t / dt = e - x with an MSE. Time is drawn
uniformly (SiT/REPA default) or logit-normal ("lognormal" in REPA's flags).
"""
from __future__ import annotations

import torch


TIME_SAMPLING = ("uniform", "lognormal")


def check_time_sampling(kind: str) -> None:
    if kind not in TIME_SAMPLING:
        raise ValueError(f"unknown time sampling {kind!r}; choose 'uniform' or 'lognormal'")


def sample_time(batch: int, kind: str = "uniform", *, generator: torch.Generator | None = None,
                device=None, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """t [B] in [0, 1]: uniform, or sigmoid(N(mean, std)) for kind="lognormal"."""
    check_time_sampling(kind)
    if kind == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    return torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x + t noise."""
    tb = _bcast(t, x)
    return (1 - tb) * x + tb * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x


def denoising_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32 over every element."""
    return (pred.float() - target.float()).pow(2).mean()


def score_from_velocity(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Score of p_t on the linear path: s = -(x_t + (1 - t) v) / t (Gaussian noise, alpha=1-t, sigma=t)."""
    tb = _bcast(t, x_t)
    return -(x_t + (1 - tb) * v) / tb
